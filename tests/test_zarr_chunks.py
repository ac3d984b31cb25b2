"""The synchronous chunk reader returns exactly what zarr's own ``__getitem__`` returns.

It reads the arrays streamvec writes (float dtypes, bytes + blosc, whole rows per chunk) and
refuses anything else with a :class:`StoreError` rather than guessing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from streamvec.errors import StoreError
from streamvec.io.read_buffers import ReadBuffers
from streamvec.io.zarr.chunks import read_rows
from streamvec.io.zarr.store import record_empty_chunks

CODECS = {
    "lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
    "zstd": [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")],
    "none": None,
}


def make_array(root: Path, name: str, data: np.ndarray, chunk_rows: int, codec: str) -> None:
    chunks = (chunk_rows, *data.shape[1:]) if data.ndim else ()
    arr = zarr.create_array(
        str(root),
        name=name,
        shape=data.shape,
        chunks=chunks,
        dtype=data.dtype,
        compressors=CODECS[codec],
        fill_value=0,
        zarr_format=3,
    )
    arr[...] = data
    record_empty_chunks(root)  # as streamvec's writers do when they finish


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.uint16])
def test_rows_match_zarr_for_any_range(tmp_path: Path, codec: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((37, 3, 5)) * 100).astype(dtype)
    data[8:16] = 0  # a whole chunk of fill value: zarr does not write it
    make_array(tmp_path, "w", data, chunk_rows=8, codec=codec)
    assert not (tmp_path / "w" / "c" / "1" / "0" / "0").exists()  # the skipped chunk
    want = zarr.open_array(str(tmp_path), path="w", mode="r")
    for r0, r1 in [(0, 37), (0, 8), (8, 16), (5, 30), (32, 37), (36, 37), (3, 3)]:
        got = read_rows(str(tmp_path), "w", r0, r1)
        assert got is not None
        assert got.dtype == data.dtype and got.shape == (r1 - r0, 3, 5)
        assert np.array_equal(got, want[r0:r1]), (r0, r1)


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_rows_decoded_into_reused_buffers_match_zarr(
    tmp_path: Path, codec: str, dtype: type
) -> None:
    # The engine's path: chunks read and decoded straight into maps a run reuses from block
    # to block, dirty with the last block's bytes (a skipped chunk must still read as zeros).
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((37, 3, 5)) * 100).astype(dtype)
    data[8:16] = 0
    make_array(tmp_path, "w", data, chunk_rows=8, codec=codec)
    want = zarr.open_array(str(tmp_path), path="w", mode="r")
    pool = ReadBuffers()
    for r0, r1 in [(0, 8), (8, 16), (16, 24), (5, 30), (32, 37), (0, 37), (8, 16), (36, 37)]:
        with pool.lease() as lease:
            for _ in range(3):
                area = lease.take(8 * 15 * 8)
                area[:] = b"\xff" * len(area)
        with pool.lease() as lease:
            got = read_rows(str(tmp_path), "w", r0, r1, lease=lease)
            assert got.dtype == data.dtype and got.shape == (r1 - r0, 3, 5)
            assert np.array_equal(got, want[r0:r1]), (r0, r1)


@pytest.mark.parametrize("codec", list(CODECS))
def test_rows_decoded_into_the_callers_array_match_zarr(tmp_path: Path, codec: str) -> None:
    """``out=``: whole chunks decoded straight into it, partial ones (a range's ends, the padded
    last chunk) through scratch; a recorded-empty chunk is zeros there too."""
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((37, 3, 5)) * 100).astype(np.float32)
    data[8:16] = 0  # a whole chunk of fill value: no file
    make_array(tmp_path, "w", data, chunk_rows=8, codec=codec)
    want = zarr.open_array(str(tmp_path), path="w", mode="r")
    for r0, r1 in [(0, 37), (0, 8), (8, 16), (5, 30), (16, 32), (32, 37), (3, 3)]:
        out = np.full((r1 - r0, 3, 5), np.nan, np.float32)  # no stale value can pass
        got = read_rows(str(tmp_path), "w", r0, r1, out=out)
        assert np.shares_memory(got, out) or out.size == 0
        assert np.array_equal(out, want[r0:r1]), (r0, r1)
    with pytest.raises(ValueError, match="C-contiguous array of"):
        read_rows(str(tmp_path), "w", 0, 8, out=np.empty((7, 3, 5), np.float32))
    with pytest.raises(ValueError, match="C-contiguous array of"):
        read_rows(str(tmp_path), "w", 0, 8, out=np.empty((8, 5, 3), np.float32).swapaxes(1, 2))
    make_array(tmp_path, "s", np.array(2.5, np.float32), chunk_rows=1, codec=codec)
    scalar = np.zeros((), np.float32)
    read_rows(str(tmp_path), "s", 0, 1, out=scalar)
    assert scalar == 2.5


def test_a_chunk_changed_after_opening_is_refused_when_read_into_an_array(
    tmp_path: Path,
) -> None:
    """The in-place decode keeps the reader's checks: the recorded digest of each chunk."""
    from streamvec.io.zarr.store import read_store
    from streamvec.ops.task_vector import task_vector

    from .conftest import write_checkpoint

    data = np.arange(32 * 4, dtype=np.float32).reshape(32, 4)
    base = write_checkpoint(tmp_path / "base", {"w": np.zeros_like(data)})
    ft = write_checkpoint(tmp_path / "ft", {"w": data})
    task_vector(base, ft).save(tmp_path / "s.zarr", progress=False)  # digests recorded
    reader = read_store(tmp_path / "s.zarr").arrays["w"].reader(tmp_path / "s.zarr")
    out = np.empty((32, 4), np.float32)
    reader.read_into(0, 32, out)
    assert np.array_equal(out, data)
    chunk = next(p for p in (tmp_path / "s.zarr" / "w" / "c").rglob("*") if p.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF  # one byte of the compressed data
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError):
        reader.read_into(0, 32, out)


def test_zero_dim_and_one_dim(tmp_path: Path) -> None:
    make_array(tmp_path, "s", np.array(2.5, np.float32), chunk_rows=1, codec="lz4")
    make_array(tmp_path, "v", np.arange(10, dtype=np.float32), chunk_rows=4, codec="lz4")
    assert np.array_equal(read_rows(str(tmp_path), "s", 0, 1), np.array(2.5, np.float32))
    assert np.array_equal(read_rows(str(tmp_path), "v", 2, 9), np.arange(2, 9, dtype=np.float32))


def test_arrays_it_does_not_know_are_refused(tmp_path: Path) -> None:
    data = np.arange(64, dtype=np.float32).reshape(8, 8)
    arr = zarr.create_array(str(tmp_path), name="split", shape=(8, 8), chunks=(4, 4), dtype="f4")
    arr[...] = data
    sharded = zarr.create_array(
        str(tmp_path), name="sh", shape=(8, 8), chunks=(2, 8), shards=(4, 8), dtype="f4"
    )
    sharded[...] = data
    zstd = zarr.create_array(
        str(tmp_path),
        name="z",
        shape=(8, 8),
        chunks=(4, 8),
        dtype="f4",
        compressors=[ZstdCodec(level=1)],
    )
    zstd[...] = data
    ints = zarr.create_array(str(tmp_path), name="i", shape=(8,), chunks=(4,), dtype="i8")
    ints[...] = np.arange(8)
    for name, fragment in [
        ("split", "does not split rows"),
        ("sh", "not one streamvec writes"),
        ("z", "not one streamvec writes"),
        ("i", "data type 'int64'"),
        ("missing", "is missing"),
    ]:
        with pytest.raises(StoreError, match=fragment):
            read_rows(str(tmp_path), name, 0, 8)


def test_rewritten_store_is_read_afresh(tmp_path: Path) -> None:
    make_array(tmp_path, "w", np.ones((4, 2), np.float32), chunk_rows=2, codec="lz4")
    assert read_rows(str(tmp_path), "w", 0, 4).sum() == 8
    # Same path, new metadata (another dtype): the cached layout must not be reused.
    import shutil

    shutil.rmtree(tmp_path / "w")
    make_array(tmp_path, "w", np.full((4, 2), 3, np.float64), chunk_rows=4, codec="none")
    meta = tmp_path / "w" / "zarr.json"
    os.utime(meta, ns=(meta.stat().st_atime_ns, meta.stat().st_mtime_ns + 10**9))
    got = read_rows(str(tmp_path), "w", 0, 4)
    assert got.dtype == np.float64 and got.sum() == 24
