"""Where the per-element time of ``streamvec stats`` goes, and what other kernels would buy.

Measurements on a base and fine-tune(s) (``streamvec synth``), each printing figures
measured side by side in one run, in interleaved rounds:

- ``ops``: the numpy slab loop that :mod:`streamvec.ops.stats.kernel` replaced, taken apart
  call by call on one tensor (one thread, BLAS on one thread), in CPU ns per element of the
  tensor (the thread's CPU time, each step's fastest round); the same operations in torch;
  and the compiled loop as it runs (:class:`~streamvec.ops.stats.fused.FusedStat`);
- ``alternatives``: other numpy routes to the float64 sums (BLAS ``dsdot``, ``einsum``,
  ``vecdot``, ...) and to the bf16 widening, with the error of each sum;
- ``jit``: what the compiled loop costs each run (``import numba``, loading its cached code,
  the first call), in fresh processes, the first without numba's cache (compiling);
- ``slabs``: ``sv.stats`` on one thread with slabs of 2^14 to 2^18 elements per operand;
- ``sample``: CPU of the top-set thresholds of every tensor, against ``--before OLD``, and
  per tensor size one ``pread`` per run against one ``pread`` of the runs' whole span;
- ``glue``: CPU per slab at 64-element slabs (the fixed cost of a slab) and at 64K;
- ``gil``: whether each numpy call of the loop releases the GIL (a Python loop in the main
  thread stalls for the whole of a call that holds it);
- ``overlap``: the slab loop on 8 tensors in one thread, then in two, with a control (BLAS
  ``ddot`` in two threads, which releases the GIL): whether the two workers run at once.

    PYTHONPATH=. python bench/bench_stats_kernels.py ops BASE FT [FT...] [--rounds 5]

``bench/bench_stats.py --before OLD`` times the whole pass against an earlier tree.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from streamvec.compute.linalg.blas import limit_blas_threads
from streamvec.dtypes import BFLOAT16
from streamvec.io.blocks import matrix_shape
from streamvec.ops.stats import fused, kernel, stats
from streamvec.ops.stats.inputs import TensorTerms, open_inputs
from streamvec.ops.stats.slabs import SlabReader, pread_into, read_runs

_ABS = np.uint32(0x7FFFFFFF)
_HERE = Path(__file__).resolve().parent


def _tensor(args: argparse.Namespace) -> TensorTerms:
    inputs = open_inputs([str(f) for f in args.fts], base=args.base)
    return next(t for t in inputs.tensors if t.name == args.tensor)


def ops(args: argparse.Namespace) -> None:
    """Per call of the numpy slab loop the compiled one replaced, torch's equivalents, and the
    compiled loop as it runs."""
    import torch

    torch.set_num_threads(1)
    t = _tensor(args)
    rows, cols = matrix_shape(t.shape)
    size, n, slab = rows * cols, len(t.coefs), fused.SLAB
    thr = np.full(n, np.float32(1e-3).view(np.uint32), np.uint32)
    acc: dict[str, float] = defaultdict(float)
    t32, bits = np.empty((n, slab), np.float32), np.empty((n, slab), np.uint32)
    t64, b64 = np.empty((n, slab)), np.empty(slab)
    masks = np.empty((n, slab), np.bool_)
    # each vector FT - BASE (the inputs this mode takes): its two operands
    idx, _, _, sub = fused.plan_arrays(t.coefs, len(t.readers))
    assert sub.all(), "ops takes fine-tunes and their base"
    clock = time.thread_time  # CPU time of this thread: time preempted by others left out

    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    steps: list[tuple[str, Callable[[list[np.ndarray], int], object]]] = [
        ("task vectors (subtract)", lambda o, w: [np.subtract(o[a], o[b], out=t32[i, :w]) for i, (a, b) in enumerate(idx[:, :2])]),  # noqa: E501
        ("|t| bits (and)", lambda o, w: np.bitwise_and(t32[:, :w].view(np.uint32), _ABS, out=bits[:, :w])),  # noqa: E501
        ("max", lambda o, w: bits[:, :w].max(axis=1)),
        ("zeros (count_nonzero)", lambda o, w: [np.count_nonzero(bits[i, :w]) for i in range(n)]),
        ("float64 copy of t", lambda o, w: np.copyto(t64[:, :w], t32[:, :w])),
        ("Gram (ddot per pair)", lambda o, w: [np.dot(t64[i, :w], t64[j, :w]) for i, j in pairs]),
        ("|t| Gram (abs, ddot)", lambda o, w: [np.dot(abs(t64[i, :w]), abs(t64[j, :w])) for i, j in pairs if i < j]),  # noqa: E501
        ("float64 copy of base", lambda o, w: np.copyto(b64[:w], o[t.base])),
        ("||base||^2 (ddot)", lambda o, w: np.dot(b64[:w], b64[:w])),
        ("top-set masks (>=)", lambda o, w: np.greater_equal(bits[:, :w], thr[:, None], out=masks[:, :w])),  # noqa: E501
        ("top-set counts", lambda o, w: [np.count_nonzero(masks[i, :w] & masks[j, :w]) for i, j in pairs]),  # noqa: E501
    ]  # fmt: skip

    def numpy_loop() -> None:
        with SlabReader(t.readers, 0, rows, slab) as rd:
            for s0 in range(0, size, slab):
                w = min(size, s0 + slab) - s0
                c = clock()
                o = rd.load(s0, s0 + w)
                c1 = clock()
                acc["read: pread + bf16 widening"] += c1 - c
                for name, fn in steps:
                    c = clock()
                    fn(o, w)
                    c1 = clock()
                    acc[name] += c1 - c

    tt: dict[str, float] = defaultdict(float)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(slab).astype(np.float32))
    r16 = torch.from_numpy((x.numpy().view(np.uint32) >> 16).astype(np.uint16).view(np.int16))
    x64, ibits = torch.empty(slab, dtype=torch.float64), torch.empty(slab, dtype=torch.int32)
    steps_t: list[tuple[str, Callable[[], object]]] = [
        ("bf16 widening alone", lambda: r16.view(torch.bfloat16).float()),
        ("task vectors (subtract)", lambda: torch.sub(x, x)),
        ("|t| bits (and)", lambda: torch.bitwise_and(x.view(torch.int32), 0x7FFFFFFF, out=ibits)),
        ("max", lambda: ibits.max()),
        ("zeros (count_nonzero)", lambda: torch.count_nonzero(ibits)),
        ("float64 copy of t", lambda: x64.copy_(x)),
        ("Gram (ddot per pair)", lambda: torch.dot(x64, x64)),
        ("top-set masks (>=)", lambda: ibits >= 1000),
        ("top-set counts", lambda: (ibits >= 1000).sum()),
    ]
    per_t = size // slab * max(1, n)  # calls per tensor, as in the slab loop

    def torch_ops() -> None:
        for name, fn in steps_t:
            c = clock()
            for _ in range(per_t):
                fn()
            tt[name] += clock() - c

    nk: dict[str, float] = defaultdict(float)
    stat = fused.FusedStat(t.shape, t.readers, t.coefs, t.base)
    stat(0, min(rows, 8), thr)  # import numba, load (or compile) the compiled loop

    # per step, the least disturbed round (the machine is shared)
    best: list[dict[str, float]] = [{}, {}, {}]
    with limit_blas_threads(1):
        for _ in range(args.rounds):
            for d in (acc, tt, nk):
                d.clear()
            numpy_loop()
            torch_ops()
            c = clock()
            stat(0, rows, thr)
            nk["compiled loop (FusedStat), pread included"] += clock() - c
            for b, d in zip(best, (acc, tt, nk), strict=True):
                for k, v in d.items():
                    b[k] = min(b.get(k, v), v)
    acc, tt, nk = (defaultdict(float, b) for b in best)
    scale = 1e9 / size
    print(
        f"{t.name} {t.shape}, {n} task vector(s), {len(t.readers)} operands, slab {slab}, "
        f"{args.rounds} rounds, load {os.getloadavg()[0]:.1f}; ns per element of the tensor, "
        "thread CPU time, each step's fastest round"
    )
    print(f"{'step':<34} {'numpy':>7} {'torch':>7}")
    for name in [*acc, *(k for k in tt if k not in acc)]:
        nv = f"{acc[name] * scale:7.3f}" if name in acc else "      -"
        tv = f"{tt[name] * scale:7.3f}" if name in tt else "      -"
        print(f"{name:<34} {nv} {tv}")
    print(f"{'sum of the steps':<34} {sum(acc.values()) * scale:7.3f}")
    for name, s in nk.items():
        print(f"{name:<34} {s * scale:7.3f}")


def jit(args: argparse.Namespace) -> None:
    """What the compiled loop costs each run: ``import numba``, then loading the cached
    code and the first call (fresh processes; the first run without numba's cache: compiling)."""
    code = (
        "import sys, time; s = time.perf_counter(); import numba; a = time.perf_counter(); "
        "import numpy as np; from streamvec.ops.stats import kernel as k; "
        "z = np.zeros; k.slab_sums(z((2, 64), np.uint16), np.uint32(16), 64, "
        "np.array([[1, 0]]), np.array([[1, -1]], np.float32), np.array([2]), "
        "np.array([True]), 0, True, z(1, np.uint32), z((0, 0), np.int64), z((1, 1)), "
        "z((1, 1)), z(1, np.uint32), z(1, np.int64), z((1, 1), np.int64), z(1)); "
        "b = time.perf_counter(); print(a - s, b - a)"
    )
    cache = Path(kernel.__file__).parent / "__pycache__"
    for r in range(args.rounds):
        cold = r == 0  # the first run compiles: numba's cache of the loop removed
        if cold:
            for f in cache.glob("kernel.*.nb[ic]"):
                f.unlink()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        imp, first = map(float, out.stdout.split())
        what = "compile (no cache)" if cold else "cached code load"
        print(f"run {r + 1}: import numba {imp:.2f} s, {what} + first call {first:.2f} s")


def overlap(args: argparse.Namespace) -> None:
    """The slab loop on 8 tensors in one thread and in two, with a ddot control."""
    inputs = open_inputs([str(f) for f in args.fts], base=args.base)
    ts = [t for t in inputs.tensors if ".mlp." in t.name][:8]
    sts = [fused.FusedStat(t.shape, t.readers, t.coefs, t.base) for t in ts]
    thr = np.full(len(ts[0].coefs), np.float32(1e-3).view(np.uint32), np.uint32)
    vecs = [np.random.default_rng(k).standard_normal(1 << 16) for k in range(8)]

    def slab_loop(k: int) -> None:
        sts[k](0, matrix_shape(sts[k].shape)[0], thr)

    def ddot(k: int) -> None:
        for _ in range(2000):
            np.dot(vecs[k], vecs[k])

    variants: dict[str, Callable[[], object]] = {}
    for name, fn in (("slab loop", slab_loop), ("ddot control", ddot)):
        variants[f"{name}, 1 thread"] = lambda fn=fn: [fn(k) for k in range(8)]  # type: ignore[misc]
        variants[f"{name}, 2 threads"] = lambda fn=fn: list(ThreadPoolExecutor(2).map(fn, range(8)))  # type: ignore[misc]
    with limit_blas_threads(1):
        _interleave(variants, args.rounds, "8 MLP tensors")


def slabs(args: argparse.Namespace) -> None:
    """``sv.stats`` (one thread, default settings) with slabs of 2^14 to 2^18 elements."""
    fts = [str(f) for f in args.fts]
    default = fused.SLAB

    def run(slab: int) -> None:
        fused.SLAB = slab
        try:
            stats(fts, base=args.base, scheduler="sync")
        finally:
            fused.SLAB = default

    variants: dict[str, Callable[[], object]] = {
        f"slab 2^{b}": (lambda b=b: run(1 << b))
        for b in (16, 14, 15, 17, 18)  # type: ignore[misc]
    }
    with limit_blas_threads(1):
        _interleave(variants, args.rounds, "one thread (scheduler sync)")


def alternatives(args: argparse.Namespace) -> None:
    """Other ways to the float64 sums and the widening, on one 64K slab (one thread): CPU ns
    per element, fastest of 5 rounds, and how far each sum is from the exact one."""
    import ctypes
    import glob

    w = fused.SLAB
    rng = np.random.default_rng(0)
    raw = (rng.standard_normal(w).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    t = rng.standard_normal(w).astype(np.float32) * np.float32(1e-3)
    x, wide = np.empty(w), np.empty(w, np.uint32)
    exact = math.fsum((t.astype(np.float64) ** 2).tolist())  # products exact in float64
    found = glob.glob(os.path.dirname(np.__file__) + ".libs/libscipy_openblas64_*.so")
    dsdot = None
    if found:  # numpy's bundled OpenBLAS: float32 inputs, float64 result
        dsdot = ctypes.CDLL(found[0]).scipy_cblas_dsdot64_
        dsdot.restype = ctypes.c_double
        dsdot.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
        dsdot.argtypes += [ctypes.c_void_p, ctypes.c_int64]
    sums: dict[str, Callable[[], Any]] = {
        "float64 copy + ddot (as now)": lambda: (np.copyto(x, t), np.dot(x, x))[1],
        "add.reduce(t * t, dtype=float64)": lambda: np.add.reduce(t * t, dtype=np.float64),
        "einsum(dtype=float64)": lambda: np.einsum("i,i->", t, t, dtype=np.float64),
        "vecdot(dtype=float64)": lambda: np.vecdot(t, t, dtype=np.float64),
        "matmul(dtype=float64)": lambda: np.matmul(t, t, dtype=np.float64),
    }
    if dsdot is not None:
        sums["BLAS dsdot"] = lambda: dsdot(w, t.ctypes.data, 1, t.ctypes.data, 1)
    widen: dict[str, Callable[[], Any]] = {
        "bf16 widening: copyto + left_shift (as now)": lambda: (
            np.copyto(wide, raw),
            np.left_shift(wide, np.uint32(16), out=wide),
        ),
        "bf16 widening: left_shift(dtype=uint32)": lambda: np.left_shift(
            raw, np.uint32(16), out=wide, dtype=np.uint32
        ),
        "bf16 widening: ml_dtypes astype": lambda: raw.view(BFLOAT16).astype(np.float32),
    }
    print(f"one slab of {w}, load {os.getloadavg()[0]:.1f}; CPU ns per element, fastest round")
    with limit_blas_threads(1):
        for name, fn in {**sums, **widen}.items():
            fn()
            best = math.inf
            for _ in range(5):
                c = time.thread_time()
                for _ in range(200):
                    got = fn()
                best = min(best, (time.thread_time() - c) / 200 / w * 1e9)
            err = f"  relative error {abs(float(got) - exact) / exact:.1e}" if name in sums else ""
            print(f"{name:<44} {best:6.3f}{err}")


_SAMPLE = """
import sys, time, numpy as np
from streamvec.ops.stats.inputs import open_inputs
from streamvec.ops.stats.sample import DEFAULT_SAMPLE, thresholds
ts = open_inputs(sys.argv[2:], base=sys.argv[1]).tensors
best = float("inf")
for _ in range(3):
    c = time.thread_time()
    out = [thresholds(t.shape, t.readers, t.coefs, 0.2, DEFAULT_SAMPLE, t.name) for t in ts]
    best = min(best, time.thread_time() - c)
print(best, int(np.concatenate(out).astype(np.int64).sum()))
"""


def _span_runs(reader: Any, starts: np.ndarray, run: int) -> np.ndarray:
    """The alternative to ``slabs.read_runs``: one ``pread`` of the runs' whole span."""
    size, first = reader.dtype.itemsize, int(starts.min())
    span = np.empty(int(starts.max()) + run - first, reader.dtype)
    fd = os.open(reader.path, os.O_RDONLY)
    try:
        pread_into(fd, reader, span, reader.offset + first * size)
    finally:
        os.close(fd)
    return span[(starts - first)[:, None] + np.arange(run)]


def sample(args: argparse.Namespace) -> None:
    """The top-set thresholds of every tensor (the sample), CPU: this tree against ``--before``
    in fresh processes, interleaved; then, per tensor size, the runs read with one ``pread``
    each (as ``slabs.read_runs``) against one ``pread`` of their whole span."""
    from streamvec.ops.stats import sample as smp

    trees = {"this tree": str(_HERE.parent)}
    if args.before is not None:
        trees["before"] = str(args.before)
    cpu: dict[str, list[float]] = {k: [] for k in trees}
    sums: dict[str, str] = {}
    ins = [str(args.base), *map(str, args.fts)]
    for _ in range(args.rounds):
        for k, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": tree}
            out = subprocess.run(
                [sys.executable, "-c", _SAMPLE, *ins], env=env, capture_output=True, text=True
            )
            took, sums[k] = out.stdout.split()
            cpu[k].append(float(took))
    print(f"thresholds of every tensor, {args.rounds} rounds, load {os.getloadavg()[0]:.1f}")
    for k in trees:
        runs = " ".join(f"{x * 1e3:.1f}" for x in cpu[k])
        med = statistics.median(cpu[k]) * 1e3
        print(f"{k:<10} median {med:6.1f} ms CPU ({runs}); sum {sums[k]}")
    inputs = open_inputs([str(f) for f in args.fts], base=args.base)
    seen: set[int] = set()
    ways: dict[str, Callable[[Any, np.ndarray, int], object]] = {
        "one pread per run": read_runs,
        "one pread of the span": _span_runs,
    }
    for t in inputs.tensors:
        n = math.prod(t.shape)
        if n <= smp.DEFAULT_SAMPLE or n in seen:
            continue
        seen.add(n)
        runs = max(1, smp.DEFAULT_SAMPLE // smp.RUN)
        starts = np.arange(runs) * (n // runs)
        r = t.readers[0]
        best = {}
        for label, way in ways.items():
            b = math.inf
            for _ in range(5):
                c = time.thread_time()
                way(r, starts, smp.RUN)
                b = min(b, time.thread_time() - c)
            best[label] = b
        mb = n * r.dtype.itemsize / 1e6
        each = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in best.items())
        print(f"{n:>10} elements ({mb:5.1f} MB): {each}")


def glue(args: argparse.Namespace) -> None:
    """CPU per slab of the slab loop at 64-element slabs (its fixed cost: Python and the calls'
    own overhead) and at the default 64K, on one MLP matrix, one thread."""
    t = _tensor(args)
    rows, cols = matrix_shape(t.shape)
    thr = np.full(len(t.coefs), np.float32(1e-3).view(np.uint32), np.uint32)
    stat, default = fused.FusedStat(t.shape, t.readers, t.coefs, t.base), fused.SLAB
    with limit_blas_threads(1):
        for slab, r1 in ((64, 64), (default, rows)):
            fused.SLAB = slab
            try:
                best = math.inf
                for _ in range(args.rounds):
                    c = time.thread_time()
                    stat(0, r1, thr)
                    best = min(best, time.thread_time() - c)
            finally:
                fused.SLAB = default
            n = r1 * cols // slab
            print(f"slab {slab}: {best / n * 1e6:.1f} us CPU per slab ({n} slabs, fastest round)")


def gil(args: argparse.Namespace) -> None:
    """Whether each numpy call of the slab loop releases the GIL: while a worker runs one long
    call, the longest stall of a Python loop in the main thread. A call that holds the GIL
    stalls it for the whole call; one that releases it, for a time slice of the OS at most."""
    import threading

    n = 1 << 26
    u = np.random.default_rng(0).integers(0, 2**31, n, dtype=np.uint32)
    f = np.where(np.isnan(u.view(np.float32)), 0, u.view(np.float32)).astype(np.float32)
    d, o32, ob, om = np.ones(n // 2), np.empty(n, np.float32), np.empty(n, np.uint32), f > 0
    calls: dict[str, Callable[[], object]] = {
        "sum(range) (holds the GIL)": lambda: sum(range(3 * 10**6)),
        "subtract": lambda: np.subtract(f, f, out=o32),
        "bitwise_and": lambda: np.bitwise_and(u, _ABS, out=ob),
        "max": lambda: u.max(),
        "count_nonzero (uint32)": lambda: np.count_nonzero(u),
        "count_nonzero (bool)": lambda: np.count_nonzero(om),
        "copyto float32 -> float64": lambda: np.copyto(d, f[: n // 2]),
        "dot (float64)": lambda: np.dot(d, d),
        "greater_equal": lambda: np.greater_equal(u, np.uint32(5), out=om),
        "left_shift": lambda: np.left_shift(u, np.uint32(16), out=ob),
    }
    print(f"{'call':<28} {'call ms':>8} {'stall ms':>9}  (load {os.getloadavg()[0]:.1f})")
    with limit_blas_threads(1):
        for name, fn in calls.items():
            fn()
            took: list[float] = []

            def work(fn: Callable[[], object] = fn, took: list[float] = took) -> None:
                s = time.perf_counter()
                fn()
                took.append(time.perf_counter() - s)

            th = threading.Thread(target=work)
            last, stall = time.perf_counter(), 0.0
            th.start()
            while th.is_alive():
                now = time.perf_counter()
                stall, last = max(stall, now - last), now
            th.join()
            print(f"{name:<28} {took[0] * 1e3:8.1f} {stall * 1e3:9.1f}")


def _interleave(variants: dict[str, Callable[[], object]], rounds: int, what: str) -> None:
    first = next(iter(variants.values()))
    first()  # warm up (page cache, imports)
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            c, s = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - s)
            end = resource.getrusage(resource.RUSAGE_CHILDREN)  # cat's CPU time
            child = end.ru_utime + end.ru_stime - kids.ru_utime - kids.ru_stime
            cpu[name].append(time.process_time() - c + child)
    ref = statistics.median(next(iter(wall.values())))
    print(f"{what}, {rounds} rounds, load {os.getloadavg()[0]:.1f}; medians")
    cref = statistics.median(next(iter(cpu.values())))
    print(f"{'variant':<26} {'wall s':>7} {'x first':>8} {'cpu s':>7} {'x first':>8}  runs")
    for name in variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        runs = " ".join(f"{x:.3f}" for x in wall[name])
        print(f"{name:<26} {w:7.3f} {w / ref:8.2f} {c:7.3f} {c / cref:8.2f}  {runs}")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "what",
        choices=("ops", "alternatives", "jit", "slabs", "sample", "glue", "gil", "overlap"),
    )
    p.add_argument("base", type=Path)
    p.add_argument("fts", type=Path, nargs="+")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--tensor", default="model.layers.0.mlp.gate_proj.weight")
    p.add_argument("--before", type=Path, help="sample: a checkout of an earlier streamvec")
    args = p.parse_args()
    modes = {"ops": ops, "jit": jit, "slabs": slabs, "glue": glue, "gil": gil}
    modes.update(overlap=overlap, alternatives=alternatives, sample=sample)
    modes[args.what](args)


if __name__ == "__main__":
    main()
