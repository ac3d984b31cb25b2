"""The read stage of a merge's first passes, before and after, variants interleaved.

Each pass task reads every term's rows and upcasts them to float32. Before: a fresh
anonymous map per read and ml_dtypes' bf16 -> float32 conversion; now: read buffers reused
from block to block (:mod:`streamvec.io.read_buffers`) and the upcast done on the bits
(:func:`streamvec.compute.kernel.upcast32`). Rows of every 2-D tensor of BASE and FT, in blocks of
about 16 MB of float32, single thread; seconds of wall and of the thread's CPU.

    PYTHONPATH=. python bench/bench_pass_reads.py BASE FT [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from streamvec.compute.kernel import upcast32
from streamvec.io.blocks import read_block
from streamvec.io.read_buffers import ReadBuffers


def main(argv: list[str] | None = None) -> int:
    import streamvec as sv
    from streamvec.model.tensor import row_ranges, rows_per_block

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("ft")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    tv = (sv.open(args.ft) - sv.open(args.base)).resolved()
    tensors = [t for t in tv.tensors.values() if len(t.shape) == 2]

    def before() -> None:
        for t in tensors:
            for r0, r1 in row_ranges(t.shape[0], rows_per_block(t.shape, 16 << 20)):
                [r.read(r0, r1).astype(np.float32) for _, r in t.terms]

    pool = ReadBuffers()

    def now() -> None:
        for t in tensors:
            for r0, r1 in row_ranges(t.shape[0], rows_per_block(t.shape, 16 << 20)):
                with pool.lease() as lease:
                    [upcast32(read_block(r, r0, r1, lease)) for _, r in t.terms]

    variants = {"now": now, "before": before}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name in variants if r % 2 == 0 else list(variants)[::-1]:
            w, c = time.perf_counter(), time.thread_time()
            variants[name]()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.thread_time() - c)
    for name in variants:
        mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"{name:7s} wall {mw:6.2f} s ({mw / statistics.median(wall['now']):4.2f}x now)  "
            f"cpu {mc:6.2f} s ({mc / statistics.median(cpu['now']):4.2f}x now)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
