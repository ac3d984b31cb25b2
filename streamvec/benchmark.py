"""``streamvec bench``: the engine's throughput and memory next to the machine's own I/O.

Every figure that matters is a ratio measured side by side in one run: the engine's input
rate against ``cat`` of the same files (warm page cache, after one warm-up read: the read
roofline), and its output rate against a plain write of the same number of bytes (the write
roofline, with and without ``fdatasync``). Absolute times on a shared machine are indicative
only. Peak memory is ``RssAnon + RssShmem + VmSwap`` of the engine process and its children,
sampled every 10 ms (:class:`streamvec.memory.PeakSampler`): page-cache pages of the inputs
are not counted, because the kernel can drop them.

The steps run as ``streamvec`` subprocesses by default (a fresh process per step, as a user
runs it; the time includes interpreter start-up) or in-process through the Python API
(``task_vector(...).save`` and ``combine_terms(...).save``).

Results JSON (``bench.json`` under ``--out``) holds ``machine``, ``settings`` and
``results``, one record per (size, step) with the fields listed in :data:`RESULT_FIELDS`.

The synthetic checkpoints are :mod:`streamvec.synth` pairs: bf16 Llama-shaped weights and a
fine-tune whose delta is low-rank plus noise. They are not real fine-tunes, and their deltas
compress differently from real ones (2.0x with lz4+bitshuffle here; the design brief cites
2.6x for real bf16 deltas, not measured in this project).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# What each result record holds (the test and docs/benchmarks.md rely on these names).
RESULT_FIELDS = (
    "step",  # "diff" or "combine"
    "size",  # the size label asked for, e.g. "1B"
    "params",  # parameters of the synthetic model
    "input_bytes",  # bytes the step reads (all inputs)
    "output_bytes",  # bytes the step left on disk (compressed for Zarr)
    "output_logical_bytes",  # bytes of the result's tensors, uncompressed
    "seconds",  # median wall time of the step
    "seconds_all",  # every repeat's wall time
    "input_gbps",  # input_bytes / seconds / 1e9
    "output_gbps",  # output_bytes / seconds / 1e9
    "read_roofline_gbps",  # cat of the same input files to /dev/null, warm
    "write_roofline_gbps",  # plain write of output_bytes + fdatasync
    "write_roofline_nosync_gbps",  # the same write, timed before fdatasync
    "ratio_input_to_read_roofline",  # input_gbps / read_roofline_gbps
    "ratio_output_to_write_roofline",  # output_gbps / write_roofline_gbps
    "peak_anon_bytes",  # max over repeats of the sampled peak RssAnon+RssShmem+VmSwap
    "memory_limit_bytes",  # --memory-limit given to the engine
    "workers",  # --workers given to the engine (None: its default, the CPU count)
    "mode",  # "subprocess" or "in-process"
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
    input_gbps: float
    output_gbps: float
    read_roofline_gbps: float
    write_roofline_gbps: float
    write_roofline_nosync_gbps: float
    ratio_input_to_read_roofline: float
    ratio_output_to_write_roofline: float
    peak_anon_bytes: int
    memory_limit_bytes: int
    workers: int | None
    mode: str
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


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- rooflines --------------------------------------------------------------------------------


def read_roofline(files: Sequence[Path], repeat: int = 3) -> float:
    """GB/s of ``cat FILES > /dev/null`` with a warm page cache (median of ``repeat``).

    One untimed read first warms the cache, so this is the rate the engine's own (warm) reads
    could at best reach: memory bandwidth through the page cache, no disk.
    """
    cmd = ["cat", *map(str, files)]
    total = sum(f.stat().st_size for f in files)
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    times = []
    for _ in range(repeat):
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


# -- running steps ----------------------------------------------------------------------------


@dataclass
class StepRun:
    seconds: float
    peak_anon_bytes: int
    # The rooflines measured right around this run (see bench_size).
    read_gbps: float = 0.0
    write_gbps: float = 0.0
    write_nosync_gbps: float = 0.0
    load_average: float = 0.0


def run_subprocess(args: Sequence[str]) -> StepRun:
    """Run ``streamvec ARGS`` as a child process; wall time and peak anonymous memory.

    The peak is sampled every 10 ms from ``/proc/PID/status`` of the child and its own
    children (dask process schedulers), so it is the whole job's anonymous memory.
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
    return StepRun(seconds, sampler.peak)


def run_in_process(fn: Callable[[], object]) -> StepRun:
    """Run ``fn`` here; wall time and this process's peak anonymous memory while it ran."""
    from streamvec.memory import PeakSampler

    start = time.perf_counter()
    with PeakSampler(interval=0.01) as sampler:
        fn()
    return StepRun(time.perf_counter() - start, sampler.peak)


def _engine_flags(memory_limit: int, workers: int | None) -> list[str]:
    flags = ["-q", "--memory-limit", str(memory_limit)]
    return flags + (["--workers", str(workers)] if workers else [])


def _diff_step(
    base: Path, ft: Path, out: Path, memory_limit: int, workers: int | None, in_process: bool
) -> StepRun:
    if not in_process:
        flags = _engine_flags(memory_limit, workers)
        return run_subprocess(["diff", str(base), str(ft), "-o", str(out), *flags])
    from streamvec.ops.task_vector import task_vector

    return run_in_process(
        lambda: task_vector(base, ft).save(
            out, progress=False, memory_limit=memory_limit, workers=workers, description="diff"
        )
    )


def _combine_step(
    base: Path, tau: Path, out: Path, memory_limit: int, workers: int | None, in_process: bool
) -> StepRun:
    # The edited model base + 0.5 * tau, tau read back from the diff's store: the usual
    # pipeline (diff once, combine many) and the store's read path in one step.
    if not in_process:
        flags = _engine_flags(memory_limit, workers)
        return run_subprocess(
            ["combine", "--base", str(base), f"{tau}:0.5", "-o", str(out), *flags]
        )
    from streamvec.ops.combine import TermSpec, combine_terms

    return run_in_process(
        lambda: combine_terms([TermSpec(str(tau), 0.5)], base=base).save(
            out, progress=False, memory_limit=memory_limit, workers=workers, description="combine"
        )
    )


def _logical_bytes(path: Path) -> int:
    """Uncompressed bytes of the tensors of a streamvec output."""
    import math

    from streamvec.io.zarr_store import is_zarr_store, read_store

    if is_zarr_store(path):
        store = read_store(path)
        return sum(math.prod(a.shape) * a.dtype.itemsize for a in store.arrays.values())
    return tree_bytes(path)


def _record(
    step: str,
    size: str,
    params: int,
    input_files: list[Path],
    output: Path,
    runs: list[StepRun],
    memory_limit: int,
    workers: int | None,
    mode: str,
) -> StepResult:
    input_bytes = sum(f.stat().st_size for f in input_files)
    output_bytes = tree_bytes(output)
    seconds = statistics.median(r.seconds for r in runs)
    in_gbps = input_bytes / seconds / 1e9
    out_gbps = output_bytes / seconds / 1e9
    read_gbps = statistics.median(r.read_gbps for r in runs)
    write_gbps = statistics.median(r.write_gbps for r in runs)
    return StepResult(
        step=step,
        size=size,
        params=params,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        output_logical_bytes=_logical_bytes(output),
        seconds=seconds,
        seconds_all=[round(r.seconds, 3) for r in runs],
        input_gbps=in_gbps,
        output_gbps=out_gbps,
        read_roofline_gbps=read_gbps,
        write_roofline_gbps=write_gbps,
        write_roofline_nosync_gbps=statistics.median(r.write_nosync_gbps for r in runs),
        ratio_input_to_read_roofline=in_gbps / read_gbps,
        ratio_output_to_write_roofline=out_gbps / write_gbps,
        peak_anon_bytes=max(r.peak_anon_bytes for r in runs),
        memory_limit_bytes=memory_limit,
        workers=workers,
        mode=mode,
        notes={
            "read_roofline_gbps_all": [round(r.read_gbps, 3) for r in runs],
            "write_roofline_gbps_all": [round(r.write_gbps, 3) for r in runs],
            "ratio_input_to_read_roofline_all": [
                round(input_bytes / r.seconds / 1e9 / r.read_gbps, 4) for r in runs
            ],
            "peak_anon_bytes_all": [r.peak_anon_bytes for r in runs],
            "load_average_1min_all": [round(r.load_average, 2) for r in runs],
        },
    )


def bench_size(
    workdir: Path,
    size: str,
    *,
    steps: Sequence[str] = ("diff", "combine"),
    repeat: int = 1,
    memory_limit: int,
    workers: int | None = None,
    in_process: bool = False,
    keep_outputs: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> list[StepResult]:
    """Build (or reuse) the pair for ``size`` and measure each step against its rooflines.

    Every run is bracketed by its rooflines (``cat`` of the same input files just before,
    a plain write of the same number of bytes just after), so ratios compare like with like
    under the same machine load; the record holds the medians and every run's figures.
    """
    from streamvec.units import parse_param_count

    base, ft = ensure_pair(workdir, size, log=log)
    mode = "in-process" if in_process else "subprocess"
    label = size_label(size)
    tau = workdir / f"tau-{label}.zarr"
    edited = workdir / f"edited-{label}"
    results: list[StepResult] = []
    # combine reads the diff's store, so the diff runs whenever combine is asked for.
    todo = ["diff", *(["combine"] if "combine" in steps else [])]
    runner: Callable[[Path, Path, Path, int, int | None, bool], StepRun]
    for step in todo:
        if step == "diff":
            inputs, out, src, runner = weight_files(base, ft), tau, ft, _diff_step
        else:
            # The store is a directory of chunk files; the roofline reads exactly those bytes.
            chunks = sorted(p for p in tau.rglob("*") if p.is_file())
            inputs, out, src, runner = weight_files(base) + chunks, edited, tau, _combine_step
        runs = []
        for i in range(repeat):
            # Each run is bracketed by its own rooflines, so that a change of machine load
            # (the machine is shared) hits both sides of a ratio alike.
            read_gbps = read_roofline(inputs, repeat=1)
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # writeback left by earlier work is not billed to this run
            load = os.getloadavg()[0]
            run = runner(base, src, out, memory_limit, workers, in_process)
            run.write_gbps, run.write_nosync_gbps = write_roofline(tree_bytes(out), workdir)
            run.read_gbps, run.load_average = read_gbps, load
            runs.append(run)
            log(
                f"  {label} {step} run {i + 1}/{repeat}: {run.seconds:.2f} s "
                f"(cat {read_gbps:.2f} GB/s, write {run.write_gbps:.2f} GB/s, load {load:.1f})"
            )
        if step in steps:
            params = parse_param_count(size)
            results.append(
                _record(step, size, params, inputs, out, runs, memory_limit, workers, mode)
            )
    if not keep_outputs:
        for out in (tau, edited):
            shutil.rmtree(out, ignore_errors=True)
    return results


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


def format_table(results: Sequence[StepResult]) -> str:
    """The results as a fixed-width text table."""
    head = (
        f"{'size':>6} {'step':>8} {'in GB':>6} {'s':>6} {'in GB/s':>8} {'cat GB/s':>9} "
        f"{'eng/cat':>8} {'out GB/s':>9} {'write GB/s':>11} {'out/write':>10} "
        f"{'peak anon':>10} {'mem limit':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.size:>6} {r.step:>8} {r.input_bytes / 1e9:6.2f} {r.seconds:6.2f} "
            f"{r.input_gbps:8.3f} {r.read_roofline_gbps:9.2f} "
            f"{r.ratio_input_to_read_roofline:8.3f} {r.output_gbps:9.3f} "
            f"{r.write_roofline_gbps:11.3f} {r.ratio_output_to_write_roofline:10.2f} "
            f"{r.peak_anon_bytes / 2**20:7.0f} MiB {r.memory_limit_bytes / 2**30:6.1f} GiB"
        )
    return "\n".join(lines)


def write_json(path: Path, results: Sequence[StepResult], settings: dict[str, Any]) -> None:
    data = {
        "machine": machine_info(),
        "settings": settings,
        "result_fields": list(RESULT_FIELDS),
        "results": [asdict(r) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def remove_pair(workdir: Path, size: str) -> None:
    """Delete the synthetic checkpoints of ``size`` (multi-GB) from ``workdir``."""
    label = size_label(size)
    shutil.rmtree(workdir / f"base-{label}", ignore_errors=True)
    shutil.rmtree(workdir / f"ft-{label}", ignore_errors=True)
    (workdir / f".pair-{label}.done").unlink(missing_ok=True)


def run_bench(
    sizes: Sequence[str],
    *,
    workdir: Path | None = None,
    json_path: Path | None = None,
    steps: Sequence[str] = ("diff", "combine"),
    repeat: int = 1,
    memory_limit: str | int | None = None,
    workers: int | None = None,
    in_process: bool = False,
    keep: bool = False,
    quiet: bool = False,
) -> list[StepResult]:
    """Benchmark every size; print the table; write the results JSON.

    Args:
        sizes: parameter counts such as ``["0.3B", "1B"]``.
        workdir: where checkpoints and outputs go; pairs a previous ``keep`` run left there
            are reused (default: a new temporary directory under /tmp).
        json_path: where to write the results (default ``./bench.json``).
        steps: ``diff`` and/or ``combine``.
        repeat: runs per step; the table shows the median time.
        memory_limit: passed to the engine (default: what the engine would pick, fixed here
            so it is known and the same for every run).
        workers: passed to the engine (default: its own, the CPU count).
        in_process: run the steps through the Python API here instead of subprocesses.
        keep: keep checkpoints and outputs for the next run; otherwise each size's multi-GB
            files are deleted as soon as it is measured, and a temporary workdir after.
        quiet: print nothing.
    """
    from streamvec.memory import default_memory_limit
    from streamvec.units import parse_size

    def log(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    temporary = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="streamvec-bench-", dir="/tmp"))
    wd.mkdir(parents=True, exist_ok=True)
    limit = parse_size(memory_limit) if memory_limit is not None else default_memory_limit()
    json_path = Path(json_path or "bench.json")
    results: list[StepResult] = []
    try:
        for size in sizes:
            log(f"size {size}:")
            try:
                results += bench_size(
                    wd,
                    size,
                    steps=steps,
                    repeat=repeat,
                    memory_limit=limit,
                    workers=workers,
                    in_process=in_process,
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
            "workdir": str(wd),
            "command": sys.argv,
        }
        write_json(json_path, results, settings)
        log("")
        log(format_table(results))
        log(f"\nresults: {json_path}")
    finally:
        if temporary and not keep:
            shutil.rmtree(wd, ignore_errors=True)
    return results


# -- command line -----------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``streamvec bench`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="throughput and memory of diff and combine, next to the machine's own I/O",
        description="Builds (or reuses) synthetic bf16 checkpoints, runs diff and combine, "
        "and measures in the same run the read roofline (cat of the inputs, warm cache) and "
        "the write roofline (a plain write of the same bytes, with fdatasync). Prints input "
        "and output GB/s, their ratios to the rooflines and the peak anonymous memory "
        "(RssAnon+RssShmem+VmSwap sampled every 10 ms), and writes bench.json.",
    )
    p.add_argument(
        "--size", action="append", metavar="PARAMS", help="model size, e.g. 1B (repeatable)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="one 0.1B pair, one run of each step (~15 s on a 2-core machine)",
    )
    p.add_argument(
        "--out", type=Path, metavar="DIR", help="where to write bench.json (default: here)"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="checkpoints and outputs (default: a temporary directory under /tmp); "
        "checkpoints left there by --keep are reused",
    )
    p.add_argument("--repeat", type=int, default=None, metavar="N", help="runs per step")
    p.add_argument("--steps", default="diff,combine", help="diff,combine (default both)")
    p.add_argument("--memory-limit", metavar="SIZE", help="passed to the engine")
    p.add_argument("--workers", type=int, metavar="N", help="passed to the engine")
    p.add_argument(
        "--in-process", action="store_true", help="run the steps here, not as subprocesses"
    )
    p.add_argument("--keep", action="store_true", help="keep the multi-GB checkpoints and outputs")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
    return p


QUICK_SIZE = "0.1B"


def cmd_bench(args: argparse.Namespace) -> int:
    from streamvec.errors import StreamvecError

    sizes = args.size or ([QUICK_SIZE] if args.quick else ["1B"])
    repeat = args.repeat or (1 if args.quick else 3)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in ("diff", "combine")]
    if bad or not steps:
        raise StreamvecError(f"--steps {args.steps!r}: use diff, combine or diff,combine")
    if repeat < 1:
        raise StreamvecError("--repeat must be at least 1")
    run_bench(
        sizes,
        workdir=args.workdir,
        json_path=(args.out or Path.cwd()) / "bench.json",
        steps=steps,
        repeat=repeat,
        memory_limit=args.memory_limit,
        workers=args.workers,
        in_process=args.in_process,
        keep=args.keep,
        quiet=args.quiet,
    )
    return 0
