"""The cost of checking each chunk's recorded digest when a store is read.

Reads every array of a store chunk by chunk through the engine's reader, with and without
``verify`` (``--no-verify-inputs``), interleaved round by round, single-threaded, from the page
cache; prints the medians and their ratio. First, the hash alone against the decode it follows
(one 32 MiB float32 block).

    PYTHONPATH=. python bench/bench_verify_read.py STORE [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from streamvec.io.zarr.access import ReadPolicy, using_read_policy
from streamvec.io.zarr.store import read_store


def read_all(store: str, verify: bool) -> tuple[float, int]:
    with using_read_policy(ReadPolicy(verify=verify)):
        info = read_store(store)  # validation is not timed: the same with or without
    started = time.perf_counter()
    total = 0
    for a in info.arrays.values():
        reader = a.reader(info.path)
        rows = a.shape[0] if a.shape else 1
        step = a.check.chunk_rows if a.check else rows
        for r0 in range(0, rows, step):
            total += reader.read(r0, min(rows, r0 + step)).nbytes
    return time.perf_counter() - started, total


def hash_vs_decode(rounds: int = 7) -> None:
    """xxh3-128 against blosc lz4 + bit-shuffle decoding of the same 32 MiB float32 block."""
    import numcodecs
    import numpy as np
    import xxhash

    a = np.random.default_rng(0).standard_normal(8 << 20).astype(np.float32)
    codec = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    encoded = codec.encode(a)
    hashing, decoding = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        xxhash.xxh3_128_digest(a.data)
        hashing.append(time.perf_counter() - t)
        t = time.perf_counter()
        codec.decode(encoded)
        decoding.append(time.perf_counter() - t)
    h, d = statistics.median(hashing), statistics.median(decoding)
    print(
        f"xxh3-128 {a.nbytes / h / 1e9:.1f} GB/s, blosc lz4 decode {a.nbytes / d / 1e9:.2f} GB/s:"
        f" hashing takes {h / d:.3f} of the decode time"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    hash_vs_decode()
    read_all(args.store, True)  # warm the page cache
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds):
        for verify in (True, False):
            seconds, total = read_all(args.store, verify)
            times[verify].append(seconds)
            rate = total / seconds / 1e9
            print(f"round {r + 1} verify={verify!s:5s} {seconds:.3f} s {rate:.2f} GB/s")
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"median verify {on:.3f} s, no-verify {off:.3f} s: verify costs {on / off:.3f}x")


if __name__ == "__main__":
    main()
