"""What each change to the Zarr write path bought, measured variant by variant, interleaved.

Blocks are real task-vector blocks (``ft - base`` of a synthetic pair, float32); each variant
writes the same blocks into its own store, single-threaded, and the rounds interleave the
variants so machine load hits them alike. Variants, each adding one change to the previous:

    setitem+open    zarr.open_array per block, then arr[r0:r1] = block (the original writer)
    setitem         the same through one opened Array (no open per block)
    sync+zarr-check chunks encoded by the array's codecs in the calling thread and written as
                    files, empty-chunk check by zarr's NDBuffer.all_equal
    sync            the same with streamvec's prefix-first zero check (the current writer)

and for the metadata: creating arrays one by one then ``attrs.update`` against
``create_store`` (templates + one ``zarr.create_hierarchy``), and finish-time attrs through
``Array.attrs.update`` against ``set_array_attrs`` (one metadata rewrite per array).

    python bench/bench_store_write.py BASE FINETUNED [--blocks 24] [--rounds 5] [--arrays 200]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from streamvec.io.zarr import store as zs
from streamvec.model.sources import open as open_model
from streamvec.model.tensor import rows_per_block


def real_blocks(base: str, ft: str, count: int) -> list[tuple[str, tuple[int, ...], np.ndarray]]:
    """The first ``count`` row blocks of ``ft - base`` (float32), over several tensors."""
    tensors = (open_model(ft) - open_model(base)).resolved().tensors
    out = []
    for t in tensors.values():
        if len(t.shape) != 2:
            continue
        rows = rows_per_block(t.shape)
        out.append((t.name, t.shape, t.read_rows(0, min(rows, t.shape[0]))))
        if len(out) == count:
            break
    return out


def _specs(blocks: list[tuple[str, tuple[int, ...], np.ndarray]]) -> list[zs.ArraySpec]:
    return [zs.ArraySpec(n, s, np.dtype(np.float32), b.shape[0], {}) for n, s, b in blocks]


def write_variant(variant: str, root: Path, blocks: list[Any]) -> float:
    """Seconds to write every block with ``variant`` (store created beforehand, not timed)."""
    import zarr
    from zarr.core.buffer.cpu import NDBuffer

    shutil.rmtree(root, ignore_errors=True)
    metas = zs.create_store(root, {"format": 1}, _specs(blocks))
    opened = {}
    if variant == "setitem":
        # One Array per tensor, opened before timing: what caching the open would give.
        for name, _, _ in blocks:
            path = zs.encode_array_path(name)
            opened[name] = zarr.open_array(str(root), path=path, mode="r+")
    start = time.perf_counter()
    for name, shape, block in blocks:
        path = zs.encode_array_path(name)
        if variant == "setitem+open":
            arr = zarr.open_array(str(root), path=path, mode="r+")
            arr[0 : block.shape[0]] = block
        elif variant == "setitem":
            opened[name][0 : block.shape[0]] = block
        elif variant == "sync+zarr-check":
            meta = metas[name]
            if NDBuffer.from_numpy_array(block).all_equal(meta.fill_value):
                continue
            encoded = zs.encode_chunk(meta, block, write_empty_chunks=True)
            zs._write_file(root / path / meta.encode_chunk_key((0, 0)), encoded)
        else:
            zs.ZarrBlockWriter(str(root), path, shape, metas[name]).write(0, block)
    return time.perf_counter() - start


def metadata_variants(root: Path, arrays: int) -> dict[str, float]:
    """Seconds to create ``arrays`` arrays with attrs, and to add finish-time attrs."""
    import zarr
    from zarr.codecs import BloscCodec

    specs = [
        zs.ArraySpec(f"a{i}", (512, 256), np.dtype(np.float32), 128, {"source_dtype": "bfloat16"})
        for i in range(arrays)
    ]
    checks = {s.name: {"xxh3_128": "0" * 32, "checksum_block_rows": 128} for s in specs}
    out: dict[str, float] = {}

    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    group = zarr.open_group(str(root), mode="w", zarr_format=3)
    group.attrs["streamvec"] = {"format": 1}
    for s in specs:
        arr = group.create_array(
            name=s.name,
            shape=s.shape,
            chunks=(s.chunk_rows, s.shape[1]),
            dtype="float32",
            compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
            fill_value=0,
        )
        arr.attrs.update({"name": s.name, "dtype": "float32", **s.attrs})
    out["create: create_array + attrs.update per array"] = time.perf_counter() - start
    start = time.perf_counter()
    group = zarr.open_group(str(root), mode="r+")
    for name, attrs in checks.items():
        group[name].attrs.update(attrs)
    out["finish: attrs.update per array"] = time.perf_counter() - start

    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    zs.create_store(root, {"format": 1}, specs)
    out["create: create_store (templates + create_hierarchy)"] = time.perf_counter() - start
    start = time.perf_counter()
    zs.set_array_attrs(root, checks)
    out["finish: set_array_attrs (one rewrite per array)"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("base")
    ap.add_argument("finetuned")
    ap.add_argument("--blocks", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--arrays", type=int, default=200)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    blocks = real_blocks(args.base, args.finetuned, args.blocks)
    nbytes = sum(b.nbytes for _, _, b in blocks)
    work = Path(tempfile.mkdtemp(prefix="streamvec-storebench-", dir="/tmp"))
    variants = ["setitem+open", "setitem", "sync+zarr-check", "sync"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    meta: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for v in variants:
                times[v].append(write_variant(v, work / v, blocks))
            for k, s in metadata_variants(work / "meta", args.arrays).items():
                meta.setdefault(k, []).append(s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(blocks)} blocks, {nbytes / 1e6:.0f} MB float32, {args.rounds} rounds, 1 thread")
    print(f"{'write path':18s} {'median s':>9s} {'GB/s':>6s}  all")
    for v in variants:
        med = statistics.median(times[v])
        runs = " ".join(f"{t:.2f}" for t in times[v])
        print(f"{v:18s} {med:9.3f} {nbytes / med / 1e9:6.2f}  {runs}")
    print(f"\n{args.arrays} arrays of metadata:")
    for k, v in meta.items():
        print(f"{k:55s} median {statistics.median(v):6.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
