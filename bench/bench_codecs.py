"""Blosc settings on real task-vector blocks: compression ratio, encode and decode speed.

Single-threaded (zarr 3.1.6 sets ``numcodecs.blosc.use_threads = False``, so that is how the
engine's workers run blosc), on the first row blocks of several layers' ``ft - base`` in
float32, medians over interleaved rounds. Synthetic low-rank + noise deltas are not real
fine-tuning deltas: their ratios are indicative only.

    python bench/bench_codecs.py BASE FINETUNED [--layer 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import numcodecs.blosc
from numcodecs import Blosc

from streamvec.model.sources import open as open_model
from streamvec.model.tensor import rows_per_block

# (cname, clevel, shuffle, blocksize); shuffle 0 none, 1 byte, 2 bit; blocksize 0 = automatic.
CONFIGS = [
    ("lz4", 1, 2, 0),
    ("lz4", 5, 2, 0),
    ("lz4", 9, 2, 0),
    ("lz4", 1, 1, 0),
    ("lz4", 5, 1, 0),
    ("lz4", 1, 0, 0),
    ("lz4", 5, 2, 1 << 20),
    ("lz4", 5, 2, 256 << 10),
    ("blosclz", 5, 1, 0),
    ("zstd", 1, 2, 0),
    ("zstd", 1, 1, 0),
    ("lz4hc", 1, 2, 0),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("base")
    ap.add_argument("finetuned")
    ap.add_argument("--layer", type=int, default=3, help="take blocks of this layer's matrices")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    numcodecs.blosc.use_threads = False  # as under zarr
    tensors = (open_model(args.finetuned) - open_model(args.base)).resolved().tensors
    blocks = []
    for name, t in tensors.items():
        if f"layers.{args.layer}." in name and len(t.shape) == 2:
            blocks.append(t.read_rows(0, min(rows_per_block(t.shape), t.shape[0])))
    total = sum(b.nbytes for b in blocks)
    print(f"{len(blocks)} blocks of layer {args.layer}, {total / 1e6:.0f} MB float32")
    enc: dict[tuple, list[float]] = {c: [] for c in CONFIGS}
    dec: dict[tuple, list[float]] = {c: [] for c in CONFIGS}
    ratio: dict[tuple, float] = {}
    for _ in range(args.rounds):
        for c in CONFIGS:
            codec = Blosc(cname=c[0], clevel=c[1], shuffle=c[2], blocksize=c[3], typesize=4)
            start = time.perf_counter()
            out = [codec.encode(b) for b in blocks]
            enc[c].append(total / (time.perf_counter() - start) / 1e9)
            start = time.perf_counter()
            for o in out:
                codec.decode(o)
            dec[c].append(total / (time.perf_counter() - start) / 1e9)
            ratio[c] = total / sum(len(o) for o in out)
    print(
        f"{'cname':8s} {'clevel':>6s} {'shuffle':>7s} {'blocksize':>9s} {'ratio':>6s} "
        f"{'encode GB/s':>11s} {'decode GB/s':>11s}"
    )
    for c in CONFIGS:
        print(
            f"{c[0]:8s} {c[1]:6d} {['none', 'byte', 'bit'][c[2]]:>7s} {c[3]:9d} {ratio[c]:6.2f} "
            f"{statistics.median(enc[c]):11.2f} {statistics.median(dec[c]):11.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
