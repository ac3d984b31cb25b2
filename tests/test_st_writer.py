"""The streaming sharded safetensors writer, checked against the reference readers and writer."""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import stat
import struct
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from streamvec.dtypes import BFLOAT16
from streamvec.errors import OutputError, StreamvecError
from streamvec.io.safetensors.layout import (
    INDEX_NAME,
    TensorSpec,
    encode_header,
    plan_shards,
    shard_file_names,
)
from streamvec.io.safetensors.writer import ShardedSafetensorsWriter


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype == np.int64:
        return rng.integers(-(2**62), 2**62, size=shape, dtype=np.int64)
    return rng.standard_normal(size=shape).astype(dtype)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
        "model.embed/tokens.weight": (BFLOAT16, (37, 16)),
        "layers.0.mask": (np.dtype(np.bool_), (13,)),  # odd size: later tensors misaligned
        "layers.0.attn.weight": (np.dtype(np.float16), (3, 4, 5, 6)),
        "layers.0.norm": (np.dtype(np.float32), (33,)),
        "layers.0.ids": (np.dtype(np.int64), (5, 7)),
        "layers.0.scale": (np.dtype(np.float64), ()),
        "bias.bf16": (BFLOAT16, (9,)),
        "empty": (np.dtype(np.float32), (0, 8)),
        "empty.inner": (np.dtype(np.float16), (4, 0)),
        "step": (np.dtype(np.int64), ()),
        "lm_head.weight": (np.dtype(np.float32), (50, 12)),
    }
    return {name: _random(rng, dt, shape) for name, (dt, shape) in shapes.items()}


def _specs(tensors: dict[str, np.ndarray]) -> list[TensorSpec]:
    return [TensorSpec(name, arr.dtype, arr.shape) for name, arr in tensors.items()]


def _blocks(tensors: dict[str, np.ndarray], seed: int) -> list[tuple[str, int, np.ndarray]]:
    """Row blocks of random heights, shuffled so that nothing arrives in order."""
    rng = random.Random(seed)
    blocks: list[tuple[str, int, np.ndarray]] = []
    for name, arr in tensors.items():
        if arr.ndim == 0:
            blocks.append((name, 0, arr if rng.random() < 0.5 else arr.reshape(1)))
            continue
        start = 0
        while start < arr.shape[0]:
            stop = min(arr.shape[0], start + rng.randint(1, 7))
            blocks.append((name, start, arr[start:stop]))
            start = stop
        if arr.shape[0] == 0:
            blocks.append((name, 0, arr))
    rng.shuffle(blocks)
    return blocks


def _bytes_np(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).tobytes()


def _bytes_pt(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _header(path: Path) -> tuple[bytes, dict[str, object]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[: 8 + n], json.loads(raw[8 : 8 + n])


@pytest.fixture
def written(tmp_path: Path) -> Iterator[tuple[Path, dict[str, np.ndarray], dict[str, str]]]:
    tensors = _tensors()
    writer = ShardedSafetensorsWriter(tmp_path, _specs(tensors), shard_size=1500)
    with writer:
        writer.create()
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda b: writer.write_rows(*b), _blocks(tensors, seed=1)))
        weight_map = writer.finish()
    yield tmp_path, tensors, weight_map


# -- planning -------------------------------------------------------------------------------


def _sized(*sizes: int) -> list[TensorSpec]:
    return [TensorSpec(f"t{i}", np.dtype(np.uint8), (n,)) for i, n in enumerate(sizes)]


def test_plan_shards_greedy_in_order() -> None:
    def names(shards: list[list[TensorSpec]]) -> list[list[str]]:
        return [[s.name for s in shard] for shard in shards]

    assert names(plan_shards(_sized(4, 4, 4), 8)) == [["t0", "t1"], ["t2"]]
    assert names(plan_shards(_sized(3, 5, 1), 8)) == [["t0", "t1"], ["t2"]]  # exact fit stays
    # Too big for any shard: alone, and where it was in the order.
    assert names(plan_shards(_sized(2, 20, 2), 8)) == [["t0"], ["t1"], ["t2"]]
    assert names(plan_shards(_sized(20, 2, 2), 8)) == [["t0"], ["t1", "t2"]]
    assert names(plan_shards(_sized(0, 8, 0), 8)) == [["t0", "t1", "t2"]]
    assert plan_shards([], 8) == []


@pytest.mark.parametrize("size", [0, -1])
def test_plan_shards_rejects_nonpositive_size(size: int) -> None:
    with pytest.raises(StreamvecError, match="shard size"):
        plan_shards(_sized(1), size)


@given(st.lists(st.integers(0, 50), max_size=30), st.integers(1, 60))
def test_plan_shards_invariants(sizes: list[int], shard_size: int) -> None:
    specs = _sized(*sizes)
    shards = plan_shards(specs, shard_size)
    assert [s for shard in shards for s in shard] == specs
    for k, shard in enumerate(shards):
        assert shard
        total = sum(s.nbytes for s in shard)
        assert total <= shard_size or len(shard) == 1
        if k + 1 < len(shards):  # greedy: the next tensor really did not fit
            assert total + shards[k + 1][0].nbytes > shard_size


def test_shard_file_names() -> None:
    assert shard_file_names(1) == ["model-00001-of-00001.safetensors"]
    assert shard_file_names(3)[1] == "model-00002-of-00003.safetensors"
    assert shard_file_names(0) == []


def test_tensor_spec() -> None:
    spec = TensorSpec("w", "float16", [np.int64(3), 4])  # type: ignore[arg-type]
    assert spec.dtype == np.dtype(np.float16) and spec.shape == (3, 4) and spec.nbytes == 24
    assert TensorSpec("s", BFLOAT16, ()).nbytes == 2
    assert TensorSpec("e", np.dtype(np.float64), (0, 5)).nbytes == 0
    with pytest.raises(StreamvecError, match="'c'.*complex"):
        TensorSpec("c", np.dtype(np.complex64), (2,))
    with pytest.raises(StreamvecError, match="negative"):
        TensorSpec("n", np.dtype(np.float32), (-1,))


# -- round trip through the reference readers -----------------------------------------------


def test_round_trip_numpy_and_torch(
    written: tuple[Path, dict[str, np.ndarray], dict[str, str]],
) -> None:
    directory, tensors, weight_map = written
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    assert len(files) > 2 and files == shard_file_names(len(files))
    assert sorted(weight_map) == sorted(tensors)
    seen = set()
    for file in files:
        with safe_open(directory / file, framework="numpy") as f_np:
            assert f_np.metadata() == {"format": "pt"}
            names_np = f_np.keys()  # safe_open handles are not iterable
            for name in names_np:
                got = f_np.get_tensor(name)
                assert got.dtype == tensors[name].dtype and got.shape == tensors[name].shape
                assert _bytes_np(got) == _bytes_np(tensors[name]), name
                assert weight_map[name] == file
                seen.add(name)
        with safe_open(directory / file, framework="pt") as f_pt:
            names_pt = f_pt.keys()
            assert names_pt == names_np
            for name in names_pt:
                t = f_pt.get_tensor(name)
                assert tuple(t.shape) == tensors[name].shape
                assert _bytes_pt(t) == _bytes_np(tensors[name]), name
        loaded = safetensors.torch.load_file(directory / file)
        assert loaded.keys() == {n for n, f in weight_map.items() if f == file}
        for name, t in loaded.items():
            assert _bytes_pt(t) == _bytes_np(tensors[name]), name
            if tensors[name].dtype == BFLOAT16:
                assert t.dtype == torch.bfloat16
    assert seen == set(tensors)


def test_index_file(written: tuple[Path, dict[str, np.ndarray], dict[str, str]]) -> None:
    directory, tensors, weight_map = written
    index = json.loads((directory / INDEX_NAME).read_text())
    assert index == {
        "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
        "weight_map": weight_map,
    }
    assert list(weight_map) == list(tensors)  # spec order
    assert not list(directory.glob(".*"))  # no temp file left behind


def test_file_modes_ignore_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        tensors = _tensors()
        with ShardedSafetensorsWriter(tmp_path, _specs(tensors), shard_size=10**6) as writer:
            writer.create()
            for block in _blocks(tensors, seed=2):
                writer.write_rows(*block)
            writer.finish(fsync=False)
    finally:
        os.umask(old)
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_matches_reference_writer_byte_for_byte(tmp_path: Path) -> None:
    tensors = _tensors()
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, ref, metadata={"format": "pt"})
    ref_header, ref_json = _header(ref)
    # The reference sorts tensors itself; follow its order to get the same offsets.
    order = sorted(
        (n for n in ref_json if n != "__metadata__"),
        key=lambda n: ref_json[n]["data_offsets"],  # type: ignore[index]
    )
    specs = [TensorSpec(n, tensors[n].dtype, tensors[n].shape) for n in order]
    out = tmp_path / "out"
    out.mkdir()
    with ShardedSafetensorsWriter(out, specs, shard_size=10**9) as writer:
        writer.create()
        (shard,) = writer.files
        assert _header(shard)[0] == ref_header  # right after create, before any data
        for block in _blocks(tensors, seed=3):
            writer.write_rows(*block)
        writer.finish()
    assert shard.read_bytes() == ref.read_bytes()


def test_header_in_spec_order_is_accepted(tmp_path: Path) -> None:
    tensors = _tensors()
    prefix, offsets = encode_header(_specs(tensors), {"format": "pt", "note": "ünïcode"})
    assert len(prefix) % 8 == 0 and prefix[-1:] in (b"}", b" ")
    header = json.loads(prefix[8:])
    assert list(header) == ["__metadata__", *tensors]
    assert [tuple(header[n]["data_offsets"]) for n in tensors] == offsets
    assert offsets[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(offsets))
    # The reference reader accepts it (contiguity, sizes, trailing spaces).
    path = tmp_path / "x.safetensors"
    path.write_bytes(prefix + b"\0" * offsets[-1][1])
    with safe_open(path, framework="numpy") as f:
        assert f.metadata()["note"] == "ünïcode"
        assert list(f.keys()) == sorted(tensors)


# -- write_rows details -----------------------------------------------------------------------


def _one(tmp_path: Path, *specs: TensorSpec, **kw: object) -> ShardedSafetensorsWriter:
    writer = ShardedSafetensorsWriter(tmp_path, list(specs), shard_size=10**6, **kw)  # type: ignore[arg-type]
    writer.create()
    return writer


def test_scalar_block_shapes_and_location(tmp_path: Path) -> None:
    writer = _one(
        tmp_path,
        TensorSpec("a", np.dtype(np.float32), ()),
        TensorSpec("b", np.dtype(np.float32), ()),
        TensorSpec("m", np.dtype(np.int64), (2, 2)),
    )
    writer.write_rows("a", 0, np.array(1.5, np.float32))
    writer.write_rows("b", 0, np.array([2.5], np.float32))
    # location(): another writer (a raw copy, say) can put bytes there itself.
    path, offset = writer.location("m")
    assert path == writer.files[0] and offset == _header(path)[0].__len__() + 8
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.arange(4, dtype=np.int64).tobytes())
    assert writer.missing() == {"m": [(0, 2)]}
    with pytest.raises(StreamvecError, match="not fully written"):
        writer.finish()
    writer.finish(require_complete=False)
    with safe_open(path, framework="numpy") as f:
        assert f.get_tensor("a") == np.float32(1.5) and f.get_tensor("b") == np.float32(2.5)
        assert f.get_tensor("m").tolist() == [[0, 1], [2, 3]]


def test_non_contiguous_block(tmp_path: Path) -> None:
    full = np.arange(24, dtype=np.float32).reshape(4, 6)
    writer = _one(tmp_path, TensorSpec("w", full.dtype, (4, 3)))
    writer.write_rows("w", 0, full[:, ::2])
    writer.finish()
    with safe_open(writer.files[0], framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("w"), full[:, ::2])


@pytest.mark.parametrize(
    ("name", "row_start", "block", "match"),
    [
        ("w", 0, np.zeros((1, 3), np.float64), r"'w'.*expected dtype float32, got float64"),
        ("w", 0, np.zeros((1, 3), BFLOAT16), r"'w'.*expected dtype float32, got bfloat16"),
        ("w", 0, np.zeros((1, 4), np.float32), r"'w'.*expected a block of shape \(rows, 3\)"),
        ("w", 0, np.zeros(3, np.float32), r"'w'.*expected a block of shape"),
        ("w", 3, np.zeros((2, 3), np.float32), r"'w'.*rows 3\.\.5 are outside 0\.\.4"),
        ("w", -1, np.zeros((1, 3), np.float32), r"'w'.*outside"),
        ("s", 1, np.zeros((), np.float32), r"'s' is 0-d"),
        ("s", 0, np.zeros((2,), np.float32), r"'s' is 0-d"),
        ("nope", 0, np.zeros((1, 3), np.float32), r"'nope' is not in"),
        ("w", 0, [[1.0, 2.0, 3.0]], r"'w'.*numpy array"),
    ],
)
def test_bad_blocks(
    tmp_path: Path, name: str, row_start: int, block: np.ndarray, match: str
) -> None:
    specs = TensorSpec("w", np.dtype(np.float32), (4, 3)), TensorSpec("s", np.dtype("f4"), ())
    with _one(tmp_path, *specs) as writer, pytest.raises(StreamvecError, match=match):
        writer.write_rows(name, row_start, block)


def test_bad_requests(tmp_path: Path) -> None:
    spec = TensorSpec("w", np.dtype(np.float32), (2,))
    with pytest.raises(StreamvecError, match="listed twice"):
        ShardedSafetensorsWriter(tmp_path, [spec, spec], shard_size=100)
    with pytest.raises(StreamvecError, match="reserved"):
        ShardedSafetensorsWriter(
            tmp_path, [TensorSpec("__metadata__", np.dtype("f4"), (1,))], shard_size=100
        )
    with pytest.raises(StreamvecError, match="no tensors"):
        ShardedSafetensorsWriter(tmp_path, [], shard_size=100)
    with pytest.raises(StreamvecError, match="strings"):
        ShardedSafetensorsWriter(tmp_path, [spec], shard_size=100, metadata={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(OutputError, match="does not exist"):
        ShardedSafetensorsWriter(tmp_path / "missing", [spec], shard_size=100).create()


def test_lifecycle(tmp_path: Path) -> None:
    spec = TensorSpec("w", np.dtype(np.float32), (2,))
    writer = ShardedSafetensorsWriter(tmp_path, [spec], shard_size=100, metadata={})
    with pytest.raises(StreamvecError, match="writer is new"):
        writer.write_rows("w", 0, np.zeros(2, np.float32))
    with writer:
        writer.create()
        with pytest.raises(StreamvecError, match="already called"):
            writer.create()
        writer.write_rows("w", 0, np.ones(2, np.float32))
    writer.close()  # idempotent
    with pytest.raises(StreamvecError, match="writer is closed"):
        writer.write_rows("w", 0, np.zeros(2, np.float32))
    with pytest.raises(StreamvecError, match="writer is closed"):
        writer.finish()
    assert not (tmp_path / INDEX_NAME).exists()  # close() never writes the index
    with safe_open(writer.files[0], framework="numpy") as f:
        assert f.metadata() is None  # metadata={} means no __metadata__ at all


def test_existing_files_need_overwrite(tmp_path: Path) -> None:
    spec = TensorSpec("w", np.dtype(np.float32), (2,))
    for _ in range(2):
        with ShardedSafetensorsWriter(tmp_path, [spec], shard_size=100, overwrite=True) as w:
            w.create()
            w.write_rows("w", 0, np.ones(2, np.float32))
            w.finish(fsync=False)
    with pytest.raises(OutputError, match=INDEX_NAME + ": File exists"):
        ShardedSafetensorsWriter(tmp_path, [spec], shard_size=100).create()
    (tmp_path / INDEX_NAME).unlink()
    before = (tmp_path / "model-00001-of-00001.safetensors").read_bytes()
    with pytest.raises(OutputError, match=r"model-00001-of-00001\.safetensors: File exists"):
        ShardedSafetensorsWriter(tmp_path, [spec], shard_size=100).create()
    assert (tmp_path / "model-00001-of-00001.safetensors").read_bytes() == before  # untouched


# -- disk full --------------------------------------------------------------------------------


def _enospc(*args: object, **kwargs: object) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_on_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _one(tmp_path, TensorSpec("w", np.dtype(np.float32), (4,))) as writer:
        monkeypatch.setattr(os, "pwrite", _enospc)
        with pytest.raises(OutputError, match=r"model-00001-of-00001\.safetensors.*free disk"):
            writer.write_rows("w", 0, np.ones(4, np.float32))


def test_enospc_on_create(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = _sized(10, 10)
    monkeypatch.setattr(os, "ftruncate", _enospc)
    writer = ShardedSafetensorsWriter(tmp_path, specs, shard_size=10)
    with pytest.raises(OutputError, match="No space left.*free disk") as info:
        writer.create()
    assert isinstance(info.value.__cause__, OSError)
    assert not list(tmp_path.iterdir())  # half-made shards removed
    monkeypatch.undo()
    writer.create()  # a failed create can be retried
    writer.close()


def test_free_space_checked_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs(tmp_path)

    class Full:
        f_bavail = 1
        f_frsize = real.f_frsize

    monkeypatch.setattr(os, "statvfs", lambda _path: Full())
    with pytest.raises(OutputError, match="needs .* bytes"):
        ShardedSafetensorsWriter(tmp_path, _sized(10**6), shard_size=10**7).create()
    assert not list(tmp_path.iterdir())


def test_short_writes_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite

    def short_pwrite(fd: int, data: memoryview, offset: int) -> int:
        return real_pwrite(fd, data[:3], offset)  # as a signal or the 2 GiB cap would

    tensors = _tensors()
    with ShardedSafetensorsWriter(tmp_path, _specs(tensors), shard_size=10**6) as writer:
        monkeypatch.setattr(os, "pwrite", short_pwrite)
        writer.create()
        for block in _blocks(tensors, seed=4):
            writer.write_rows(*block)
        writer.finish()
    with safe_open(writer.files[0], framework="numpy") as f:
        for name, arr in tensors.items():
            assert _bytes_np(f.get_tensor(name)) == _bytes_np(arr), name


def test_flush_error_leaves_no_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = _one(tmp_path, TensorSpec("w", np.dtype(np.float32), (2,)))
    writer.write_rows("w", 0, np.ones(2, np.float32))

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", eio, raising=False)
    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OutputError, match="cannot flush .*model-00001-of-00001"):
        writer.finish()
    assert not (tmp_path / INDEX_NAME).exists()
    with pytest.raises(StreamvecError, match="writer is closed"):
        writer.write_rows("w", 0, np.ones(2, np.float32))


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 6)), max_size=15))
def test_missing_rows_tracks_any_write_pattern(writes: list[tuple[int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        writer = _one(Path(tmp), TensorSpec("w", np.dtype(np.int8), (26, 1)))
        done: set[int] = set()
        for start, n in writes:
            writer.write_rows("w", start, np.zeros((n, 1), np.int8))
            done.update(range(start, start + n))
        holes = writer.missing().get("w", [])
        assert {r for a, b in holes for r in range(a, b)} == set(range(26)) - done
        assert all(b < c for (_, b), (c, _) in itertools.pairwise(holes))  # merged
        writer.close()


def test_writeback_is_started_for_large_writes_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each block written starts its writeback, except blocks too small to be worth a call
    (metadata, small factor chunks): those are left to the final sync. The bytes land either
    way."""
    from streamvec.io import writeback

    advised: list[tuple[int, int]] = []
    monkeypatch.setattr(writeback, "_FADVISE", lambda fd, off, n, how: advised.append((off, n)))
    small = writeback.SMALL_WRITE_BYTES
    path = tmp_path / "out.bin"
    path.write_bytes(bytes(2 * small))
    rng = np.random.default_rng(0)
    little = rng.integers(0, 256, small - 1, dtype=np.uint8)
    large = rng.integers(0, 256, small, dtype=np.uint8)
    writeback.write_at(str(path), 0, little)
    writeback.write_at(str(path), small, large)
    assert advised == [(small, small)]
    assert path.read_bytes() == little.tobytes() + b"\0" + large.tobytes()
