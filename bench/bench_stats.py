"""Where the time of ``streamvec stats`` goes: its variants next to reading the inputs once.

On one checkpoint pair (e.g. the one ``streamvec bench --keep`` leaves in its workdir) or a
base and several fine-tunes, in rounds, variants interleaved so load changes hit all of them
alike:

- ``cat``: ``cat`` of the weight files (warm page cache), the bench's read roofline;
- ``read``: every operand read slab by slab and upcast to float32, nothing computed, on the
  same threads (the floor of the stats pass);
- ``stats --density 0``: ``sv.stats`` without top-k overlaps;
- ``stats``: ``sv.stats`` with the default density (thresholds sampled, one pass);
- ``stats --exact-topk``: the histogram threshold and a second pass;
- ``before``: with ``--before DIR`` (a checkout of an earlier streamvec), its ``sv.stats``
  with ``--density 0`` and with the default settings, timed inside a subprocess (imports
  excluded);

With ``--cold`` every variant starts with the inputs evicted from the page cache
(``streamvec bench --cold``'s method) and ``read`` is left out (it times the page cache).

It prints each one's median seconds and its ratio to ``cat`` and to ``read``, and its median
CPU seconds (every thread of the process; ``cat``'s and ``before``'s own) and their ratio to
``cat``'s: on a shared machine CPU time moves less with the load than wall time does.

    PYTHONPATH=. python bench/bench_stats.py BASE FT [FT...] [--rounds 3] [--workers N] [--cold]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from streamvec.io.blocks import matrix_shape
from streamvec.ops.stats import StatsOptions, stats
from streamvec.ops.stats.fused import SLAB
from streamvec.ops.stats.inputs import open_inputs
from streamvec.ops.stats.slabs import SlabReader
from streamvec.tools.benchmark.cache import PageCache

_BEFORE = """
import sys, time
import streamvec as sv
from streamvec.ops.stats import StatsOptions
options = StatsOptions(density={density})
start, cpu = time.perf_counter(), time.process_time()
sv.stats(sys.argv[2:], base=sys.argv[1], workers={workers}, options=options)
print(time.perf_counter() - start, time.process_time() - cpu)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("fts", type=Path, nargs="+")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--before", type=Path, help="a checkout of an earlier streamvec")
    p.add_argument("--cold", action="store_true", help="evict the inputs before every run")
    args = p.parse_args()
    cache = PageCache.cold() if args.cold else PageCache()
    files = [f for d in (args.base, *args.fts) for f in sorted(d.glob("*.safetensors"))]
    size = sum(f.stat().st_size for f in files)
    inputs = open_inputs([str(f) for f in args.fts], base=args.base)
    workers = args.workers or os.cpu_count() or 1
    fts = [str(f) for f in args.fts]
    abs_fts = [str(f.resolve()) for f in args.fts]

    def read() -> None:
        jobs = []
        for t in inputs.tensors:
            rows, cols = matrix_shape(t.shape)
            step = max(1, (8 << 20) // max(cols, 1))
            jobs += [(t, r, min(rows, r + step), cols) for r in range(0, rows, step)]

        def one(job: tuple) -> None:
            t, r0, r1, cols = job
            size = (r1 - r0) * cols
            width = max(1, min(SLAB, size))
            with SlabReader(t.readers, r0, r1, width) as rd:
                for s0 in range(0, size, width):
                    rd.load(s0, min(size, s0 + width))

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, jobs))

    def before(density: float) -> tuple[float, float]:
        code = _BEFORE.format(workers=workers, density=density)
        env = {**os.environ, "PYTHONPATH": str(args.before)}
        out = subprocess.run(
            [sys.executable, "-c", code, str(args.base.resolve()), *abs_fts],
            cwd=args.before,  # "-c" puts the working directory first on sys.path
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        wall, cpu = out.stdout.split()[-2:]
        return float(wall), float(cpu)

    variants: dict[str, Callable[[], object]] = {
        "cat": lambda: subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL),
        "read": read,
        "stats --density 0": lambda: stats(
            fts, base=args.base, workers=workers, options=StatsOptions(density=0)
        ),
        "stats": lambda: stats(fts, base=args.base, workers=workers),
        "stats --exact-topk": lambda: stats(
            fts, base=args.base, workers=workers, options=StatsOptions(exact_topk=True)
        ),
    }
    if args.before is not None:
        variants["before --density 0"] = lambda: before(0.0)
        variants["before (default)"] = lambda: before(0.2)
    if cache.is_cold:
        del variants["read"]  # it times reading out of the page cache
    else:
        variants["cat"]()  # warm the page cache
    resident: list[float] = []
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            if cache.is_cold:
                resident.append(cache.drop(files) or 0.0)
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            start, cpu = time.perf_counter(), time.process_time()
            inner = fn()
            took, cpu = time.perf_counter() - start, time.process_time() - cpu
            if isinstance(inner, tuple):  # timed inside a subprocess (imports left out)
                took, cpu = inner
            elif name == "cat":  # the child's CPU time
                end = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = end.ru_utime + end.ru_stime - kids.ru_utime - kids.ru_stime
            times[name].append(took)
            cpus[name].append(cpu)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mcpu = {k: statistics.median(v) for k, v in cpus.items()}
    print(
        f"inputs {size / 1e9:.2f} GB ({len(args.fts)} fine-tune(s) and the base), "
        f"{len(inputs.tensors)} tensors, {workers} workers, rounds {args.rounds}, "
        f"load {os.getloadavg()[0]:.1f}, {cache.label(max(resident, default=None))} cache"
    )
    floor = med.get("read", float("nan"))
    print(
        f"{'variant':<20} {'median s':>9} {'x cat':>7} {'x read':>7} {'cpu s':>7} "
        f"{'cpu x cat':>9}  runs (s)"
    )
    for k, s in med.items():
        runs = " ".join(f"{x:.2f}" for x in times[k])
        c = mcpu[k]
        print(
            f"{k:<20} {s:>9.2f} {s / med['cat']:>7.2f} {s / floor:>7.2f} {c:>7.2f} "
            f"{c / mcpu['cat']:>9.2f}  {runs}"
        )


if __name__ == "__main__":
    main()
