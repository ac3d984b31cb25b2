"""The cost of the run-time checks on inputs, measured side by side (docs/reliability.md).

Variants of ``streamvec diff BASE FT`` (float32 task vector into Zarr, lz4; threads
scheduler; in-process), interleaved round by round on the same warm inputs:

* ``current``: blocks read with ``pread`` between two ``fstat`` checks of the file's version,
  and each block's inputs hashed (xxh3-128) for ``--resume``;
* ``no-input-digests``: the same without hashing the inputs;
* ``mmap``: the previous reader (a read-only map per block, populated with
  ``MADV_POPULATE_READ``; a truncated input is SIGBUS) and no input digests: the code before.

Then the two ways a resumed run can check that its inputs did not change, on the same files:

* ``full-file xxh3``: hash every input file whole (the check a run would pay at every start
  to record, and again at every resume);
* ``resume check``: read and hash the inputs of every block of the job (what ``--resume``
  does for the blocks already done; here all of them, the worst case).

With ``--reads``, only the ways to read the shards of BASE in 8 MB blocks, single thread,
interleaved: ``mmap`` (map and populate, no copy), ``heap`` (``pread`` into ``np.empty``),
``anon`` (``pread`` into a fresh anonymous map), ``anon-populate`` (the same map faulted in
with ``MAP_POPULATE``, what the reader did for every block) and ``reused`` (``pread`` into one
anonymous map kept from block to block, what the engine's read buffers do now).

    PYTHONPATH=. python bench/bench_faults.py BASE FT [--rounds 3] [--workdir DIR] [--reads]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import xxhash

VARIANTS = ("current", "no-input-digests", "mmap")


def _mmap_read(self, r0: int, r1: int) -> np.ndarray:
    """The previous ``SafetensorsReader.read``: a populated read-only map per block."""
    from streamvec.io.blocks import matrix_shape, populate

    _, cols = matrix_shape(self.shape)
    count = (r1 - r0) * cols
    if count == 0:
        return np.empty((r1 - r0, cols), self.dtype)
    start = self.offset + r0 * cols * self.dtype.itemsize
    view = np.memmap(self.path, dtype=self.dtype, mode="r", offset=start, shape=(count,))
    populate(view)
    return view.reshape(r1 - r0, cols)


@contextmanager
def variant(name: str) -> Iterator[None]:
    from streamvec.engine import execute as engine
    from streamvec.io import blocks

    saved = (engine.digest_operands, blocks.SafetensorsReader.read)
    try:
        if name in ("no-input-digests", "mmap"):
            engine.digest_operands = lambda operands: []  # type: ignore[assignment]
        if name == "mmap":
            blocks.SafetensorsReader.read = _mmap_read  # type: ignore[method-assign]
        yield
    finally:
        engine.digest_operands, blocks.SafetensorsReader.read = saved  # type: ignore[method-assign]


def full_file_hash(paths: list[Path]) -> float:
    started = time.perf_counter()
    for p in paths:
        h = xxhash.xxh3_128()
        with p.open("rb", buffering=0) as f:
            buf = bytearray(16 << 20)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
        h.hexdigest()
    return time.perf_counter() - started


def resume_check(base: str, ft: str) -> float:
    from streamvec.engine.jobs import tensor_input_digests
    from streamvec.io.blocks import matrix_shape
    from streamvec.model.tensor import rows_per_block
    from streamvec.ops.task_vector import task_vector

    tv = task_vector(base, ft)
    started = time.perf_counter()
    for t in tv.resolved().tensors.values():
        tensor_input_digests(t, 0, matrix_shape(t.shape)[0], rows_per_block(t.shape))
    return time.perf_counter() - started


READS = ("heap", "anon", "anon-populate", "reused", "mmap")


def read_blocks(files: list[Path], kind: str, block: int = 8 << 20) -> float:
    import mmap

    started = time.perf_counter()
    kept = np.frombuffer(
        mmap.mmap(-1, block, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8
    )
    for p in files:
        size = p.stat().st_size
        fd = os.open(p, os.O_RDONLY)
        try:
            for off in range(0, size - block, block):
                if kind == "mmap":
                    m = np.memmap(p, np.uint8, mode="r", offset=off, shape=(block,))
                    m._mmap.madvise(22)  # type: ignore[attr-defined]  # MADV_POPULATE_READ
                    continue
                if kind == "reused":
                    a = kept
                elif kind == "heap":
                    a = np.empty(block, np.uint8)
                else:
                    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                    if kind == "anon-populate":
                        flags |= mmap.MAP_POPULATE
                    a = np.frombuffer(mmap.mmap(-1, block, flags=flags), np.uint8)
                os.preadv(fd, [a.data], off)
        finally:
            os.close(fd)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("ft")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--reads", action="store_true", help="only the read variants")
    args = ap.parse_args()
    if args.reads:
        from streamvec.io.safetensors.checkpoint import resolve_checkpoint

        shards = list(resolve_checkpoint(args.base).shards)
        for r in range(args.rounds):
            order = READS if r % 2 == 0 else READS[::-1]
            print(", ".join(f"{k} {read_blocks(shards, k):.3f} s" for k in order))
        return

    import streamvec as sv
    from streamvec.io.safetensors.checkpoint import resolve_checkpoint

    work = Path(tempfile.mkdtemp(dir=args.workdir))
    files = [*resolve_checkpoint(args.base).shards, *resolve_checkpoint(args.ft).shards]
    size = sum(p.stat().st_size for p in files)
    full_file_hash(files)  # warm the page cache
    times: dict[str, list[float]] = {v: [] for v in (*VARIANTS, "full-file xxh3", "resume check")}
    try:
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for name in order:
                out = work / f"{name}.zarr"
                with variant(name):
                    tv = sv.open(args.ft) - sv.open(args.base)
                    report = tv.save(out, progress=False)
                times[name].append(report.seconds)
                shutil.rmtree(out)
            times["full-file xxh3"].append(full_file_hash(files))
            times["resume check"].append(resume_check(args.base, args.ft))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = statistics.median(times["mmap"])
    print(f"\ninputs {size / 1e9:.2f} GB, {os.cpu_count()} CPUs, median of {args.rounds} rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        rate = size / med / 1e9
        print(f"{name:>18}: {med:6.2f} s  {rate:5.2f} GB/s  {med / ref:5.2f}x the mmap diff")


if __name__ == "__main__":
    main()
