"""What each engine speed-up buys: the current engine against itself with one change undone.

Variants, interleaved round by round on the same inputs (in-process, threads scheduler):

* ``current``: the engine as it is;
* ``no-writeback``: without asking the kernel to start writing each block's bytes to disk as
  soon as they are written (:mod:`streamvec.io.writeback`), so the whole output is flushed
  by the final ``os.sync`` after the computation, as before that change;
* ``block-accumulator``: the kernel accumulating a 16-bit output's float32 sum in a whole
  block-sized buffer instead of one cache-sized slab (the previous kernel, reproduced here);
* ``no-verify-inputs``: stores read without comparing each chunk with its recorded digest
  (``--no-verify-inputs``; see :mod:`streamvec.io.zarr.access`);
* ``no-prefetch``: without each block task asking the kernel to read the next planned block
  ahead (``SafetensorsReader.prefetch``); matters from a cold cache (``--cold``);
* ``window-prefetch``: the read-ahead as it was first written, one ``POSIX_FADV_WILLNEED``
  call per block, of which Linux reads one read-ahead window (8 MB of a 32 MB block here);
  now the range is advised in pieces (``streamvec.io.readahead.WILLNEED_PIECE``);
* ``expanded``: the kernel before the delta form, ``sum c_i x_i`` with float32 accumulation
  for 16-bit outputs (reproduced in :func:`expanded_combine`);
* ``fresh-read-buffers``: every safetensors block read into a fresh anonymous map, as before
  the engine kept its read buffers from block to block (:mod:`streamvec.io.read_buffers`);
* ``gathered-ties``: the final rounding checking every 16-bit tie of a slab one by one for
  exactness, as before it did so in one pass when there are many
  (:class:`GatheredTiesRounder`);
* ``float64-path``: one bf16 fine-tune with weight 1, -1 or 1/2 evaluated on the general
  float64 path, as before the float32 path of :mod:`streamvec.compute.delta_bf16`.
* ``zarr-decode``: store chunks read into fresh memory and decoded through zarr's codec
  pipeline (a fresh buffer per decode, copied again when read-only), as before they were
  decoded straight into the block's reused read buffer (:func:`old_chunk_rows`);
* ``fresh-upcasts``: the float32 copies of a merge's operands (its first passes and its output
  pass) made in fresh arrays, as before they went into the block's reused buffers;
* ``small-slabs``: the kernel's and the merge block operations' slabs of 2^16 elements, as
  before they were 2^17 (``streamvec.compute.kernel.SLAB_ELEMENTS``).

Variants combine with ``+`` (``fresh-read-buffers+zarr-decode``: both changes undone).

``--cold`` evicts the inputs from the page cache before every run (``streamvec bench``'s
method: drop_caches where permitted, else fadvise).

Operations: ``diff`` (float32 task vector into Zarr, lz4), ``diff-none`` (the same without
compression) and ``combine`` (the edited model ``base + 0.5 (ft - base)`` straight from the
checkpoints, bf16 safetensors) and ``combine-store`` (the same edit with the task vector read
from a store written by ``diff`` first), ``combine-3`` (``base + sum_i w_i (ft_i - base)``
with weights ``1.0, -0.5, 0.3``: FT and the two ``--more-fts``, on the delta form's float64
path), and ``merge`` (``streamvec bench``'s TIES recipe:
density 0.5, its first passes included). Besides the run's seconds, the summary gives the
medians of the engine's ``read`` and ``compute`` stages (worker-seconds; for ``merge``, of its
output pass).

    PYTHONPATH=. python bench/bench_ab.py BASE FT [--rounds 3] [--ops diff,diff-none,combine]
        [--more-fts FT2,FT3]
        [--variants current,no-writeback,block-accumulator,no-verify-inputs,no-prefetch,expanded,
                    fresh-read-buffers,gathered-ties,float64-path,zarr-decode,small-slabs]
        [--cold]
        [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

OPS = ("diff", "diff-none", "combine", "combine-store", "combine-3", "merge")
COMBINE_3_WEIGHTS = (1.0, -0.5, 0.3)
VARIANTS = (
    "current",
    "no-writeback",
    "block-accumulator",
    "no-verify-inputs",
    "no-prefetch",
    "window-prefetch",
    "expanded",
    "fresh-read-buffers",
    "gathered-ties",
    "float64-path",
    "zarr-decode",
    "fresh-upcasts",
    "small-slabs",
)


def block_accumulator_combine(
    operands: Sequence[tuple[float, np.ndarray]], out_dtype: np.dtype, points: object = ()
):  # -> np.ndarray
    """The previous kernel: the float32 accumulator of a 16-bit output was block-sized
    (``points`` ignored: the expanded form)."""
    # the module's own combine_blocks: variant() patches tensor's
    from streamvec.compute import kernel

    out_dtype = np.dtype(out_dtype)
    acc_dtype = kernel.accumulation_dtype(out_dtype, [c for c, _ in operands])
    if out_dtype == acc_dtype or (len(operands) == 1 and operands[0][0] == 1.0):
        return kernel.combine_blocks(operands, out_dtype)
    rows, cols = operands[0][1].shape
    out = np.empty((rows, cols), out_dtype)
    acc = np.empty(rows * cols, acc_dtype)
    slab = max(kernel.SLAB_ELEMENTS // max(cols, 1), 1) * max(cols, 1)
    scratch = np.empty(slab, acc_dtype)
    for s0 in range(0, rows * cols, slab):
        s1 = min(s0 + slab, rows * cols)
        a = acc[s0:s1]
        for i, (c, x) in enumerate(operands):
            x = x.reshape(-1)[s0:s1]
            if i == 0:
                np.multiply(x, c, out=a, dtype=acc_dtype, casting="unsafe")
            else:
                t = scratch[: s1 - s0]
                np.multiply(x, c, out=t, dtype=acc_dtype, casting="unsafe")
                np.add(a, t, out=a)
        np.copyto(out.reshape(-1)[s0:s1], a, casting="unsafe")
    return out


def expanded_combine(
    operands: Sequence[tuple[float, np.ndarray]], out_dtype: np.dtype, points: object = ()
) -> np.ndarray:
    """The kernel before the delta form: ``sum c_i x_i`` in slabs, float32 accumulation for
    16-bit outputs (and one exact float32 operation), float64 otherwise; ``points`` ignored."""
    out_dtype = np.dtype(out_dtype)
    blocks = [(float(c), x) for c, x in operands]
    if len(blocks) == 1 and blocks[0][0] == 1.0 and blocks[0][1].dtype == out_dtype:
        return np.array(blocks[0][1])
    rows, cols = blocks[0][1].shape
    simple = len(blocks) <= 2 and all(abs(c) == 1.0 for c, _ in blocks)
    acc_dtype = np.dtype(
        np.float32 if out_dtype.itemsize < 4 or (out_dtype == np.float32 and simple) else np.float64
    )
    out = np.empty((rows, cols), out_dtype)
    flat_out = out.reshape(-1)
    slab = max((1 << 17) // max(cols, 1), 1) * max(cols, 1)
    rounding = out_dtype != acc_dtype
    acc_slab = np.empty(min(slab, rows * cols), acc_dtype) if rounding else flat_out
    scratch = np.empty(slab, acc_dtype)
    for s0 in range(0, rows * cols, slab):
        s1 = min(s0 + slab, rows * cols)
        a = acc_slab[: s1 - s0] if rounding else flat_out[s0:s1]
        for i, (c, block) in enumerate(blocks):
            x = block.reshape(-1)[s0:s1]
            if i == 0 and c == 1.0:
                np.copyto(a, x, casting="unsafe")
            elif i == 0:
                np.multiply(x, c, out=a, dtype=acc_dtype, casting="unsafe")
            elif c == 1.0:
                np.add(a, x, out=a, dtype=acc_dtype, casting="unsafe")
            elif c == -1.0:
                np.subtract(a, x, out=a, dtype=acc_dtype, casting="unsafe")
            else:
                t = scratch[: s1 - s0]
                np.multiply(x, c, out=t, dtype=acc_dtype, casting="unsafe")
                np.add(a, t, out=a)
        if rounding:
            np.copyto(flat_out[s0:s1], a, casting="unsafe")
    return out


class GatheredTiesRounder:
    """The kernel's final rounding before ties were checked in one pass (same bits)."""

    def __init__(self, out_dtype: np.dtype, width: int) -> None:
        from streamvec.compute import kernel

        self.out_dtype = out_dtype
        self.ties = kernel._TIES.get(out_dtype)
        self.r32 = np.empty(width, np.float32)
        self.bits = np.empty(width, np.uint32)
        self.hit = np.empty(width, np.bool_)

    def __call__(self, acc: np.ndarray, out: np.ndarray) -> None:
        from streamvec.dtypes import BFLOAT16

        if self.ties is None or acc.dtype != np.float64:
            np.copyto(out, acc, casting="unsafe")
            return
        n = acc.shape[0]
        r32, bits, hit = self.r32[:n], self.bits[:n], self.hit[:n]
        np.copyto(r32, acc, casting="unsafe")
        u = r32.view(np.uint32)
        mask, tie, subnormal = self.ties
        if self.out_dtype == BFLOAT16:
            np.right_shift(u, 16, out=bits)
            np.bitwise_and(bits, 1, out=bits)
            np.add(bits, 0x7FFF, out=bits)
            np.add(bits, u, out=bits)
            np.right_shift(bits, 16, out=out.view(np.uint16), casting="unsafe")
        else:
            np.copyto(out, r32, casting="unsafe")
        np.bitwise_and(u, mask, out=bits)
        np.equal(bits, tie, out=hit)
        if subnormal:
            np.bitwise_and(u, 0x7F800000, out=bits)
            hit |= bits < subnormal
        hit |= np.isnan(r32)
        if hit.any():
            where = np.flatnonzero(hit)
            where = where[(acc[where] != r32[where]) | np.isnan(r32[where])]
            out[where] = acc[where].astype(self.out_dtype)


class FreshReadBuffers:
    """A read-buffer pool that keeps nothing: every block read gets a fresh map."""

    def lease(self):  # -> BufferLease
        from streamvec.io.read_buffers import BufferLease, ReadBuffers

        class Fresh(ReadBuffers):
            def _give(self, areas: list) -> None:
                pass

        return BufferLease(Fresh())


def old_chunk_rows(check, r0: int, r1: int, lease=None, into=None):  # -> np.ndarray
    """Store rows as read before chunks were decoded into the block's buffer (``lease``
    ignored): the file read into a fresh bytearray, decoded by zarr's codec pipeline into
    fresh bytes, and the rows copied out when the decode is read-only (it is, for blosc).
    With ``into`` (a held matrix's rows), the rows are copied there."""
    from streamvec.io.zarr import chunks

    if into is not None:
        rows = old_chunk_rows(check, r0, r1)
        into.reshape(-1).view(np.uint8)[:] = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
        return into

    spec = chunks._layout(check)
    st = (Path(check.store) / check.array_path / "zarr.json").stat()
    codecs = tuple(chunks._parsed(check.store, check.array_path, st.st_mtime_ns, st.st_size).codecs)
    if not check.shape:
        return _old_chunk(check, codecs, spec, 0)
    rows_per_chunk = check.chunk_rows
    if r1 > r0 and r0 // rows_per_chunk == (r1 - 1) // rows_per_chunk:
        c0 = (r0 // rows_per_chunk) * rows_per_chunk
        chunk = _old_chunk(check, codecs, spec, r0 // rows_per_chunk)
        rows = chunk[r0 - c0 : r1 - c0]
        keep = chunk.flags.writeable and 2 * (r1 - r0) >= chunk.shape[0]
        return rows if keep else rows.copy()
    out = np.empty((r1 - r0, *check.shape[1:]), check.dtype)
    for ci in range(r0 // rows_per_chunk, (r1 - 1) // rows_per_chunk + 1 if r1 > r0 else 0):
        c0 = ci * rows_per_chunk
        chunk = _old_chunk(check, codecs, spec, ci)
        lo, hi = max(r0, c0), min(r1, c0 + rows_per_chunk)
        out[lo - r0 : hi - r0] = chunk[lo - c0 : hi - c0]
    return out


def _old_chunk(check, codecs, spec, index: int):  # -> np.ndarray
    import xxhash

    from streamvec.io.zarr import chunks

    fd = chunks.open_chunk(check, index)
    if fd is None:
        chunk = np.zeros(spec.shape, dtype=spec.dtype.to_native_dtype())
    else:
        try:
            data = bytearray(os.fstat(fd).st_size)
            view = memoryview(data)
            got = 0
            while got < len(data):
                got += os.preadv(fd, [view[got:]], got)
        finally:
            os.close(fd)
        buf = spec.prototype.buffer.from_bytes(data)
        for codec in reversed(codecs):
            buf = codec._decode_sync(buf, spec)
        chunk = np.asarray(buf.as_numpy_array()).reshape(spec.shape)
    if check.verify and check.digests is not None:
        rows = check.shape[0] - index * check.chunk_rows if check.shape else 1
        valid = np.ascontiguousarray(chunk[:rows] if check.shape else chunk)
        assert xxhash.xxh3_128_digest(valid.reshape(-1).view(np.uint8).data) == check.digests[index]
    return chunk


@contextmanager
def variant(name: str) -> Iterator[None]:
    """The engine with the changes ``name`` names undone (``a+b``: both)."""
    if "+" in name:
        first, rest = name.split("+", 1)
        with variant(first), variant(rest):
            yield
        return
    from streamvec.compute import delta_bf16, kernel
    from streamvec.engine import execute as engine
    from streamvec.io import readahead, writeback
    from streamvec.io.zarr import access as store_check
    from streamvec.io.zarr import chunks as zarr_chunks
    from streamvec.io.zarr import store as zarr_store
    from streamvec.model import tensor
    from streamvec.ops.merge import blockop, passes

    saved = (
        writeback.start_writeback,
        zarr_store.start_writeback,
        tensor.combine_blocks,
        engine._prefetch,
        engine.ReadBuffers,
        kernel._Rounder,
        delta_bf16.applies,
        zarr_chunks._read_checked_rows,
        kernel.upcast32,
        passes.upcast32,
        kernel.SLAB_ELEMENTS,
        blockop.SLAB_ELEMENTS,
        readahead.WILLNEED_PIECE,
    )
    policy = store_check.using_read_policy(
        store_check.ReadPolicy(verify=name != "no-verify-inputs")
    )
    if name == "no-writeback":
        writeback.start_writeback = zarr_store.start_writeback = lambda *a: None
    elif name == "block-accumulator":
        tensor.combine_blocks = block_accumulator_combine
    elif name == "no-prefetch":
        engine._prefetch = lambda following: None
    elif name == "window-prefetch":
        readahead.WILLNEED_PIECE = 1 << 62  # one call per block
    elif name == "expanded":
        tensor.combine_blocks = expanded_combine
    elif name == "fresh-read-buffers":
        engine.ReadBuffers = FreshReadBuffers  # type: ignore[misc,assignment]
    elif name == "gathered-ties":
        kernel._Rounder = GatheredTiesRounder  # type: ignore[misc,assignment]
    elif name == "float64-path":
        delta_bf16.applies = lambda *a, **k: False  # type: ignore[assignment]
    elif name == "zarr-decode":
        zarr_chunks._read_checked_rows = old_chunk_rows
    elif name == "fresh-upcasts":
        fresh = saved[8]
        kernel.upcast32 = passes.upcast32 = lambda x, out=None: fresh(x)  # type: ignore[misc]
    elif name == "small-slabs":
        kernel.SLAB_ELEMENTS = blockop.SLAB_ELEMENTS = 1 << 16
    elif name != "current" and name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}")
    try:
        with policy:
            yield
    finally:
        (
            writeback.start_writeback,
            zarr_store.start_writeback,
            tensor.combine_blocks,
            engine._prefetch,
            engine.ReadBuffers,
            kernel._Rounder,
            delta_bf16.applies,
            zarr_chunks._read_checked_rows,
            kernel.upcast32,
            passes.upcast32,
            kernel.SLAB_ELEMENTS,
            blockop.SLAB_ELEMENTS,
            readahead.WILLNEED_PIECE,
        ) = saved


def run_op(
    op: str, base: str, ft: str, out: Path, store: Path, more_fts: Sequence[str] = ()
) -> tuple[float, dict]:
    """Run ``op`` into ``out``; its seconds and the engine's stage seconds."""
    import streamvec as sv
    from streamvec.ops.task_vector import task_vector

    if op == "merge":
        from streamvec.ops.merge.api import merge

        recipe = out.parent / "ties.yaml"
        recipe.write_text(
            f"merge_method: ties\nbase_model: {base}\nmodels:\n- model: {ft}\n"
            "  parameters: {weight: 1.0, density: 0.5}\nparameters: {normalize: true}\n"
        )
        clock = time.perf_counter()
        run = merge(recipe, out).run
        return time.perf_counter() - clock, run.stage_seconds
    if op == "combine":
        b = sv.open(base)
        report = (b + 0.5 * (sv.open(ft) - b)).save(out, progress=False)
    elif op == "combine-store":
        report = (sv.open(base) + 0.5 * sv.open(store)).save(out, progress=False)
    elif op == "combine-3":
        if len(more_fts) != 2:
            raise SystemExit("combine-3 needs --more-fts FT2,FT3")
        b = sv.open(base)
        fts = [sv.open(f) for f in (ft, *more_fts)]
        edit = b
        for w, f in zip(COMBINE_3_WEIGHTS, fts, strict=True):
            edit = edit + w * (f - b)
        report = edit.save(out, progress=False)
    else:
        compression = "none" if op == "diff-none" else "lz4"
        report = task_vector(base, ft).save(out, progress=False, compression=compression)
    return report.seconds, report.stage_seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("ft")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--more-fts", default="", help="FT2,FT3: the other fine-tunes of combine-3")
    ap.add_argument("--cold", action="store_true", help="evict the inputs before every run")
    args = ap.parse_args(argv)
    more_fts = [f for f in args.more_fts.split(",") if f]
    cache = None
    if args.cold:
        from streamvec.tools.benchmark.cache import PageCache
        from streamvec.tools.benchmark.inputs import weight_files

        cache = PageCache.cold()
        inputs = weight_files(Path(args.base), Path(args.ft), *map(Path, more_fts))
    ops = args.ops.split(",")
    variants = args.variants.split(",")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="streamvec-ab-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    times: dict[tuple[str, str], list[float]] = {(o, v): [] for o in ops for v in variants}
    stages: dict[tuple[str, str], list[dict]] = {(o, v): [] for o in ops for v in variants}
    store = workdir / "tau.zarr"
    if "combine-store" in ops and not store.exists():
        from streamvec.ops.task_vector import task_vector

        task_vector(args.base, args.ft).save(store, progress=False)
    for op in ops:  # warm-up, not timed: imports, first-use costs, the page cache
        out = workdir / f"{op}-warmup"
        with variant(variants[0]):
            run_op(op, args.base, args.ft, out, store, more_fts)
        shutil.rmtree(out, ignore_errors=True)
    for r in range(args.rounds):
        for op in ops:
            for v in variants if r % 2 == 0 else variants[::-1]:  # alternate who goes first
                out = workdir / f"{op}-{v}"
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # earlier writeback is not billed to this run
                if cache is not None:
                    cache.drop(inputs)
                with variant(v):
                    seconds, stage = run_op(op, args.base, args.ft, out, store, more_fts)
                times[(op, v)].append(seconds)
                stages[(op, v)].append(stage)
                shutil.rmtree(out, ignore_errors=True)
                load = os.getloadavg()[0]
                print(
                    f"round {r + 1} {op:9s} {v:18s} {seconds:6.2f} s  read "
                    f"{stage.get('read', 0):5.2f}  compute {stage.get('compute', 0):5.2f}  "
                    f"load {load:.1f}"
                )
    print(
        f"\n{'op':9s} {'variant':18s} {'median s':>9s} {'vs current':>11s} {'read':>6s} "
        f"{'compute':>8s}  all"
    )
    for op in ops:
        ref = statistics.median(times[(op, variants[0])])
        for v in variants:
            med = statistics.median(times[(op, v)])
            runs = " ".join(f"{t:.2f}" for t in times[(op, v)])
            read = statistics.median(s.get("read", 0.0) for s in stages[(op, v)])
            compute = statistics.median(s.get("compute", 0.0) for s in stages[(op, v)])
            print(
                f"{op:9s} {v:18s} {med:9.2f} {med / ref:10.2f}x {read:6.2f} {compute:8.2f}  {runs}"
            )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
