"""Read buffers reused from block to block: what a block read returns, and what the pool keeps."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from streamvec.errors import InputChangedError
from streamvec.io.blocks import SafetensorsReader, file_stamp
from streamvec.io.read_buffers import GRANULE, ReadBuffers
from tests.conftest import BF16


@pytest.fixture()
def shard(tmp_path: Path) -> tuple[SafetensorsReader, np.ndarray]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 300)).astype(np.float32)
    path = tmp_path / "model.safetensors"
    save_file({"w": w}, str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert np.array_equal(f.get_tensor("w"), w)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    reader = SafetensorsReader(str(path), 8 + header, w.shape, w.dtype, file_stamp(path.stat()))
    return reader, w


def test_pooled_reads_equal_fresh_reads_and_reuse_one_map(shard) -> None:
    reader, w = shard
    pool = ReadBuffers()
    for r0, r1 in [(0, 16), (16, 32), (32, 40), (40, 64)]:
        with pool.lease() as lease:
            rows = reader.read(r0, r1, lease)
            assert np.array_equal(rows, w[r0:r1])
            assert np.array_equal(rows, reader.read(r0, r1))
        assert len(pool) == 1  # the one map came back, and was taken again
    # two operands at once: two maps, both kept for the next block
    with pool.lease() as lease:
        a, b = reader.read(0, 8, lease), reader.read(8, 16, lease)
        assert np.array_equal(a, w[:8]) and np.array_equal(b, w[8:16])
        assert len(pool) == 0
    assert len(pool) == 2


def test_the_pool_never_holds_more_maps_than_were_borrowed_at_once() -> None:
    pool = ReadBuffers()
    for size in [1, GRANULE + 1, 3 * GRANULE, 10, 5 * GRANULE]:  # growing requests
        with pool.lease() as lease:
            area = lease.take(size)
            assert len(area) >= size
    assert len(pool) == 1
    with pool.lease() as lease:
        assert len(lease.take(100)) == 5 * GRANULE  # the smallest map that fits


def test_a_pool_arrives_empty_in_another_process() -> None:
    pool = ReadBuffers()
    with pool.lease() as lease:
        lease.take(10)
    assert len(pool) == 1
    assert len(pickle.loads(pickle.dumps(pool))) == 0


def test_a_truncated_input_is_still_an_error_with_a_lease(shard) -> None:
    reader, _ = shard
    pool = ReadBuffers()
    with pool.lease() as lease:
        reader.read(0, 64, lease)
    with open(reader.path, "r+b") as f:
        f.truncate(reader.offset + 100)
    with pytest.raises(InputChangedError, match="changed size"), pool.lease() as lease:
        reader.read(0, 64, lease)
    assert len(pool) == 1  # the lease gave its map back on the error


def test_bf16_rows_through_a_lease(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    w = np.arange(96, dtype=np.float32).reshape(8, 12).astype(BF16)
    path = tmp_path / "b.safetensors"
    save_file({"w": w.view(np.uint16)}, str(path))
    header = int.from_bytes(path.read_bytes()[:8], "little")
    reader = SafetensorsReader(str(path), 8 + header, w.shape, BF16)
    with ReadBuffers().lease() as lease:
        assert np.array_equal(reader.read(2, 7, lease).view(np.uint16), w[2:7].view(np.uint16))


def test_a_run_reuses_its_read_buffers_from_block_to_block(tmp_path: Path, monkeypatch) -> None:
    # The engine's pool must keep the maps its block tasks give back: a run of many blocks
    # makes one map per operand read at once, not one per operand per block.
    import streamvec as sv
    from streamvec.io import read_buffers
    from tests.conftest import rounded_once, write_checkpoint

    rng = np.random.default_rng(3)
    b = (rng.standard_normal((64, 256)) * 0.02).astype(BF16)
    f = (b.astype(np.float32) + rng.standard_normal((64, 256)).astype(np.float32) * 1e-3).astype(
        BF16
    )
    base = write_checkpoint(tmp_path / "base", {"w": b})
    ft = write_checkpoint(tmp_path / "ft", {"w": f})
    made = []
    real = read_buffers.anonymous_map
    monkeypatch.setattr(read_buffers, "anonymous_map", lambda n: made.append(n) or real(n))
    model = sv.open(base) + 0.3 * (sv.open(ft) - sv.open(base))
    model.save(tmp_path / "out", progress=False, workers=1, block_size=8 * 256 * 4)  # 8 blocks
    assert len(made) == 2, made  # base and fine-tune rows, each map reused by all 8 blocks
    from safetensors.numpy import load_file

    got = load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))["w"]
    want = b.astype(np.float64) + 0.3 * (f.astype(np.float64) - b.astype(np.float64))
    assert got.view(np.uint16).tobytes() == rounded_once(want, BF16).view(np.uint16).tobytes()


def test_float32_copies_into_a_lease_equal_fresh_ones() -> None:
    # Merges upcast their operands into the block task's maps (kernel.upcast32 with out=).
    from streamvec.compute.kernel import upcast32

    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 7)).astype(np.float32)
    pool = ReadBuffers()
    for block in (x.astype(BF16), x.astype(np.float16), x, x.astype(BF16)[:, ::2]):
        with pool.lease() as lease:
            area = lease.array(block.shape, np.float32)
            assert area.flags.c_contiguous and area.flags.writeable
            area[...] = np.nan  # whatever the last block left
            got = upcast32(block, area)
            assert got is area
            assert got.tobytes() == block.astype(np.float64).astype(np.float32).tobytes()
