"""Where the time of ``streamvec stats`` goes: its passes next to reading the inputs once.

On one checkpoint pair (e.g. the one ``streamvec bench --keep`` leaves in its workdir), in
rounds, variants interleaved so load changes hit all of them alike:

- ``cat``: ``cat`` of the weight files (warm page cache), the bench's read roofline;
- ``read``: the same pass machinery with a statistic that does nothing (every block read
  and upcast to float32: the floor of any pass);
- ``moments``: the main pass without the histogram (``--density 0``: one pass);
- ``moments+hist``: the main pass with the top-k histogram;
- ``stats``: ``sv.stats`` with the default density (main pass + overlap pass);

and prints each one's median seconds and its ratio to ``cat`` and to ``read``.

    PYTHONPATH=. python bench/bench_stats.py BASE FT [--rounds 3] [--workers N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamvec.linalg.blas import limit_blas_threads
from streamvec.merge.passes import PassItem, PassOptions, run_pass
from streamvec.stats import StatsOptions, stats
from streamvec.stats.accumulate import FinishMoments, MomentStat
from streamvec.stats.inputs import open_inputs


@dataclass(frozen=True)
class Nothing:
    def __call__(
        self, name: str, shape: tuple[int, ...], blocks: Sequence[np.ndarray], r0: int, r1: int
    ) -> np.ndarray:
        return np.zeros(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("ft", type=Path)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    files = sorted(args.base.glob("*.safetensors")) + sorted(args.ft.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    inputs = open_inputs([str(args.ft)], base=args.base)
    run = PassOptions(workers=args.workers)

    def items(stat_of: Callable[..., object]) -> list[PassItem]:
        return [
            PassItem(t.name, t.shape, tuple((1.0, r) for r in t.readers), stat_of(t), t.name)  # type: ignore[arg-type]
            for t in inputs.tensors
        ]

    def moments(hist: bool) -> None:
        finish = {t.name: FinishMoments(t.numel, 0.2 if hist else 0.0) for t in inputs.tensors}
        with limit_blas_threads(1):
            run_pass(items(lambda t: MomentStat(t.coefs, t.base, hist)), run, finish)  # type: ignore[arg-type]

    variants: dict[str, Callable[[], object]] = {
        "cat": lambda: subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL),
        "read": lambda: run_pass(items(lambda t: Nothing()), run),
        "moments": lambda: moments(False),
        "moments+hist": lambda: moments(True),
        "stats": lambda: stats([args.ft], base=args.base, workers=args.workers),
        "stats --density 0": lambda: stats(
            [args.ft], base=args.base, workers=args.workers, options=StatsOptions(density=0)
        ),
    }
    variants["cat"]()  # warm the page cache
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"inputs {size / 1e9:.2f} GB, {len(inputs.tensors)} tensors, rounds {args.rounds}")
    print(f"{'variant':<20} {'median s':>9} {'x cat':>7} {'x read':>7}  runs")
    for k, s in med.items():
        runs = " ".join(f"{x:.2f}" for x in times[k])
        print(f"{k:<20} {s:>9.2f} {s / med['cat']:>7.2f} {s / med['read']:>7.2f}  {runs}")


if __name__ == "__main__":
    main()
