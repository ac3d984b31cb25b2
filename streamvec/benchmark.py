"""``streamvec bench``: the engine's throughput and memory next to the machine's own I/O.

Every figure that matters is a ratio measured side by side in one run. Each run of a step is
bracketed by its rooflines: ``cat`` of the step's input files just before (the read roofline)
and a plain write of as many bytes as the step wrote just after (the write roofline, timed with
and without ``fdatasync``). From them, ``roofline_seconds`` is how long plain sequential I/O of
the step's bytes takes on this machine, and ``ratio_to_roofline`` is the step's wall time over
that (1.0: the step runs at the machine's I/O speed). Absolute times on a shared machine are
indicative only. Peak memory is ``RssAnon + RssShmem + VmSwap`` of the engine process and its
children, sampled every 10 ms (:class:`streamvec.memory.PeakSampler`): page-cache pages of the
inputs are not counted, because the kernel can drop them.

The steps (:data:`STEPS`) run as ``streamvec`` subprocesses by default (a fresh process per
step, as a user runs it; the time includes interpreter start-up, reported apart as
``startup_seconds``) or in-process through the Python API. Steps run by the block engine
(``diff``, ``combine``, ``combine-ckpt``) also report their time per stage (``--report``).

The page cache is warm by default (the read roofline after one warm-up read). With ``cold``,
the inputs are evicted before every engine run and every read-roofline measurement, by
``/proc/sys/vm/drop_caches`` where writing it is permitted, else by
``posix_fadvise(POSIX_FADV_DONTNEED)`` per input file; ``mincore`` then checks how much of the
inputs is still cached, and a record is labelled cold only if that is at most 5%.

Results JSON (``bench.json`` under ``--out``) holds ``machine``, ``settings``, ``results`` (one
record per (size, step) with the fields of :data:`RESULT_FIELDS`) and ``plots`` (the PNGs that
:mod:`streamvec.bench_plots` wrote next to it).

The synthetic checkpoints are :mod:`streamvec.synth` pairs: bf16 Llama-shaped weights and a
fine-tune whose delta is low-rank plus noise. They are not real fine-tunes, and their deltas
compress differently from real ones (2.0x with lz4+bitshuffle here; the design brief cites
2.6x for real bf16 deltas, not measured in this project).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from streamvec.errors import StreamvecError

# The operations measured, in the order they run; help texts say what each does.
STEPS = ("diff", "combine", "combine-ckpt", "svd", "merge")
STEP_HELP = {
    "diff": "task vector FT - BASE into a Zarr store (float32, lz4); reads both checkpoints",
    "combine": "edited model BASE + 0.5 * tau, tau read back from diff's store (safetensors)",
    "combine-ckpt": "the same edited model straight from the checkpoints (tau computed on the "
    "fly, no store): streamvec combine --base BASE FT:0.5",
    "svd": "rank-16 SVD of tau from diff's store (default method, auto) into an SVD store; "
    "several passes over the store",
    "merge": "TIES merge (density 0.5) of the fine-tune onto the base by a mergekit-style "
    "recipe; sparsifying makes extra passes over the inputs",
}
# Steps that read the store diff writes: asking for one runs diff first.
NEEDS_STORE = frozenset({"combine", "svd"})
# Steps whose command writes the engine's RunReport (--report): time per stage, start-up.
REPORTING = frozenset({"diff", "combine", "combine-ckpt"})
SVD_RANK = 16
TIES_DENSITY = 0.5
OUTPUT_NAMES = {
    "diff": "tau-{}.zarr",
    "combine": "edited-{}",
    "combine-ckpt": "edited-ckpt-{}",
    "svd": "svd-{}.zarr",
    "merge": "merged-{}",
}

# What each result record holds (the test and docs/benchmarks.md rely on these names).
RESULT_FIELDS = (
    "step",  # one of STEPS
    "size",  # the size label asked for, e.g. "1B"
    "params",  # parameters of the synthetic model
    "input_bytes",  # bytes of the files the step reads, each counted once
    "output_bytes",  # bytes the step left on disk (compressed for Zarr)
    "output_logical_bytes",  # bytes of the result's arrays, uncompressed
    "seconds",  # median wall time of the step (subprocess: includes start-up)
    "seconds_all",  # every repeat's wall time
    "engine_seconds",  # the engine's own seconds from its report, median run (None: no report)
    "startup_seconds",  # subprocess: seconds - engine_seconds, median run (else None)
    "input_gbps",  # input_bytes / seconds / 1e9
    "output_gbps",  # output_bytes / seconds / 1e9
    "read_roofline_gbps",  # cat of the same input files to /dev/null (warm, or cold)
    "write_roofline_gbps",  # plain write of output_bytes + fdatasync
    "write_roofline_nosync_gbps",  # the same write, timed before fdatasync
    "ratio_input_to_read_roofline",  # input_gbps / read_roofline_gbps
    "ratio_output_to_write_roofline",  # output_gbps / write_roofline_gbps
    "roofline_seconds",  # input_bytes at the read roofline + output_bytes at the write one
    "ratio_to_roofline",  # seconds / roofline_seconds; 1.0 = the machine's I/O speed
    "stage_seconds",  # the engine's seconds per stage, median run (None: no report)
    "engine_workers",  # workers the engine used, from its report (None: no report)
    "peak_anon_bytes",  # max over repeats of the sampled peak RssAnon+RssShmem+VmSwap
    "memory_limit_bytes",  # --memory-limit given to the engine
    "workers",  # --workers given to the engine (None: its default, the CPU count)
    "mode",  # "subprocess" or "in-process"
    "cache",  # "warm", "cold (drop_caches)", "cold (fadvise)" or "not cold (...)"
    "cache_resident_fraction",  # cold: most of the inputs found cached right after a drop
)

WRITE_CHUNK = 64 << 20  # the plain write goes out in 64 MiB pieces, like any streaming writer


@dataclass
class StepResult:
    step: str
    size: str
    params: int
    input_bytes: int
    output_bytes: int
    output_logical_bytes: int
    seconds: float
    seconds_all: list[float]
    engine_seconds: float | None
    startup_seconds: float | None
    input_gbps: float
    output_gbps: float
    read_roofline_gbps: float
    write_roofline_gbps: float
    write_roofline_nosync_gbps: float
    ratio_input_to_read_roofline: float
    ratio_output_to_write_roofline: float
    roofline_seconds: float
    ratio_to_roofline: float
    stage_seconds: dict[str, float] | None
    engine_workers: int | None
    peak_anon_bytes: int
    memory_limit_bytes: int
    workers: int | None
    mode: str
    cache: str
    cache_resident_fraction: float | None
    notes: dict[str, Any] = field(default_factory=dict)


# -- synthetic inputs -------------------------------------------------------------------------


def size_label(params: str) -> str:
    """A directory-safe label for a size such as ``0.3B``."""
    return re.sub(r"[^0-9A-Za-z.]+", "_", params.strip())


def ensure_pair(
    workdir: Path, params: str, *, log: Callable[[str], None] | None = None
) -> tuple[Path, Path]:
    """A synthetic bf16 base and fine-tune of ``params`` parameters under ``workdir``.

    Reused when a previous run finished them (a ``.done`` marker next to them, written last,
    so a pair cut short by a crash is rebuilt rather than trusted).
    """
    from streamvec import synth

    label = size_label(params)
    base, ft = workdir / f"base-{label}", workdir / f"ft-{label}"
    done = workdir / f".pair-{label}.done"
    if done.is_file() and base.is_dir() and ft.is_dir():
        return base, ft
    for d in (base, ft):
        shutil.rmtree(d, ignore_errors=True)
    started = time.perf_counter()
    synth.build_checkpoint(base, params=params, dtype="bfloat16", shard_size="1GB", seed=0)
    synth.build_finetune(base, ft, rank=8, seed=1)
    done.write_text(json.dumps({"params": params}) + "\n")
    if log is not None:
        log(f"  built {base.name} + {ft.name} in {time.perf_counter() - started:.0f} s")
    return base, ft


def weight_files(*checkpoints: Path) -> list[Path]:
    """The tensor files of checkpoints (what a step reads)."""
    files: list[Path] = []
    for c in checkpoints:
        files.extend(sorted(c.glob("*.safetensors")) if c.is_dir() else [c])
    return files


def store_files(store: Path) -> list[Path]:
    """Every file of a Zarr store: a step reading the store reads these bytes."""
    return sorted(p for p in store.rglob("*") if p.is_file())


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- the page cache ---------------------------------------------------------------------------

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# A cold measurement may find at most this fraction of its inputs still cached after a drop.
COLD_RESIDENT_MAX = 0.05
WARM = "warm"


def _drop_all_caches() -> bool:
    """Drop the whole page cache (needs root and a writable /proc/sys); False if refused."""
    os.sync()  # only clean pages are dropped
    try:
        DROP_CACHES.write_text("1")
    except OSError:
        return False
    return True


def _fadvise_dontneed(files: Sequence[Path]) -> None:
    """Ask the kernel to drop the files' clean, unmapped pages (no root needed)."""
    os.sync()  # dirty pages would stay
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise StreamvecError(f"--cold: posix_fadvise failed on {f}: {exc}") from None
        finally:
            os.close(fd)


@functools.cache
def _libc() -> Any:
    """libc with mmap/mincore/munmap typed for ctypes; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _cached_pages(libc: Any, path: Path, page: int) -> int | None:
    """Pages of ``path`` in the page cache (mincore on a fresh map, which faults nothing in)."""
    import numpy as np

    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)  # the mapping outlives the descriptor
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    try:
        vec = (ctypes.c_ubyte * -(-size // page))()
        if libc.mincore(addr, size, vec) != 0:
            return None
        # Only bit 0 of each byte is defined: page resident.
        return int(np.count_nonzero(np.frombuffer(bytes(vec), dtype=np.uint8) & 1))
    finally:
        libc.munmap(addr, size)


def resident_fraction(files: Sequence[Path]) -> float | None:
    """Fraction of the files' pages now in the page cache; None where it cannot be told."""
    libc = _libc()
    if libc is None:
        return None
    page = mmap.PAGESIZE
    pages = cached = 0
    for f in files:
        n = _cached_pages(libc, f, page)
        if n is None:
            return None
        cached += n
        pages += -(-f.stat().st_size // page)
    return cached / pages if pages else 0.0


class PageCache:
    """Warm (inputs left in the page cache) or cold (evicted before each timed read).

    ``method`` is None when warm, else ``"drop_caches"`` or ``"fadvise"``.
    """

    def __init__(self, method: str | None = None) -> None:
        self.method = method

    @classmethod
    def cold(cls) -> PageCache:
        """The first eviction method this machine permits (drop_caches is tried by doing it).

        Raises:
            StreamvecError: neither method is available: a cold measurement cannot be made.
        """
        if _drop_all_caches():
            return cls("drop_caches")
        if hasattr(os, "posix_fadvise"):
            return cls("fadvise")
        raise StreamvecError(
            f"--cold: cannot drop the page cache here (writing {DROP_CACHES} is not permitted "
            "and os.posix_fadvise is unavailable); run without --cold"
        )

    @property
    def is_cold(self) -> bool:
        return self.method is not None

    def setting(self) -> str:
        """The mode asked for, before any check: ``warm`` or ``cold (METHOD)``."""
        return f"cold ({self.method})" if self.method else WARM

    def drop(self, files: Sequence[Path]) -> float | None:
        """Evict ``files`` when cold; the fraction still cached right after (None: warm).

        Raises:
            StreamvecError: the method worked when chosen and fails now.
        """
        if self.method is None:
            return None
        gc.collect()  # in-process runs: release maps of inputs the engine no longer holds
        if self.method == "drop_caches":
            if not _drop_all_caches():
                raise StreamvecError(f"--cold: writing {DROP_CACHES} stopped being permitted")
        else:
            _fadvise_dontneed(files)
        return resident_fraction(files)

    def label(self, resident: float | None) -> str:
        """What a record may claim, given the most of its inputs found cached after a drop."""
        if self.method is None:
            return WARM
        if resident is not None and resident > COLD_RESIDENT_MAX:
            return f"not cold ({self.method} left {resident:.0%} of the inputs cached)"
        return f"cold ({self.method})"


# -- rooflines --------------------------------------------------------------------------------


def read_roofline(files: Sequence[Path], repeat: int = 3, *, warm: bool = True) -> float:
    """GB/s of ``cat FILES > /dev/null``.

    Warm: one untimed read first, then the median of ``repeat`` timed reads: the rate the
    engine's own (warm) reads could at best reach, memory bandwidth through the page cache.
    ``warm=False``: one timed read and no warm-up, for a caller that has just evicted the
    files (the disk's sequential read rate).
    """
    cmd = ["cat", *map(str, files)]
    total = sum(f.stat().st_size for f in files)
    if warm:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    times = []
    for _ in range(repeat if warm else 1):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return total / statistics.median(times) / 1e9


def write_roofline(nbytes: int, directory: Path) -> tuple[float, float]:
    """GB/s of a plain write of ``nbytes`` to a new file: (with fdatasync, without).

    Written with ``os.write`` in 64 MiB pieces of random bytes (so no layer can shortcut
    zeros); the "without" figure is timed before the fdatasync and measures the page cache
    absorbing the data. The engine's outputs are made durable with ``os.sync()`` before they
    are renamed into place, so the fdatasync figure is the one to compare with. Pending
    writeback from earlier steps is flushed first so it is not billed to this write.
    """
    import numpy as np

    nbytes = max(int(nbytes), 1)
    rng = np.random.default_rng(0)
    piece = rng.integers(0, 256, min(nbytes, WRITE_CHUNK), dtype=np.uint8).tobytes()
    path = directory / ".write-roofline.bin"
    os.sync()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        left = nbytes
        while left:
            view = memoryview(piece)[: min(left, len(piece))]
            while view:
                n = os.write(fd, view)
                view, left = view[n:], left - n
        written = time.perf_counter() - start
        os.fdatasync(fd)
        synced = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return nbytes / synced / 1e9, nbytes / written / 1e9


def roofline_seconds(
    input_bytes: int, output_bytes: int, read_gbps: float, write_gbps: float
) -> float:
    """Seconds plain sequential I/O of a step's bytes takes: read its inputs, write its output."""
    return input_bytes / (read_gbps * 1e9) + output_bytes / (write_gbps * 1e9)


# -- the steps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One size's synthetic checkpoints and where its steps write."""

    workdir: Path
    label: str
    base: Path
    ft: Path

    def output(self, step: str) -> Path:
        return self.workdir / OUTPUT_NAMES[step].format(self.label)

    @property
    def tau(self) -> Path:
        return self.output("diff")


@dataclass(frozen=True)
class Engine:
    """Engine settings every step gets, fixed for the whole run so that runs compare."""

    memory_limit: int
    workers: int | None

    def flags(self) -> list[str]:
        flags = ["-q", "--memory-limit", str(self.memory_limit)]
        return flags + (["--workers", str(self.workers)] if self.workers else [])

    def kwargs(self) -> dict[str, Any]:
        return {"memory_limit": self.memory_limit, "workers": self.workers, "progress": False}


@dataclass(frozen=True)
class StepPlan:
    """One step, ready to run either way: as ``streamvec`` arguments or as a Python call."""

    name: str
    inputs: tuple[Path, ...]  # the files it reads; the read roofline reads exactly these
    output: Path
    cli: tuple[str, ...]  # streamvec arguments, without the engine flags
    run_here: Callable[[], Any]  # the same through the Python API; returns its report
    reports: bool  # the engine's RunReport (time per stage) is available


def _plan_diff(pair: Pair, engine: Engine) -> StepPlan:
    out = pair.tau

    def here() -> Any:
        from streamvec.ops.task_vector import task_vector

        return task_vector(pair.base, pair.ft).save(out, description="diff", **engine.kwargs())

    cli = ("diff", str(pair.base), str(pair.ft), "-o", str(out))
    return StepPlan("diff", tuple(weight_files(pair.base, pair.ft)), out, cli, here, True)


def _plan_edit(name: str, pair: Pair, engine: Engine) -> StepPlan:
    # base + 0.5 * tau, tau either from diff's store (the usual pipeline: diff once, combine
    # many; the store's read path) or from the fine-tuned checkpoint (no store at all).
    out = pair.output(name)
    term = pair.tau if name == "combine" else pair.ft
    inputs = weight_files(pair.base) + (
        store_files(term) if name == "combine" else weight_files(term)
    )

    def here() -> Any:
        from streamvec.ops.combine import TermSpec, combine_terms

        model = combine_terms([TermSpec(str(term), 0.5)], base=pair.base)
        return model.save(out, description="combine", **engine.kwargs())

    cli = ("combine", "--base", str(pair.base), f"{term}:0.5", "-o", str(out))
    return StepPlan(name, tuple(inputs), out, cli, here, True)


def _plan_svd(pair: Pair, engine: Engine) -> StepPlan:
    out = pair.output("svd")

    def here() -> Any:
        from streamvec.ops.svd import RunOptions, SVDOptions, svd

        return svd(
            pair.tau, out, options=SVDOptions(rank=SVD_RANK), run=RunOptions(**engine.kwargs())
        )

    cli = ("svd", str(pair.tau), "-o", str(out), "--rank", str(SVD_RANK))
    return StepPlan("svd", tuple(store_files(pair.tau)), out, cli, here, False)


def write_ties_recipe(pair: Pair) -> Path:
    """A mergekit-style TIES recipe merging the fine-tune onto the base, in the workdir."""
    import yaml

    recipe = {
        "merge_method": "ties",
        "base_model": str(pair.base),
        "models": [{"model": str(pair.ft), "parameters": {"weight": 1.0, "density": TIES_DENSITY}}],
        "parameters": {"normalize": True},
    }
    path = pair.workdir / f"ties-{pair.label}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _plan_merge(pair: Pair, engine: Engine) -> StepPlan:
    out = pair.output("merge")
    recipe = write_ties_recipe(pair)

    def here() -> Any:
        from streamvec.merge.api import merge
        from streamvec.merge.method import RunSettings

        return merge(recipe, out, settings=RunSettings(**engine.kwargs()))

    cli = ("merge", str(recipe), "-o", str(out))
    return StepPlan("merge", tuple(weight_files(pair.base, pair.ft)), out, cli, here, False)


def plan_step(name: str, pair: Pair, engine: Engine) -> StepPlan:
    """The plan of step ``name`` (store-reading steps list the store's files: plan after diff)."""
    if name == "diff":
        return _plan_diff(pair, engine)
    if name in ("combine", "combine-ckpt"):
        return _plan_edit(name, pair, engine)
    if name == "svd":
        return _plan_svd(pair, engine)
    if name == "merge":
        return _plan_merge(pair, engine)
    raise StreamvecError(f"unknown bench step {name!r}: choose from {', '.join(STEPS)}")


def steps_to_run(steps: Sequence[str]) -> list[str]:
    """The asked steps in run order, with diff added when a step reads its store."""
    wanted = set(steps) | ({"diff"} if NEEDS_STORE & set(steps) else set())
    return [s for s in STEPS if s in wanted]


def parse_steps(text: str) -> list[str]:
    """``--steps`` as a list; unknown names are a usage error (exit 2)."""
    steps = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise StreamvecError(
            f"--steps {text!r}: unknown step(s) {', '.join(bad) or '(none given)'}; "
            f"choose from {', '.join(STEPS)}"
        )
    return [s for s in STEPS if s in steps]


# -- running steps ----------------------------------------------------------------------------


@dataclass
class StepRun:
    seconds: float
    peak_anon_bytes: int
    # From the engine's RunReport: seconds, stage_seconds, workers (None without one).
    report: dict[str, Any] | None = None
    # The rooflines measured right around this run (see measure_step).
    read_gbps: float = 0.0
    write_gbps: float = 0.0
    write_nosync_gbps: float = 0.0
    load_average: float = 0.0
    # Cold: the most of the inputs still cached right after this run's drops.
    resident: float | None = None


def _report_fields(report: Mapping[str, Any]) -> dict[str, Any]:
    """What the benchmark keeps of a RunReport (or of its ``--report`` JSON)."""
    return {
        "seconds": float(report["seconds"]),
        "stage_seconds": {k: float(v) for k, v in report["stage_seconds"].items()},
        "workers": int(report["workers"]),
    }


def run_subprocess(args: Sequence[str], report: Path | None = None) -> StepRun:
    """Run ``streamvec ARGS`` as a child process; wall time and peak anonymous memory.

    The peak is sampled every 10 ms from ``/proc/PID/status`` of the child and its own
    children (dask process schedulers), so it is the whole job's anonymous memory. ``report``:
    the ``--report`` file the arguments ask for, read back (and removed) after the run.
    """
    from streamvec.memory import PeakSampler

    cmd = [sys.executable, "-m", "streamvec.cli", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakSampler(proc.pid, interval=0.01) as sampler:
        out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        # The child's last stderr line is its one-line reason (the CLI's error contract).
        lines = (err or out).strip().splitlines()
        reason = lines[-1] if lines else "no output"
        raise RuntimeError(f"`streamvec {' '.join(args)}` exited {proc.returncode}: {reason}")
    fields = None
    if report is not None:
        fields = _report_fields(json.loads(report.read_text()))
        report.unlink()
    return StepRun(seconds, sampler.peak, fields)


def run_in_process(fn: Callable[[], Any], reports: bool = False) -> StepRun:
    """Run ``fn`` here; wall time and this process's peak anonymous memory while it ran.

    ``reports``: ``fn`` returns the engine's RunReport, whose figures are kept.
    """
    from streamvec.memory import PeakSampler

    start = time.perf_counter()
    with PeakSampler(interval=0.01) as sampler:
        result = fn()
    seconds = time.perf_counter() - start
    return StepRun(seconds, sampler.peak, _report_fields(vars(result)) if reports else None)


def run_step(plan: StepPlan, engine: Engine, in_process: bool) -> StepRun:
    """One run of a step, as a subprocess (with ``--report`` where it has one) or here."""
    if in_process:
        return run_in_process(plan.run_here, plan.reports)
    report = plan.output.parent / f".report-{plan.output.name}.json" if plan.reports else None
    flags = ["--report", str(report)] if report is not None else []
    return run_subprocess([*plan.cli, *engine.flags(), *flags], report)


def _most(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _read_roofline_for(files: Sequence[Path], cache: PageCache) -> tuple[float, float | None]:
    """The read roofline as this run's cache mode sees it: (GB/s, fraction left cached)."""
    if not cache.is_cold:
        return read_roofline(files, repeat=1), None
    resident = cache.drop(files)
    return read_roofline(files, warm=False), resident


def measured_run(plan: StepPlan, engine: Engine, in_process: bool, cache: PageCache) -> StepRun:
    """One run of a step bracketed by its rooflines.

    Each run gets its own rooflines so that a change of machine load (the machine is shared)
    hits both sides of a ratio alike.
    """
    read_gbps, roof_resident = _read_roofline_for(plan.inputs, cache)
    shutil.rmtree(plan.output, ignore_errors=True)
    os.sync()  # writeback left by earlier work is not billed to this run
    run_resident = cache.drop(plan.inputs)
    load = os.getloadavg()[0]
    run = run_step(plan, engine, in_process)
    run.write_gbps, run.write_nosync_gbps = write_roofline(
        tree_bytes(plan.output), plan.output.parent
    )
    run.read_gbps, run.load_average = read_gbps, load
    run.resident = _most([roof_resident, run_resident])
    return run


def _logical_bytes(path: Path) -> int:
    """Uncompressed bytes of the arrays of a streamvec output (any Zarr store, e.g. SVD's)."""
    if not (path / "zarr.json").is_file():
        return tree_bytes(path)
    import math

    import numpy as np

    from streamvec.dtypes import OUTPUT_DTYPES

    total = 0
    for meta in path.rglob("zarr.json"):
        node = json.loads(meta.read_text())
        if node.get("node_type") == "array":
            dtype = np.dtype(OUTPUT_DTYPES.get(node["data_type"], node["data_type"]))
            total += math.prod(node["shape"]) * dtype.itemsize
    return total


def _median_run(runs: Sequence[StepRun]) -> StepRun:
    """The run whose time is the (lower) median: its report stands for the record."""
    return sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]


def _record(
    plan: StepPlan,
    size: str,
    params: int,
    runs: list[StepRun],
    engine: Engine,
    mode: str,
    cache: PageCache,
) -> StepResult:
    input_bytes = sum(f.stat().st_size for f in plan.inputs)
    output_bytes = tree_bytes(plan.output)
    seconds = statistics.median(r.seconds for r in runs)
    in_gbps = input_bytes / seconds / 1e9
    out_gbps = output_bytes / seconds / 1e9
    read_gbps = statistics.median(r.read_gbps for r in runs)
    write_gbps = statistics.median(r.write_gbps for r in runs)
    roof = roofline_seconds(input_bytes, output_bytes, read_gbps, write_gbps)
    typical = _median_run(runs)
    report = typical.report
    engine_seconds = report["seconds"] if report else None
    startup = _startup(typical, mode)
    resident = _most([r.resident for r in runs])
    return StepResult(
        step=plan.name,
        size=size,
        params=params,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        output_logical_bytes=_logical_bytes(plan.output),
        seconds=seconds,
        seconds_all=[round(r.seconds, 3) for r in runs],
        engine_seconds=engine_seconds,
        startup_seconds=startup,
        input_gbps=in_gbps,
        output_gbps=out_gbps,
        read_roofline_gbps=read_gbps,
        write_roofline_gbps=write_gbps,
        write_roofline_nosync_gbps=statistics.median(r.write_nosync_gbps for r in runs),
        ratio_input_to_read_roofline=in_gbps / read_gbps,
        ratio_output_to_write_roofline=out_gbps / write_gbps,
        roofline_seconds=roof,
        ratio_to_roofline=seconds / roof,
        stage_seconds=report["stage_seconds"] if report else None,
        engine_workers=report["workers"] if report else None,
        peak_anon_bytes=max(r.peak_anon_bytes for r in runs),
        memory_limit_bytes=engine.memory_limit,
        workers=engine.workers,
        mode=mode,
        cache=cache.label(resident),
        cache_resident_fraction=resident,
        notes=_notes(runs, input_bytes, output_bytes, mode),
    )


def _startup(run: StepRun, mode: str) -> float | None:
    """Subprocess wall time the engine's own clock did not see: start-up, imports, headers."""
    if mode != "subprocess" or run.report is None:
        return None
    return max(run.seconds - run.report["seconds"], 0.0)


def _notes(runs: Sequence[StepRun], input_bytes: int, output_bytes: int, mode: str) -> dict:
    """Every run's own figures, next to the medians the record shows."""

    def ratio(r: StepRun) -> float:
        roof = roofline_seconds(input_bytes, output_bytes, r.read_gbps, r.write_gbps)
        return round(r.seconds / roof, 4)

    return {
        "read_roofline_gbps_all": [round(r.read_gbps, 3) for r in runs],
        "write_roofline_gbps_all": [round(r.write_gbps, 3) for r in runs],
        "ratio_input_to_read_roofline_all": [
            round(input_bytes / r.seconds / 1e9 / r.read_gbps, 4) for r in runs
        ],
        "ratio_to_roofline_all": [ratio(r) for r in runs],
        "engine_seconds_all": [r.report["seconds"] if r.report else None for r in runs],
        "startup_seconds_all": [_startup(r, mode) for r in runs],
        "stage_seconds_all": [r.report["stage_seconds"] if r.report else None for r in runs],
        "peak_anon_bytes_all": [r.peak_anon_bytes for r in runs],
        "load_average_1min_all": [round(r.load_average, 2) for r in runs],
        "cache_resident_fraction_all": [r.resident for r in runs],
    }


def bench_size(
    workdir: Path,
    size: str,
    *,
    steps: Sequence[str] = STEPS,
    repeat: int = 1,
    memory_limit: int,
    workers: int | None = None,
    in_process: bool = False,
    cache: PageCache | None = None,
    keep_outputs: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> list[StepResult]:
    """Build (or reuse) the pair for ``size`` and measure each step against its rooflines.

    Records hold the medians over ``repeat`` runs and every run's figures under ``notes``.
    Outputs are deleted as soon as a step is measured unless ``keep_outputs`` (diff's store
    only once the steps reading it are done).
    """
    from streamvec.units import parse_param_count

    cache = cache or PageCache()
    base, ft = ensure_pair(workdir, size, log=log)
    pair = Pair(workdir, size_label(size), base, ft)
    engine = Engine(memory_limit, workers)
    mode = "in-process" if in_process else "subprocess"
    results: list[StepResult] = []
    try:
        for name in steps_to_run(steps):
            plan = plan_step(name, pair, engine)
            runs = []
            for i in range(repeat):
                run = measured_run(plan, engine, in_process, cache)
                runs.append(run)
                log(_run_line(pair.label, name, i, repeat, run))
            if name in steps:
                params = parse_param_count(size)
                results.append(_record(plan, size, params, runs, engine, mode, cache))
            if not keep_outputs and name != "diff":
                shutil.rmtree(plan.output, ignore_errors=True)
    finally:
        if not keep_outputs:
            shutil.rmtree(pair.tau, ignore_errors=True)
    return results


def _run_line(label: str, step: str, i: int, repeat: int, run: StepRun) -> str:
    return (
        f"  {label} {step} run {i + 1}/{repeat}: {run.seconds:.2f} s "
        f"(cat {run.read_gbps:.2f} GB/s, write {run.write_gbps:.2f} GB/s, "
        f"load {run.load_average:.1f})"
    )


# -- reporting --------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import numpy
    import psutil
    import zarr

    from streamvec import __version__

    vm = psutil.virtual_memory()
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": vm.total,
        "available_bytes": vm.available,
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "zarr": zarr.__version__,
        "streamvec": __version__,
    }


def _cell(value: float | None, fmt: str, width: int) -> str:
    """A table cell; ``-`` where a step has no such figure."""
    return f"{'-':>{width}}" if value is None else f"{value:{width}{fmt}}"


TABLE_LEGEND = (
    "roof s: plain sequential I/O of the same bytes here (inputs at cat's rate + output at "
    "the plain write's, fdatasync);\nx roofline = s / roof s (1.0 = this machine's I/O "
    "speed; target for diff and combine <= 1.25); start s: process start-up inside s."
)


def format_table(results: Sequence[StepResult]) -> str:
    """The results as a fixed-width text table, with a legend of its ratios."""
    head = (
        f"{'size':>6} {'step':>12} {'in GB':>6} {'out GB':>6} {'s':>6} {'start s':>7} "
        f"{'in GB/s':>8} {'out GB/s':>8} {'cat GB/s':>8} {'write GB/s':>10} {'roof s':>6} "
        f"{'x roofline':>10} {'peak anon':>10}  cache"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.size:>6} {r.step:>12} {r.input_bytes / 1e9:6.2f} {r.output_bytes / 1e9:6.2f} "
            f"{r.seconds:6.2f} {_cell(r.startup_seconds, '.2f', 7)} {r.input_gbps:8.3f} "
            f"{r.output_gbps:8.3f} {r.read_roofline_gbps:8.2f} {r.write_roofline_gbps:10.3f} "
            f"{r.roofline_seconds:6.2f} {r.ratio_to_roofline:10.2f} "
            f"{r.peak_anon_bytes / 2**20:6.0f} MiB  {r.cache}"
        )
    return "\n".join([*lines, "", TABLE_LEGEND])


def bench_data(results: Sequence[StepResult], settings: dict[str, Any]) -> dict[str, Any]:
    """What bench.json holds (``plots`` is filled in once they are written)."""
    return {
        "machine": machine_info(),
        "settings": settings,
        "result_fields": list(RESULT_FIELDS),
        "results": [asdict(r) for r in results],
        "plots": [],
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


PLOTS_MISSING = "plots skipped: matplotlib is not installed (pip install 'streamvec[bench]')"


def write_plots(json_path: Path, data: Mapping[str, Any]) -> list[str]:
    """PNGs next to the JSON (names of the files written); none without matplotlib."""
    from streamvec import bench_plots

    if not bench_plots.available():
        # Said even under --quiet: the plots asked for are not there.
        print(PLOTS_MISSING, file=sys.stderr)
        return []
    return bench_plots.write_plots(data, json_path.parent, prefix=json_path.stem)


def remove_pair(workdir: Path, size: str) -> None:
    """Delete the synthetic checkpoints of ``size`` (multi-GB) from ``workdir``."""
    label = size_label(size)
    shutil.rmtree(workdir / f"base-{label}", ignore_errors=True)
    shutil.rmtree(workdir / f"ft-{label}", ignore_errors=True)
    (workdir / f".pair-{label}.done").unlink(missing_ok=True)
    (workdir / f"ties-{label}.yaml").unlink(missing_ok=True)


def run_bench(
    sizes: Sequence[str],
    *,
    workdir: Path | None = None,
    json_path: Path | None = None,
    steps: Sequence[str] = STEPS,
    repeat: int = 1,
    memory_limit: str | int | None = None,
    workers: int | None = None,
    in_process: bool = False,
    cold: bool = False,
    plots: bool = True,
    keep: bool = False,
    quiet: bool = False,
) -> list[StepResult]:
    """Benchmark every size; print the table; write the results JSON and the plots.

    Args:
        sizes: parameter counts such as ``["0.3B", "1B"]``.
        workdir: where checkpoints and outputs go; pairs a previous ``keep`` run left there
            are reused (default: a new temporary directory under /tmp).
        json_path: where to write the results (default ``./bench.json``); plots go next to it.
        steps: names from :data:`STEPS` (diff runs anyway when a step reads its store).
        repeat: runs per step; the table shows the median time.
        memory_limit: passed to the engine (default: what the engine would pick, fixed here
            so it is known and the same for every run).
        workers: passed to the engine (default: its own, the CPU count).
        in_process: run the steps through the Python API here instead of subprocesses.
        cold: evict the inputs from the page cache before every run and every read roofline
            (:class:`PageCache`); raises StreamvecError where no method is permitted.
        plots: write PNG plots next to the JSON (skipped, with one line, without matplotlib).
        keep: keep checkpoints and outputs for the next run; otherwise each size's multi-GB
            files are deleted as soon as it is measured, and a temporary workdir after.
        quiet: print nothing (but a missing matplotlib).
    """
    from streamvec.memory import default_memory_limit
    from streamvec.units import parse_size

    def log(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    cache = PageCache.cold() if cold else PageCache()
    temporary = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="streamvec-bench-", dir="/tmp"))
    wd.mkdir(parents=True, exist_ok=True)
    limit = parse_size(memory_limit) if memory_limit is not None else default_memory_limit()
    json_path = Path(json_path or "bench.json")
    results: list[StepResult] = []
    try:
        for size in sizes:
            log(f"size {size} ({cache.setting()} cache):")
            try:
                results += bench_size(
                    wd,
                    size,
                    steps=steps,
                    repeat=repeat,
                    memory_limit=limit,
                    workers=workers,
                    in_process=in_process,
                    cache=cache,
                    keep_outputs=keep,
                    log=log,
                )
            finally:
                if not keep:
                    remove_pair(wd, size)
        settings = {
            "sizes": list(sizes),
            "steps": list(steps),
            "repeat": repeat,
            "memory_limit_bytes": limit,
            "workers": workers,
            "mode": "in-process" if in_process else "subprocess",
            "cache": cache.setting(),
            "cold_method": cache.method,
            "workdir": str(wd),
            "command": sys.argv,
        }
        data = bench_data(results, settings)
        # JSON and table first: a plotting failure loses no figure.
        write_json(json_path, data)
        log("")
        log(format_table(results))
        log(f"\nresults: {json_path}")
        if plots:
            data["plots"] = write_plots(json_path, data)
            write_json(json_path, data)
            log("plots: " + ", ".join(data["plots"]) if data["plots"] else "no plots")
    finally:
        if temporary and not keep:
            shutil.rmtree(wd, ignore_errors=True)
    return results


# -- command line -----------------------------------------------------------------------------

QUICK_SIZE = "0.1B"


def _step_lines() -> str:
    """The steps and what each does, wrapped for ``--help``."""
    return "\n".join(
        textwrap.fill(
            STEP_HELP[name],
            width=94,
            initial_indent=f"  {name:<13} ",
            subsequent_indent=" " * 16,
        )
        for name in STEPS
    )


DESCRIPTION = f"""\
Measures streamvec's operations on synthetic bf16 Llama-shaped checkpoints (built in --workdir,
or reused there) next to this machine's own I/O, measured in the same run around each step.

steps (--steps, default all, run in this order):
{_step_lines()}
  combine and svd read diff's store, so diff runs whenever one of them is asked for.

the table, per step (medians over --repeat runs):
  in GB/s, out GB/s  bytes read (each input file once) and bytes left on disk, per wall second
  cat GB/s           `cat` of the same input files: warm cache after one warm-up read, or with
                     --cold right after evicting them (then it is the disk's read rate)
  write GB/s         a plain write of as many bytes as the step wrote, with fdatasync
  roof s             inputs at cat's rate + output at the plain write's rate: how long plain
                     sequential I/O of the step's bytes takes on this machine
  x roofline         s / roof s: 1.0 runs at this machine's I/O speed, 3.0 takes three times
                     as long; the target for diff and combine is <= 1.25. Steps that make
                     several passes over their inputs (svd, merge) pay for each.
  start s            wall time the engine's own clock did not see (interpreter start-up,
                     imports, opening headers); subprocess steps with a --report only
  peak anon          RssAnon+RssShmem+VmSwap of the step and its children, sampled every 10 ms
  cache              warm, or cold (drop_caches | fadvise), checked with mincore afterwards

Writes bench.json (every figure of every run) and PNG plots next to it: input throughput and
peak memory against model size, and where the time went (read, compute, encode, write,
checksum per block; finish; start-up). Absolute times on a shared machine are indicative;
ratios measured side by side are the figures to use (docs/benchmarks.md).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``streamvec bench`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="throughput and memory of each operation, next to the machine's own I/O",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--size",
        action="append",
        metavar="PARAMS",
        help="model size, e.g. 1B (repeatable, or comma-separated; default 1B)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"one {QUICK_SIZE} pair (unless --size), one run of each step: under two minutes "
        "on a loaded 2-core machine",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where to write bench.json and the plots (default: here)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="checkpoints and outputs (default: a temporary directory under /tmp); "
        "checkpoints left there by --keep are reused",
    )
    p.add_argument(
        "--repeat", type=int, default=None, metavar="N", help="runs per step (default 3; 1 quick)"
    )
    p.add_argument(
        "--steps",
        default=",".join(STEPS),
        metavar="LIST",
        help=f"comma-separated steps to measure (default all: {','.join(STEPS)})",
    )
    p.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="passed to every step (default: the engine's, half the available RAM, fixed "
        "once so every step gets the same)",
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="passed to every step (default: CPU count)"
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the steps through the Python API in this process, not as subprocesses "
        "(no start-up in the times; peak memory then includes this process's own)",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="evict the inputs from the page cache before every run and every read roofline: "
        "/proc/sys/vm/drop_caches where permitted (root; drops the whole machine's cache), "
        "else posix_fadvise DONTNEED per input file; records say which, and are labelled "
        "'not cold' if more than 5%% of the inputs stayed cached",
    )
    p.add_argument(
        "--no-plots", action="store_true", help="write bench.json and the table, but no PNGs"
    )
    p.add_argument("--keep", action="store_true", help="keep the multi-GB checkpoints and outputs")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=cmd_bench)
    return p


def _sizes(args: argparse.Namespace) -> list[str]:
    given = [s.strip() for arg in args.size or [] for s in arg.split(",") if s.strip()]
    return given or ([QUICK_SIZE] if args.quick else ["1B"])


def cmd_bench(args: argparse.Namespace) -> int:
    repeat = args.repeat or (1 if args.quick else 3)
    steps = parse_steps(args.steps)
    if repeat < 1:
        raise StreamvecError("--repeat must be at least 1")
    run_bench(
        _sizes(args),
        workdir=args.workdir,
        json_path=(args.out or Path.cwd()) / "bench.json",
        steps=steps,
        repeat=repeat,
        memory_limit=args.memory_limit,
        workers=args.workers,
        in_process=args.in_process,
        cold=args.cold,
        plots=not args.no_plots,
        keep=args.keep,
        quiet=args.quiet,
    )
    return 0
