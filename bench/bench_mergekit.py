"""streamvec ``combine`` against mergekit's ``task_arithmetic`` on the same inputs, same run.

Builds (or reuses) a synthetic bf16 Llama-shaped base and three fine-tunes of it, then runs

* ``streamvec combine --base BASE -o OUT ft1:W1 ft2:W2 ft3:W3`` (default options), and
* ``mergekit-yaml cfg.yaml OUT --no-copy-tokenizer`` with ``merge_method: task_arithmetic``,
  ``dtype: bfloat16`` (the usual way to write the config; mergekit then *computes* in bf16:
  each ``ft_i - base``, the weights themselves (0.3 becomes 0.30078125), the products and the
  sums are rounded to bf16),
* unless ``--no-f32-variant``, mergekit again with ``dtype: float32`` and
  ``out_dtype: bfloat16``: the same merge computed in float32 and rounded once, which is what
  streamvec does, so any difference left is the tools' and not the precision they were given,

as subprocesses, alternating the order across repeats. Each run gets its wall time, the time
of an ``os.sync()`` right after it (streamvec fdatasyncs its output before exiting, mergekit
does not, so ``wall+sync`` is the like-for-like figure) and its peak anonymous memory
(``RssAnon + RssShmem + VmSwap`` of the process and its children, sampled every 10 ms; file
pages of memory maps are page cache and do not count). The inputs are read once before every
run so each tool starts with them in the page cache.

The outputs are then compared tensor by tensor (read through ``safetensors.safe_open`` with the
numpy framework) with each other and with a float64 numpy reference
``base + sum_i w_i (ft_i - base)``: ulp distance in bf16, elements differing, elements not the
correctly rounded reference, max abs difference.

    PYTHONPATH=. python bench/bench_mergekit.py --mergekit /tmp/mk-venv/bin/mergekit-yaml \\
        [--params 0.3B] [--workdir DIR] [--keep] [--repeat 3]

mergekit is optional: without ``--mergekit`` the script looks for ``mergekit-yaml`` on PATH and,
failing that, runs streamvec alone. Install it away from the system Python, e.g.
``python3 -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install torch==2.13.0 mergekit==0.1.5``
(CPU torch first, or pip pulls the CUDA build).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# ml_dtypes must be imported before safetensors' numpy loader sees a BF16 tensor: importing it
# registers the "bfloat16" numpy dtype name that safe_open(framework="numpy") looks up.
import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python bench/bench_mergekit.py` from anywhere
    sys.path.insert(0, str(REPO))

from safetensors import safe_open  # noqa: E402

from streamvec.memory import PeakSampler  # noqa: E402
from streamvec.tools.synth import build_checkpoint, build_finetune  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
BF16_MANTISSA_BITS = 7
BF16_MIN_EXP = -126  # smallest normal exponent (bf16 shares float32's exponent range)

STREAMVEC = "streamvec"
MK_BF16 = "mergekit"  # dtype: bfloat16, as most configs write it
MK_F32 = "mergekit-f32"  # dtype: float32, out_dtype: bfloat16
MK_FLAGS = ["--no-copy-tokenizer"]  # the synthetic tokenizer_config.json is a placeholder

SEEDS = (1, 2, 3)
INPUT_SHARD = "256MB"  # several input shards, as real checkpoints have


# --------------------------------------------------------------------------------------------
# bf16 ulp arithmetic


def bf16_ulp(ref: np.ndarray) -> np.ndarray:
    """Unit in the last place of bf16 in the binade of each (float64) reference value.

    ``|x| = m * 2**e`` with ``0.5 <= m < 1`` (np.frexp), so the binade is ``[2**(e-1), 2**e)``
    and its spacing is ``2**(e - 1 - 7)``. Below the smallest normal (and at zero) the spacing
    is the subnormal one, ``2**(-126 - 7)``.
    """
    ref = np.asarray(ref, dtype=np.float64)
    _, e = np.frexp(np.abs(ref))
    exp = np.where(ref == 0, BF16_MIN_EXP, np.maximum(e.astype(np.int64) - 1, BF16_MIN_EXP))
    return np.ldexp(1.0, exp - BF16_MANTISSA_BITS)


def ulp_distance(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``|x - ref|`` in bf16 ulps of ``ref``'s binade (float64; inf where only one is finite)."""
    x64 = np.asarray(x, dtype=np.float64)
    r64 = np.asarray(ref, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        dist = np.abs(x64 - r64) / bf16_ulp(np.where(np.isfinite(r64), r64, 0.0))
    both_same = (x64 == r64) | (np.isnan(x64) & np.isnan(r64))  # equal infs give nan above
    return np.where(both_same, 0.0, np.where(np.isfinite(dist), dist, np.inf))


def round_to_bf16(ref: np.ndarray) -> np.ndarray:
    """Round float64 to the nearest bf16 value (ties to even), returned as float64.

    Done by hand because a float64 -> bf16 cast may go through float32 and round twice.
    ``ref / ulp`` is exact (ulp is a power of two), np.rint rounds half to even, and a value
    that rounds up to the next binade lands exactly on its power of two. Finite inputs only
    (bf16 overflow is not handled; weights are nowhere near it).
    """
    ulp = bf16_ulp(ref)
    return np.rint(ref / ulp) * ulp


def _self_test_ulp() -> None:
    """Guards the helpers against off-by-one-binade mistakes before any number is reported."""
    bits = np.array(1.0, BF16).view(np.uint16) + np.uint16(1)
    next_after_one = float(bits.view(BF16))
    assert next_after_one == 1.0 + 2.0**-7
    assert bf16_ulp(np.array([1.0]))[0] == 2.0**-7
    assert bf16_ulp(np.array([1.0 - 2.0**-8]))[0] == 2.0**-8  # top of the binade below 1
    assert bf16_ulp(np.array([-3.0]))[0] == 2.0**-6
    assert bf16_ulp(np.array([0.0]))[0] == 2.0**-133
    assert ulp_distance(np.array([next_after_one]), np.array([1.0]))[0] == 1.0
    assert ulp_distance(np.array([np.inf]), np.array([np.inf]))[0] == 0.0
    assert ulp_distance(np.array([np.inf]), np.array([1.0]))[0] == np.inf
    assert round_to_bf16(np.array([1.0 + 2.0**-8]))[0] == 1.0  # tie -> even mantissa
    assert round_to_bf16(np.array([1.0 + 3 * 2.0**-8]))[0] == 1.0 + 2 * 2.0**-7  # tie -> even
    assert round_to_bf16(np.array([1.0 + 2.0**-8 + 2.0**-40]))[0] == next_after_one
    samples = np.random.default_rng(0).normal(0, 0.02, 10_000)
    # For float32-representable inputs the ml_dtypes cast is a single rounding: must agree.
    samples = samples.astype(np.float32).astype(np.float64)
    assert np.array_equal(round_to_bf16(samples), samples.astype(BF16).astype(np.float64))


# --------------------------------------------------------------------------------------------
# inputs


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ensure_inputs(inputs: Path, params: str) -> tuple[dict[str, Path], bool]:
    """Build base + three fine-tunes under ``inputs``, or reuse a complete earlier build.

    Returns:
        ``({"base": .., "ft1": .., ...}, built)`` where ``built`` says whether this call wrote
        them (and so may delete them at the end).
    """
    paths = {"base": inputs / "base", **{f"ft{s}": inputs / f"ft{s}" for s in SEEDS}}
    marker = inputs / "inputs.json"
    wanted = {"params": params, "seeds": list(SEEDS), "dtype": "bfloat16", "shard": INPUT_SHARD}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        print(f"reusing inputs in {inputs}")
        return paths, False
    # A partial or different build: start over, a mixed set would make the comparison moot.
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    start = time.perf_counter()
    print(f"building a {params} bf16 base and {len(SEEDS)} fine-tunes in {inputs} ...")
    build_checkpoint(paths["base"], params=params, dtype="bfloat16", shard_size=INPUT_SHARD)
    for s in SEEDS:
        build_finetune(paths["base"], paths[f"ft{s}"], seed=s)
    marker.write_text(json.dumps(wanted) + "\n")
    print(f"  built in {time.perf_counter() - start:.0f} s")
    return paths, True


def warm_cache(dirs: Sequence[Path]) -> None:
    """Read every input file once so each timed run starts with the same warm page cache."""
    buf = bytearray(16 << 20)
    for d in dirs:
        for p in sorted(d.glob("*.safetensors")):
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


# --------------------------------------------------------------------------------------------
# the tools


@dataclass
class Tool:
    name: str
    command: list[str]  # with {out} where the output directory goes
    env: dict[str, str] | None = None
    notes: str = ""


@dataclass
class Run:
    tool: str
    repeat: int
    position: int  # 0 = ran first in its repeat
    rc: int
    wall_s: float
    sync_s: float
    peak_anon: int
    loadavg_before: float
    out_bytes: int
    out_files: list[str] = field(default_factory=list)


def mergekit_yaml(paths: dict[str, Path], weights: Sequence[float], compute_dtype: str) -> str:
    """A task_arithmetic config; lambda and normalize left to mergekit's defaults."""
    lines = [
        "merge_method: task_arithmetic",
        f"base_model: {paths['base']}",
        "models:",
    ]
    for s, w in zip(SEEDS, weights, strict=True):
        lines += [f"  - model: {paths[f'ft{s}']}", "    parameters:", f"      weight: {w!r}"]
    lines.append(f"dtype: {compute_dtype}")
    if compute_dtype != "bfloat16":
        lines.append("out_dtype: bfloat16")
    return "\n".join(lines) + "\n"


def mergekit_facts(mergekit: Path) -> dict[str, Any]:
    """Version, torch build and task_arithmetic's parameter defaults, asked of mergekit's own
    interpreter (read from the entry script's shebang) so they describe what actually ran."""
    shebang = mergekit.read_text(errors="replace").splitlines()[0]
    python = shebang[2:].strip() if shebang.startswith("#!") else ""
    if not python or not Path(python.split()[0]).exists():
        return {"python": None, "error": f"no interpreter in shebang {shebang!r}"}
    probe = (
        "import json, importlib.metadata as m, torch\n"
        "from mergekit.merge_methods import get\n"
        "spec = get('task_arithmetic').spec\n"
        "d = {p.name: p.default for p in spec.parameters if p.name != 'weight'}\n"
        "print(json.dumps({'mergekit': m.version('mergekit'), 'torch': torch.__version__,\n"
        "    'torch_threads': torch.get_num_threads(), 'task_arithmetic_defaults': d}))\n"
    )
    res = subprocess.run(
        [*python.split(), "-c", probe], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        return {"python": python, "error": res.stderr.strip().splitlines()[-1:]}
    return {"python": python, **json.loads(res.stdout.strip().splitlines()[-1])}


def startup_cost(command: list[str], env: dict[str, str] | None) -> dict[str, float]:
    """Wall time and peak anonymous memory of ``--help``: what every run pays for its imports
    before it touches a tensor (mergekit imports torch and transformers)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with PeakSampler(proc.pid, interval=0.01) as sampler:
        proc.wait()
    return {"seconds": time.perf_counter() - start, "peak_anon": sampler.peak}


def run_once(tool: Tool, out: Path, log: Path, inputs: Sequence[Path]) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    warm_cache(inputs)
    os.sync()  # no dirty pages from the previous run left to flush on this run's clock
    load = os.getloadavg()[0]
    cmd = [part.replace("{out}", str(out)) for part in tool.command]
    with open(log, "w") as logf:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=tool.env)
        with PeakSampler(proc.pid, interval=0.01) as sampler:
            rc = proc.wait()
        wall = time.perf_counter() - start
    start = time.perf_counter()
    os.sync()
    sync = time.perf_counter() - start
    files = sorted(p.name for p in out.glob("*.safetensors")) if out.is_dir() else []
    return Run(
        tool=tool.name,
        repeat=0,
        position=0,
        rc=rc,
        wall_s=wall,
        sync_s=sync,
        peak_anon=sampler.peak,
        loadavg_before=load,
        out_bytes=sum((out / f).stat().st_size for f in files),
        out_files=files,
    )


def run_all(
    tools: list[Tool],
    outs: dict[str, Path],
    inputs: Sequence[Path],
    repeat: int,
    workdir: Path,
    failed: set[str],
) -> list[Run]:
    """``repeat`` rounds of every tool; a tool that fails once is left out after (``failed``)."""
    runs: list[Run] = []
    for r in range(repeat):
        # Alternate the order so neither tool always runs right after the other's writes.
        order = tools if r % 2 == 0 else tools[::-1]
        for pos, tool in enumerate(order):
            if tool.name in failed:
                continue
            log = workdir / f"{tool.name}-{r}.log"
            run = run_once(tool, outs[tool.name], log, inputs)
            run.repeat, run.position = r, pos
            runs.append(run)
            print(
                f"repeat {r} {tool.name:13s} rc {run.rc} wall {run.wall_s:6.2f} s "
                f"sync {run.sync_s:5.2f} s peak anon {_gb(run.peak_anon)} "
                f"load {run.loadavg_before:.2f}"
            )
            if run.rc != 0:
                failed.add(tool.name)
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"  {tool.name} failed; last lines of {log}:\n    " + "\n    ".join(tail))
    return runs


# --------------------------------------------------------------------------------------------
# comparison


def tensors_of(directory: Path) -> dict[str, Path]:
    """Tensor name -> shard file, for any safetensors layout (index or not)."""
    where: dict[str, Path] = {}
    for p in sorted(directory.glob("*.safetensors")):
        with safe_open(p, framework="numpy") as f:
            for k in f.keys():
                where[k] = p
    return where


def load(where: dict[str, Path], name: str) -> np.ndarray:
    with safe_open(where[name], framework="numpy") as f:
        return f.get_tensor(name)


# Terms of the float32 accumulation (base and three fine-tunes); see cancellation_allowance.
NTERMS = 1 + len(SEEDS)
# Upper edges of the ulp histogram bins: 0, (0, 1], (1, 2], (2, 4], ... and a last open bin.
HIST_EDGES = np.array([0.0, 1.0, 2.0, 4.0, 8.0, 16.0])
HIST_LABELS = ["0", "<=1", "<=2", "<=4", "<=8", "<=16", ">16"]


@dataclass
class Stats:
    """Running counts and worst cases of one comparison (``x`` against ``ref``) over all tensors.

    Distances are in bf16 ulps of ``ref``'s binade; ``ref`` is the correctly rounded float64
    reference, or the other tool's output. Where the terms cancel to (near) zero no ulp scale
    is meaningful (an exact 0 has ulp 2**-133), so elements whose absolute difference is within
    the float32 accumulation allowance (see :func:`cancellation_allowance`) are counted apart:
    ``*_outside`` figures leave them out (the project's tests judge streamvec the same way).
    ``histogram_outside`` counts those distances in the bins of :data:`HIST_LABELS`.
    """

    elements: int = 0
    differing: int = 0
    over_1ulp: int = 0
    max_ulp: float = 0.0
    over_1ulp_outside: int = 0
    max_ulp_outside: float = 0.0
    max_ulp_outside_tensor: str = ""
    max_abs: float = 0.0  # against the exact float64 value, or the other output
    histogram_outside: list[int] = field(default_factory=lambda: [0] * len(HIST_LABELS))

    def add(
        self, name: str, x: np.ndarray, ref: np.ndarray, exempt: np.ndarray, exact: np.ndarray
    ) -> None:
        """Fold in one tensor: ``exempt`` marks cancellation elements, ``exact`` is what the
        absolute difference is measured against (the float64 value, or the other output)."""
        d = ulp_distance(x, ref)
        # An identical element is a 0-ulp match, not a cancellation, whatever its size.
        outside = d[~(exempt & (x != ref))]
        self.elements += x.size
        self.differing += int(np.count_nonzero(x != ref))
        self.over_1ulp += int(np.count_nonzero(d > 1.0))
        self.max_ulp = max(self.max_ulp, float(d.max(initial=0.0)))
        self.over_1ulp_outside += int(np.count_nonzero(outside > 1.0))
        worst = float(outside.max(initial=0.0))
        if worst > self.max_ulp_outside:
            self.max_ulp_outside, self.max_ulp_outside_tensor = worst, name
        self.max_abs = max(self.max_abs, float(np.abs(x - exact).max(initial=0.0)))
        bins = np.searchsorted(HIST_EDGES, outside, side="left")
        counts = np.bincount(bins, minlength=len(HIST_LABELS))
        self.histogram_outside = [
            a + int(b) for a, b in zip(self.histogram_outside, counts, strict=True)
        ]


def cancellation_allowance(
    base: np.ndarray, fts: Sequence[np.ndarray], weights: Sequence[float]
) -> np.ndarray:
    """``NTERMS * 2**-24 * (|base| + sum_i |w_i| (|ft_i| + |base|))``: what float32 rounding
    may cost an evaluation of the formula whichever way it is arranged.

    docs/task-arithmetic.md ("Precision") states streamvec's tighter bound, with magnitude
    ``sum_i |c_i x_i|`` of its own form ``(1 - sum w) base + sum w_i ft_i``. mergekit evaluates
    ``base + sum w_i (ft_i - base)``, whose products are bounded by ``|w_i| |ft_i - base|``, not
    ``|w_i ft_i|``: an allowance fitted to one tool's arrangement would fail the other on
    exact cancellations (seen: exact 0, mergekit in float32 gave 2**-30). This one covers both
    and is still ~2**-20 of the operands, far below bf16 resolution at their scale.
    """
    magnitude = np.abs(base).copy()
    for w, ft in zip(weights, fts, strict=True):
        magnitude += abs(w) * (np.abs(ft) + np.abs(base))
    return NTERMS * 2.0**-24 * magnitude


def compare(
    outputs: dict[str, Path], paths: dict[str, Path], weights: Sequence[float]
) -> dict[str, Any]:
    """Every output against the float64 reference, and streamvec against every mergekit output.

    The float64 reference is computed on whole tensors, on all of them (cheap at this size),
    with the weights exactly as given (0.3, not its bf16 or float32 rounding), then rounded
    once to bf16. Tool against tool uses mergekit's value as the ulp reference and twice the
    cancellation allowance (each side may carry its own).
    """
    base_map = tensors_of(paths["base"])
    ft_maps = [tensors_of(paths[f"ft{s}"]) for s in SEEDS]
    out_maps = {tool: tensors_of(d) for tool, d in outputs.items()}
    names = sorted(base_map)
    result: dict[str, Any] = {"tensors_in_base": len(names), "only_in_base": {}}
    for tool, m in out_maps.items():
        result["only_in_base"][tool] = sorted(set(names) - set(m))
        extra = sorted(set(m) - set(names))
        if extra:
            result.setdefault("not_in_base", {})[tool] = extra
    vs_ref = {tool: Stats() for tool in outputs}
    pairs = [t for t in outputs if t != STREAMVEC] if STREAMVEC in outputs else []
    vs_sv = {tool: Stats() for tool in pairs}
    passthrough: dict[str, list[str]] = {tool: [] for tool in outputs}
    for name in names:
        base = load(base_map, name)
        present = {t: load(m, name) for t, m in out_maps.items() if name in m}
        for t, x in present.items():
            if x.shape != base.shape or x.dtype != base.dtype:
                raise SystemExit(
                    f"{t}: {name} is {x.dtype}{x.shape}, base {base.dtype}{base.shape}"
                )
        if base.dtype != BF16 and not np.issubdtype(base.dtype, np.floating):
            # int buffers: the formula does not apply, they must come through unchanged
            for t, x in present.items():
                if not np.array_equal(x, base):
                    passthrough[t].append(name)
            continue
        b64 = base.astype(np.float64)
        fts = [load(m, name).astype(np.float64) for m in ft_maps]
        exact = b64.copy()
        for w, ft in zip(weights, fts, strict=True):
            exact += w * (ft - b64)
        rounded = round_to_bf16(exact)
        allowance = cancellation_allowance(b64, fts, weights)
        del fts
        got = {t: x.astype(np.float64) for t, x in present.items()}
        for t, x64 in got.items():
            # ulps from the correctly rounded value; cancellation judged against the exact one
            exempt = np.abs(x64 - exact) <= allowance
            vs_ref[t].add(name, x64, rounded, exempt, exact)
        if STREAMVEC in got:
            sv = got[STREAMVEC]
            for t in pairs:
                if t in got:
                    exempt = np.abs(sv - got[t]) <= 2 * allowance
                    vs_sv[t].add(name, sv, got[t], exempt, got[t])
    result["vs_float64_reference"] = {t: asdict(s) for t, s in vs_ref.items()}
    result["streamvec_vs_mergekit"] = {t: asdict(s) for t, s in vs_sv.items()}
    result["nonfloat_changed"] = passthrough
    return result


# --------------------------------------------------------------------------------------------
# report


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _median(values: Iterator[float] | list[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


def summarize(runs: list[Run], tools: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for t in tools:
        ok = [r for r in runs if r.tool == t and r.rc == 0]
        if not ok:
            continue
        out[t] = {
            "runs": len(ok),
            "wall_s_median": _median([r.wall_s for r in ok]),
            "wall_s_min": min(r.wall_s for r in ok),
            "wall_s_max": max(r.wall_s for r in ok),
            "wall_sync_s_median": _median([r.wall_s + r.sync_s for r in ok]),
            "peak_anon_median": _median([r.peak_anon for r in ok]),
            "peak_anon_max": max(r.peak_anon for r in ok),
            "out_bytes": ok[-1].out_bytes,
            "out_files": len(ok[-1].out_files),
        }
    return out


def print_report(summary: dict[str, dict[str, float]], cmp: dict[str, Any] | None) -> list[str]:
    lines = [
        "| tool | runs | wall s (median) | wall s (min-max) | wall+sync s (median) "
        "| peak anon (median) | peak anon (max) | output |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, s in summary.items():
        lines.append(
            f"| {t} | {s['runs']:.0f} | {s['wall_s_median']:.2f} | "
            f"{s['wall_s_min']:.2f}-{s['wall_s_max']:.2f} | {s['wall_sync_s_median']:.2f} | "
            f"{_gb(s['peak_anon_median'])} | {_gb(s['peak_anon_max'])} | "
            f"{s['out_files']:.0f} file(s), {_gb(s['out_bytes'])} |"
        )
    sv = summary.get(STREAMVEC)
    if sv and len(summary) > 1:
        lines += ["", "| streamvec / X | time (wall) | time (wall+sync) | peak anon memory |"]
        lines.append("|---|---|---|---|")
        for t, s in summary.items():
            if t == STREAMVEC:
                continue
            lines.append(
                f"| {t} | {sv['wall_s_median'] / s['wall_s_median']:.3f} | "
                f"{sv['wall_sync_s_median'] / s['wall_sync_s_median']:.3f} | "
                f"{sv['peak_anon_median'] / s['peak_anon_median']:.3f} |"
            )
    if cmp:
        lines += [
            "",
            "| comparison | elements | differing | > 1 ulp | > 1 ulp, not cancellation "
            "| max ulp, not cancellation | max abs diff |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, key in (
            ("{t} vs float64 ref", "vs_float64_reference"),
            ("streamvec vs {t}", "streamvec_vs_mergekit"),
        ):
            for t, s in cmp[key].items():
                lines.append(
                    f"| {label.format(t=t)} | {s['elements']} | {s['differing']} | "
                    f"{s['over_1ulp']} | {s['over_1ulp_outside']} | "
                    f"{s['max_ulp_outside']:.3g} | {s['max_abs']:.3g} |"
                )
        lines += ["", "ulp distances outside cancellation: " + " / ".join(HIST_LABELS)]
        for label, key in (
            ("{t} vs float64 ref", "vs_float64_reference"),
            ("streamvec vs {t}", "streamvec_vs_mergekit"),
        ):
            for t, s in cmp[key].items():
                counts = " / ".join(str(c) for c in s["histogram_outside"])
                lines.append(f"- {label.format(t=t)}: {counts}")
    print("\n".join(lines))
    return lines


# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="0.3B", help="size of each checkpoint (default 0.3B)")
    p.add_argument("--workdir", type=Path, help="default: /tmp/streamvec-bench-mergekit-PARAMS")
    p.add_argument("--keep", action="store_true", help="keep inputs and outputs (GBs)")
    p.add_argument("--mergekit", type=Path, help="mergekit-yaml (default: the one on PATH)")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool (default 3)")
    p.add_argument("--weights", default="0.3,0.3,0.3", help="w1,w2,w3 (default 0.3,0.3,0.3)")
    p.add_argument(
        "--f32-variant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run mergekit with dtype float32 / out_dtype bfloat16 (default: yes)",
    )
    p.add_argument("--json", type=Path, help="results file (default: WORKDIR/results.json)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.weights = [float(w) for w in args.weights.split(",")]
    if len(args.weights) != len(SEEDS):
        p.error(f"--weights takes {len(SEEDS)} comma-separated numbers")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _self_test_ulp()
    workdir: Path = args.workdir or Path(f"/tmp/streamvec-bench-mergekit-{args.params}")
    workdir.mkdir(parents=True, exist_ok=True)
    paths, built = ensure_inputs(workdir / "inputs", args.params)

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    terms = [f"{paths[f'ft{s}']}:{w!r}" for s, w in zip(SEEDS, args.weights, strict=True)]
    sv_cmd = [sys.executable, "-m", "streamvec.cli", "combine", "--base", str(paths["base"])]
    tools = [Tool(STREAMVEC, [*sv_cmd, "-o", "{out}", *terms], env, "default options")]

    mergekit = args.mergekit or (Path(w) if (w := shutil.which("mergekit-yaml")) else None)
    facts: dict[str, Any] = {}
    if mergekit is None or not mergekit.is_file():
        print(
            "mergekit-yaml not found (give --mergekit PATH, e.g. a venv's bin/mergekit-yaml): "
            "running streamvec alone"
        )
    else:
        facts = mergekit_facts(mergekit)
        print(f"mergekit: {mergekit} {json.dumps(facts)}")
        d = facts.get("task_arithmetic_defaults", {})
        # With normalize off and lambda 1 task_arithmetic is base + sum w_i (ft_i - base), the
        # formula streamvec computes with --scale 1; say so, or say it is not.
        same = d.get("normalize") is False and d.get("lambda") == 1.0
        print(
            f"task_arithmetic defaults normalize={d.get('normalize')} lambda={d.get('lambda')}: "
            + ("same formula as streamvec combine" if same else "NOT the formula streamvec uses")
        )
        variants = [(MK_BF16, "bfloat16")] + ([(MK_F32, "float32")] if args.f32_variant else [])
        for name, compute in variants:
            cfg = workdir / f"{name}.yaml"
            cfg.write_text(mergekit_yaml(paths, args.weights, compute))
            note = f"dtype {compute}" + ("" if compute == "bfloat16" else ", out_dtype bfloat16")
            tools.append(Tool(name, [str(mergekit), str(cfg), "{out}", *MK_FLAGS], None, note))

    startup = {STREAMVEC: startup_cost([sys.executable, "-m", "streamvec.cli", "--help"], env)}
    if mergekit is not None and mergekit.is_file():
        startup["mergekit"] = startup_cost([str(mergekit), "--help"], None)
    print(
        "startup (--help): "
        + ", ".join(f"{k} {v['seconds']:.2f} s, {_gb(v['peak_anon'])}" for k, v in startup.items())
    )

    inputs = list(paths.values())
    outs = {t.name: workdir / f"out-{t.name}" for t in tools}
    failed: set[str] = set()
    try:
        runs = run_all(tools, outs, inputs, args.repeat, workdir, failed)

        summary = summarize(runs, [t.name for t in tools])
        print("comparing outputs tensor by tensor against each other and a float64 reference ...")
        done = {t: d for t, d in outs.items() if t in summary and t not in failed}
        cmp = compare(done, paths, args.weights) if done else None
        print()
        table = print_report(summary, cmp)
        if cmp:
            for t, names in cmp["only_in_base"].items():
                if names:
                    print(f"note: {t} output lacks {len(names)} tensor(s) of the base: {names}")
            for t, names in cmp["nonfloat_changed"].items():
                if names:
                    print(f"note: {t} changed non-float tensor(s): {names}")

        result = {
            "params": args.params,
            "weights": args.weights,
            "repeat": args.repeat,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "inputs": {k: str(v) for k, v in paths.items()},
            "input_bytes_each": _dir_size(paths["base"]),
            "tools": {t.name: {"command": t.command, "notes": t.notes} for t in tools},
            "mergekit": facts,
            "mergekit_flags": MK_FLAGS,
            "startup": startup,
            "runs": [asdict(r) for r in runs],
            "summary": summary,
            "comparison": cmp,
            "table": table,
        }
        json_path: Path = args.json or workdir / "results.json"
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nresults: {json_path}")
    finally:
        # Multi-GB outputs (and inputs this run built) go even when the run fails half-way.
        if not args.keep:
            for d in outs.values():
                shutil.rmtree(d, ignore_errors=True)
            if built:  # inputs kept by an earlier --keep run are the user's to delete
                shutil.rmtree(workdir / "inputs", ignore_errors=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
