"""Two single-threaded micro-measurements behind docs/benchmarks.md, variants interleaved.

1. The block kernel on 4096 x 4096 bf16 blocks already in memory, into bf16: the edited
   model ``base + 0.5 (ft - base)`` and a three-fine-tune merge ``base + sum w_i (ft_i -
   base)`` (w = 1.0, -0.5, 0.3): the current kernel (delta form, float64 accumulation in
   cache-sized slabs, one correct rounding) against the expanded form it replaced
   (``bench_ab.expanded_combine``: ``sum c_i x_i``, float32 accumulation), the delta form on
   its float64 path (as before ``streamvec.compute.delta_bf16``'s float32 path for one bf16
   fine-tune) and, for the first, the block-sized accumulator before that
   (``bench_ab.block_accumulator_combine``), and the delta form with its previous final
   rounding (every 16-bit tie of a slab checked one by
   one: ``bench_ab.GatheredTiesRounder``). GB/s of input per CPU second of the thread.
2. Reading row blocks of a task-vector store (``--store``): the synchronous chunk reader
   (``streamvec.io.zarr.chunks``) as the engine runs it (each chunk decoded straight into a
   buffer a run reuses from block to block), the same into fresh memory, the reader before
   that (the chunk decoded by zarr's codec pipeline into fresh bytes and copied out:
   ``bench_ab.old_chunk_rows``), the one before (copying the rows out of a single chunk) and
   ``zarr.open_array`` + ``__getitem__`` per block. GB/s of decoded float32 per CPU second of
   the process.

3. ``--slabs 16,17``: the current kernel with slabs of 2^16 and 2^17 elements
   (``streamvec.compute.kernel.SLAB_ELEMENTS``), on two threads at once as the engine's two
   workers run it; GB/s of input per wall second.

    PYTHONPATH=. python bench/bench_kernel_io.py [--store TAU.zarr] [--no-kernel] [--rounds 5]
        [--slabs 15,16,17,18]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ab

from streamvec.compute.kernel import combine_blocks
from streamvec.dtypes import BFLOAT16
from streamvec.io.read_buffers import ReadBuffers


def best_rate(
    fn: Callable[[], int], rounds: int, clock: Callable[[], float] = time.thread_time
) -> list[float]:
    # CPU seconds, not wall time: on a shared machine the wall time of a single-threaded
    # kernel is mostly the time it waited for a core. The thread's own for the kernel; the
    # process's for readers (zarr decodes in threads of its own).
    rates = []
    for _ in range(rounds):
        start = clock()
        nbytes = fn()
        rates.append(nbytes / (clock() - start) / 1e9)
    return rates


def gathered_ties(operands, points):  # -> np.ndarray
    """The delta-form kernel with the final rounding it had before (``bench_ab``)."""
    from streamvec.compute import kernel

    saved = kernel._Rounder
    kernel._Rounder = bench_ab.GatheredTiesRounder  # type: ignore[misc,assignment]
    try:
        return float64_path(operands, points)  # (the float32 path does not round that way)
    finally:
        kernel._Rounder = saved  # type: ignore[misc]


def float64_path(operands, points):  # -> np.ndarray
    """The delta-form kernel without the float32 path for one bf16 fine-tune (before)."""
    from streamvec.compute import delta_bf16

    saved = delta_bf16.applies
    delta_bf16.applies = lambda *a, **k: False  # type: ignore[assignment]
    try:
        return combine_blocks(operands, BFLOAT16, points)
    finally:
        delta_bf16.applies = saved  # type: ignore[assignment]


def kernel_cases() -> dict[str, tuple[list, tuple[bool, ...]]]:
    """The two edits measured: (operands, points) by title."""
    rng = np.random.default_rng(0)
    base32 = rng.standard_normal((4096, 4096), dtype=np.float32)
    base = base32.astype(BFLOAT16)
    fts = [
        (base32 + 0.01 * rng.standard_normal((4096, 4096), dtype=np.float32)).astype(BFLOAT16)
        for _ in range(3)
    ]
    weights = (1.0, -0.5, 0.3)
    return {
        "base + 0.5 (ft - base)": ([(0.5, base), (0.5, fts[0])], (True, True)),
        "base + sum w_i (ft_i - base), 3 fine-tunes": (
            [(1.0 - sum(weights), base), *zip(weights, fts, strict=True)],
            (True,) * 4,
        ),
    }


def kernel_variants(rounds: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for title, (operands, points) in kernel_cases().items():
        nbytes = sum(x.nbytes for _, x in operands)
        variants: dict[str, Callable[[], object]] = {
            "delta form (current)": lambda o=operands, p=points: combine_blocks(o, BFLOAT16, p),
            "delta, float64 path (before)": lambda o=operands, p=points: float64_path(o, p),
            "delta, ties gathered (before)": lambda o=operands, p=points: gathered_ties(o, p),
            "expanded form (before)": lambda o=operands: bench_ab.expanded_combine(o, BFLOAT16),
        }
        if len(operands) == 2:
            variants["block accumulator (earlier)"] = lambda o=operands: (
                bench_ab.block_accumulator_combine(o, BFLOAT16)
            )
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):  # interleaved
            for name, fn in variants.items():
                rates[name] += best_rate(lambda fn=fn, n=nbytes: (fn(), n)[1], 1)
        out[title] = rates
    return out


def slab_variants(rounds: int, exponents: list[int]) -> dict[str, dict[str, list[float]]]:
    """The current kernel at several slab sizes, on two threads at once as the engine's two
    workers run it: GB/s of input (both threads') per wall second, sizes interleaved."""
    import threading

    from streamvec.compute import kernel

    saved = kernel.SLAB_ELEMENTS
    out: dict[str, dict[str, list[float]]] = {}
    for title, (operands, points) in kernel_cases().items():
        nbytes = sum(x.nbytes for _, x in operands)
        rates: dict[str, list[float]] = {f"2^{e} elements": [] for e in exponents}

        def twice(o: list = operands, p: tuple[bool, ...] = points) -> None:
            for _ in range(2):
                combine_blocks(o, BFLOAT16, p)

        try:
            for _ in range(rounds):
                for e in exponents:
                    kernel.SLAB_ELEMENTS = 1 << e
                    threads = [threading.Thread(target=twice) for _ in range(2)]
                    start = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    seconds = time.perf_counter() - start
                    rates[f"2^{e} elements"].append(4 * nbytes / seconds / 1e9)
        finally:
            kernel.SLAB_ELEMENTS = saved
        out[title] = rates
    return out


def reader_variants(store: Path, rounds: int) -> dict[str, list[float]]:
    import zarr

    from streamvec.io.zarr import chunks as zarr_chunks
    from streamvec.io.zarr.store import read_store

    info = read_store(store)
    names = [n for n, a in info.arrays.items() if len(a.shape) == 2][:8]
    paths = {n: info.arrays[n].array_path for n in names}

    def read_all(read_block: Callable[[str, int, int], np.ndarray | None]) -> int:
        total = 0
        for name in names:
            meta = zarr.open_array(str(store), path=paths[name], mode="r")
            rows, step = meta.shape[0], meta.chunks[0]
            for r0 in range(0, rows, step):
                block = read_block(paths[name], r0, min(rows, r0 + step))
                assert block is not None
                total += block.nbytes
        return total

    def zarr_getitem(path: str, r0: int, r1: int) -> np.ndarray:
        return np.asarray(zarr.open_array(str(store), path=path, mode="r")[r0:r1])

    def chunk_reader() -> int:
        return read_all(lambda path, r0, r1: zarr_chunks.read_rows(str(store), path, r0, r1))

    def through_zarr() -> int:
        return read_all(zarr_getitem)

    direct = zarr_chunks._read_checked_rows
    pool = ReadBuffers()

    def engine_reader() -> int:
        # as a run reads: one lease per block, its maps reused by the next block
        def one(path: str, r0: int, r1: int) -> np.ndarray:
            with pool.lease() as lease:  # only its size is used once the lease is closed
                return zarr_chunks.read_rows(str(store), path, r0, r1, lease=lease)

        return read_all(one)

    def fresh_decode_reader() -> int:
        zarr_chunks._read_checked_rows = bench_ab.old_chunk_rows
        try:
            return chunk_reader()
        finally:
            zarr_chunks._read_checked_rows = direct

    def copying_reader() -> int:
        # the chunk reader as it was: the rows of a single chunk copied out of it
        zarr_chunks._read_checked_rows = lambda *a: np.array(direct(*a))
        try:
            return chunk_reader()
        finally:
            zarr_chunks._read_checked_rows = direct

    rates: dict[str, list[float]] = {
        "into reused buffers (engine)": [],
        "chunk reader (fresh memory)": [],
        "zarr decode + copy (before)": [],
        "chunk reader, copy (earlier)": [],
        "zarr getitem (earlier)": [],
    }
    for _ in range(rounds):
        rates["into reused buffers (engine)"] += best_rate(engine_reader, 1, time.process_time)
        rates["chunk reader (fresh memory)"] += best_rate(chunk_reader, 1, time.process_time)
        rates["zarr decode + copy (before)"] += best_rate(fresh_decode_reader, 1, time.process_time)
        rates["chunk reader, copy (earlier)"] += best_rate(copying_reader, 1, time.process_time)
        rates["zarr getitem (earlier)"] += best_rate(through_zarr, 1, time.process_time)
    return rates


def report(title: str, rates: dict[str, list[float]]) -> None:
    print(title)
    ref = None
    for name, values in rates.items():
        med = statistics.median(values)
        ref = ref or med
        runs = " ".join(f"{v:.2f}" for v in values)
        print(f"  {name:30s} median {med:5.2f} GB/s  ({med / ref:4.2f}x of the first)  {runs}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="a task-vector store written by streamvec diff")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-kernel", action="store_true", help="only the store reads")
    ap.add_argument(
        "--slabs",
        help="E1,E2,...: instead, the current kernel with slabs of 2^E elements, two threads",
    )
    args = ap.parse_args(argv)
    if args.slabs:
        exponents = [int(e) for e in args.slabs.split(",")]
        for title, rates in slab_variants(args.rounds, exponents).items():
            report(f"kernel, {title}, two threads, GB/s per wall second:", rates)
        return 0
    for title, rates in ({} if args.no_kernel else kernel_variants(args.rounds)).items():
        report(f"kernel, {title}, bf16 -> bf16, 4096 x 4096 blocks:", rates)
    if args.store is not None:
        report(f"row blocks of {args.store}, one thread:", reader_variants(args.store, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
