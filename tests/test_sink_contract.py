"""The sink contract (tests/sink_contract.py) run against every sink, as the engine uses each.

Inputs are a tiny bf16 Llama saved by transformers (a base and a fine-tune) and a small FP8
pair in the DeepSeek-V3 block layout (tests/test_quantized.py); outputs are read back by the
real consumers: zarr for stores, transformers ``from_pretrained`` for models, and
``safetensors.safe_open`` with torch's dequantization for FP8 shards.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from safetensors import safe_open

import streamvec as sv
from streamvec.engine.sinks import SafetensorsSink, ZarrSink
from streamvec.io.companions import companions_for
from streamvec.model.algebra import Model
from streamvec.names import encode_array_path
from streamvec.units import parse_size

from .conftest import BF16, finetune_of, mixed_tensors, tiny_llama_config, write_checkpoint
from .sink_contract import SinkCase, SinkTests

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHARD_SIZE = "20kB"
BLOCK_SIZE = "2kB"  # a few blocks per tensor when the engine plans them


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny bf16 Llama (untied head) and a fine-tune of it, saved by transformers."""
    root = tmp_path_factory.mktemp("sink-llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False))
    model = model.to(torch.bfloat16)
    model.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.01 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    model.save_pretrained(root / "ft")
    return {"base": root / "base", "ft": root / "ft"}


STORE_TENSORS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.norm.weight",
]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every geometry: 0-d, 1-d, 4-d, zero rows, zero columns, a '/' name, an int buffer."""
    root = tmp_path_factory.mktemp("sink-mixed")
    base = mixed_tensors(0, np.dtype(np.float32)) | {
        "model.empty": np.zeros((0, 4), np.float32),
        "model.flat": np.zeros((3, 0), np.float32),
    }
    return {
        "base": write_checkpoint(root / "base", base),
        "ft": write_checkpoint(root / "ft", finetune_of(base, 1)),
    }


def _load_safetensors(out: Path) -> dict[str, np.ndarray]:
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as h:
            got |= {k: h.get_tensor(k) for k in h.keys()}
    return got


def _rows(block: int) -> Any:
    return lambda t: block


def _load_store(model: Model) -> Any:
    def load(out: Path) -> dict[str, np.ndarray]:
        got = {}
        for name, t in model.resolved().tensors.items():
            data = zarr.open_array(str(out), path=encode_array_path(name), mode="r")[...]
            if t.dtype == BF16:
                data = data.view(BF16)  # zarr has no bfloat16: the bits are stored as uint16
            got[name] = data
        return got

    return load


class TestZarrSinkMixed(SinkTests):
    """A task vector of tensors of every geometry (int buffers are left out of it)."""

    @pytest.fixture
    def case(self, mixed: dict[str, Path]) -> SinkCase:
        model = sv.open(mixed["ft"]) - sv.open(mixed["base"])
        return SinkCase(
            model,
            ZarrSink,
            _load_store(model),
            _rows(5),
            {"format": "zarr", "block_size": "256B"},
        )


class TestSafetensorsSinkMixed(SinkTests):
    """A model of tensors of every geometry (the int buffer passed through from the base)."""

    @pytest.fixture
    def case(self, mixed: dict[str, Path]) -> SinkCase:
        base = sv.open(mixed["base"])
        model = base + 0.5 * (sv.open(mixed["ft"]) - base)
        return SinkCase(
            model,
            lambda: SafetensorsSink(parse_size("4kB")),
            _load_safetensors,
            _rows(5),
            {"format": "safetensors", "shard_size": "4kB", "block_size": "256B"},
        )


class TestZarrSink(SinkTests):
    """Task vectors in a Zarr store: float32 with lz4, bfloat16 (uint16 bits) uncompressed."""

    @pytest.fixture(params=[("lz4", "float32"), ("none", "bfloat16")], ids=["lz4-f32", "raw-bf16"])
    def case(self, request: pytest.FixtureRequest, llama: dict[str, Path]) -> SinkCase:
        compression, dtype = request.param
        # A few tensors (2-d, 1-d; rows not a multiple of the blocks): zarr's per-array
        # metadata makes each tensor cost more than the bytes.
        ft, base = (sv.open(llama[k], include=STORE_TENSORS) for k in ("ft", "base"))
        model = (ft - base).astype(dtype)
        return SinkCase(
            model,
            lambda: ZarrSink(compression),
            _load_store(model),
            _rows(5),
            {"format": "zarr", "compression": compression, "block_size": BLOCK_SIZE},
        )

    def test_consolidated_metadata_is_the_document_zarr_writes(
        self, case: SinkCase, tmp_path: Path
    ) -> None:
        """The store's root ``zarr.json`` (consolidated by streamvec's own walk) is the one
        ``zarr.consolidate_metadata`` writes for the same nodes, byte for byte."""
        from .sink_contract import write_output

        ours = tmp_path / "ours"
        write_output(case, ours)
        reference = tmp_path / "zarr"
        shutil.copytree(ours, reference)
        with warnings.catch_warnings():  # consolidated metadata is not in the v3 spec yet
            warnings.simplefilter("ignore", UserWarning)
            zarr.consolidate_metadata(str(reference))
        assert (ours / "zarr.json").read_bytes() == (reference / "zarr.json").read_bytes()
        root = json.loads((ours / "zarr.json").read_bytes())
        assert len(root["consolidated_metadata"]["metadata"]) == len(case.plan())
        # the run's attrs, written with the consolidated metadata in the root's one rewrite
        recorded = root["attributes"]["streamvec"]
        for key, value in case.attrs().items():
            assert recorded[key] == json.loads(json.dumps(value)), key


def _load_transformers(out: Path) -> dict[str, np.ndarray]:
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    return {k: v.float().numpy().astype(BF16) for k, v in loaded.state_dict().items()}


class TestSafetensorsSink(SinkTests):
    """An edited model as sharded safetensors with the base's config, loaded by transformers."""

    @pytest.fixture
    def case(self, llama: dict[str, Path]) -> SinkCase:
        base = sv.open(llama["base"])
        model = base + 0.5 * (sv.open(llama["ft"]) - base)

        def make() -> SafetensorsSink:
            companions = companions_for(model.anchor(), model.resolved().vocab)
            return SafetensorsSink(parse_size(SHARD_SIZE), companions=companions)

        return SinkCase(
            model,
            make,
            _load_transformers,
            _rows(5),
            {"format": "safetensors", "shard_size": SHARD_SIZE, "block_size": BLOCK_SIZE},
        )


FP8_LAYOUTS = [("block", "e4m3"), ("channel", "e4m3"), ("tensor", "e5m2")]


@pytest.fixture(scope="module")
def fp8_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    from .test_quantized import make_pair

    root = tmp_path_factory.mktemp("sink-fp8")
    # 260 rows: three 128-row scale tiles, the last short.
    return {lay: make_pair(root, lay, fmt, shape=(260, 40)) for lay, fmt in FP8_LAYOUTS}


def _load_fp8(model: Model) -> Any:
    from .test_quantized import dequantize

    def load(out: Path) -> dict[str, np.ndarray]:
        stored = {}
        for f in sorted(out.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                stored |= {k: h.get_tensor(k) for k in h.keys()}
        got = {}
        for name, t in model.resolved().tensors.items():
            scheme = t.requantize
            if scheme is None:
                got[name] = stored[name].numpy()
            else:
                # What transformers computes: the 8-bit value times its tile's scale, float32.
                got[name] = dequantize(stored[name], stored[scheme.scale_name]).astype(np.float32)
        return got

    return load


class TestFp8SafetensorsSink(SinkTests):
    """An FP8 model kept in the base's format: weights re-quantized with fresh scales (per
    128 x 128 tile, per row, per tensor)."""

    @pytest.fixture(params=[lay for lay, _ in FP8_LAYOUTS])
    def case(self, request: pytest.FixtureRequest, fp8_pairs: dict[str, dict]) -> SinkCase:
        pair = fp8_pairs[request.param]
        base = sv.open(pair["base"])
        model = base + 0.5 * (sv.open(pair["ft"]) - base)
        assert any(t.requantize is not None for t in model.resolved().tensors.values())

        def make() -> SafetensorsSink:
            companions = companions_for(model.anchor(), model.resolved().vocab)
            return SafetensorsSink(parse_size(SHARD_SIZE), companions=companions)

        def rows(t: Any) -> int:
            # Blocks start on scale tiles (the engine aligns them the same way).
            return max(t.requantize.row_align, 7) if t.requantize is not None else 7

        return SinkCase(
            model,
            make,
            _load_fp8(model),
            rows,
            {"format": "safetensors", "shard_size": SHARD_SIZE, "block_size": BLOCK_SIZE},
        )


def test_every_sink_class_has_a_contract_suite() -> None:
    """A sink class added to engine/sinks.py must get a suite here (see tests/sink_contract.py)."""
    import inspect

    import streamvec.engine.sinks as sinks

    found = {
        c
        for c in vars(sinks).values()
        if inspect.isclass(c)
        and c.__module__ == sinks.__name__
        and callable(getattr(c, "prepare", None))
        and not getattr(c, "_is_protocol", False)
    }
    assert found == {ZarrSink, SafetensorsSink}


# -- the SVD store writer ------------------------------------------------------------------
# Not a block sink: ``svd``, ``decompose`` and ``merge-svd`` write whole tensors' factors
# through :class:`~streamvec.io.zarr.lowrank.SVDStoreWriter`. Its contract is the same at
# tensor granularity: any order of tensors gives the same files, zarr reads back what was
# written, ``verify`` passes, and a writer reopened after a stop continues to the same bytes.


def _svd_tensors() -> list[tuple[str, tuple[int, ...], tuple[np.ndarray, ...]]]:
    rng = np.random.default_rng(0)

    def factors(m: int, n: int, k: int) -> tuple[np.ndarray, ...]:
        u = rng.standard_normal((m, k)).astype(np.float32)
        return (
            u,
            np.sort(rng.random(k))[::-1].copy(),
            rng.standard_normal((k, n)).astype(np.float32),
        )

    return [
        ("model.q.weight", (12, 8), factors(12, 8, 3)),
        ("model.conv.weight", (6, 2, 3), factors(6, 6, 2)),
        ("model.norm.weight", (8,), (rng.standard_normal(8).astype(np.float32),)),
        ("model.scale", (), (np.asarray(rng.standard_normal(), np.float32),)),
        # all zero: no chunk file, listed in the array's empty chunks
        ("model.zero.bias", (8,), (np.zeros(8, np.float32),)),
        ("model.zero_scale", (), (np.zeros((), np.float32),)),
    ]


def _write_svd(directory: Path, names: Sequence[str], reopen: bool = False) -> None:
    from streamvec.io.zarr.lowrank import SVDStoreWriter

    directory.mkdir(exist_ok=True)
    writer = SVDStoreWriter(directory, {"operation": "svd", "sources": []}, reopen=reopen)
    tensors = {name: (shape, data) for name, shape, data in _svd_tensors()}
    for name in names:
        shape, data = tensors[name]
        if len(data) == 3:
            writer.write_factors(name, shape, "bfloat16", *data, {"rank": len(data[1])})
        else:
            writer.write_dense(name, data[0], "bfloat16", {"note": "extra"})


class TestSVDStoreWriter:
    NAMES = tuple(name for name, _, _ in _svd_tensors())

    def _finished(self, directory: Path, names: Sequence[str]) -> Path:
        from streamvec.io.zarr.lowrank import SVDStoreWriter

        _write_svd(directory, names)
        SVDStoreWriter(directory, {}, reopen=True).finish()
        return directory

    def test_tensors_in_any_order_give_the_same_files(self, tmp_path: Path) -> None:
        from .sink_contract import assert_same_tree

        a = self._finished(tmp_path / "a", self.NAMES)
        b = self._finished(tmp_path / "b", self.NAMES[::-1])
        assert_same_tree(a, b)

    def test_zarr_reads_back_what_was_written(self, tmp_path: Path) -> None:
        store = self._finished(tmp_path / "svd", self.NAMES)
        for name, shape, data in _svd_tensors():
            path = encode_array_path(name)
            if len(data) == 3:
                for key, want in zip(("U", "S", "Vh"), data, strict=True):
                    got = zarr.open_array(str(store), path=f"{path}/{key}", mode="r")[...]
                    assert got.tobytes() == want.tobytes(), (name, key)
            else:
                got = zarr.open_array(str(store), path=path, mode="r")[...]
                assert got.shape == shape and got.tobytes() == data[0].tobytes(), name

    def test_files_are_those_zarr_writes(self, tmp_path: Path) -> None:
        """The writer makes the files itself; zarr's own API, given the same nodes, makes
        the same bytes (the reference: how the writer worked before)."""
        from streamvec.io.zarr.lowrank import SVDStoreWriter, _chunks, array_checksum
        from streamvec.io.zarr.store import compressors, record_empty_chunks

        from .sink_contract import assert_same_tree

        ours = self._finished(tmp_path / "ours", self.NAMES)
        reference = tmp_path / "zarr"
        reference.mkdir()
        SVDStoreWriter(reference, {"operation": "svd", "sources": []})
        root = zarr.open_group(str(reference), mode="r+")

        def put(
            group: Any, key: str, arr: np.ndarray, attrs: dict[str, Any], extra: dict[str, Any]
        ) -> None:
            chunks = _chunks(arr.shape, arr.dtype.itemsize)
            checksum = array_checksum(arr, chunks[0] if chunks else None)
            a = group.create_array(
                key,
                shape=arr.shape,
                chunks=chunks,
                dtype=arr.dtype,
                compressors=compressors("lz4"),
                fill_value=0,
                attributes={**attrs, **checksum, **extra},
            )
            if arr.size:
                a[...] = arr

        for name, shape, data in _svd_tensors():
            if len(data) == 3:
                group = root.create_group(
                    encode_array_path(name),
                    attributes={
                        "name": name,
                        "shape": list(shape),
                        "dtype": "float32",
                        "source_dtype": "bfloat16",
                        "svd": {"rank": len(data[1])},
                    },
                )
                for key, arr in zip(("U", "S", "Vh"), data, strict=True):
                    put(group, key, arr, {}, {})
            else:
                attrs = {"name": name, "dtype": "float32", "source_dtype": "bfloat16"}
                arr = np.asarray(data[0], order="C")
                put(root, encode_array_path(name), arr, attrs, {"note": "extra"})
        record_empty_chunks(reference)
        with warnings.catch_warnings():  # consolidated metadata is not in the v3 spec yet
            warnings.simplefilter("ignore", UserWarning)
            zarr.consolidate_metadata(str(reference))
        assert_same_tree(ours, reference)

    def test_a_metadata_write_never_makes_a_removed_output_again(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A failed run's cleanup removes the output between a node's folder and its file:
        the write fails, and the output stays removed."""
        from zarr.core.group import GroupMetadata

        from streamvec.io.zarr.store import write_node

        out = tmp_path / "out"
        out.mkdir()
        real_mkdir = Path.mkdir
        removed: list[bool] = []

        def mkdir_then_cleanup(self: Path, *args: Any, **kwargs: Any) -> None:
            real_mkdir(self, *args, **kwargs)
            if not removed:
                removed.append(True)
                shutil.rmtree(out)

        monkeypatch.setattr(Path, "mkdir", mkdir_then_cleanup)
        with pytest.raises(FileNotFoundError):
            write_node(out / "tensor", GroupMetadata(attributes={}).to_dict())
        assert removed and not out.exists()

    def test_verify_passes(self, tmp_path: Path) -> None:
        from streamvec.tools.verify import verify

        store = self._finished(tmp_path / "svd", self.NAMES)
        assert verify(store).checked == 2 * 3 + 4  # U, S, Vh of two tensors; four dense

    def test_reopened_after_a_stop_gives_the_same_bytes(self, tmp_path: Path) -> None:
        from streamvec.io.zarr.lowrank import SVDStoreWriter

        from .sink_contract import assert_same_tree

        whole = self._finished(tmp_path / "whole", self.NAMES)
        stopped = tmp_path / "stopped"
        _write_svd(stopped, self.NAMES[:2])
        # Stopped after writing a tensor but before logging it: the resumed job rewrites it.
        _write_svd(stopped, self.NAMES[2:3], reopen=True)
        _write_svd(stopped, self.NAMES[2:], reopen=True)
        SVDStoreWriter(stopped, {}, reopen=True).finish()
        assert_same_tree(whole, stopped)

    def test_reopened_before_the_store_existed_starts_it(self, tmp_path: Path) -> None:
        """A job stopped between its record and the store's creation: reopen starts anew."""
        from streamvec.io.zarr.lowrank import SVDStoreWriter

        from .sink_contract import assert_same_tree

        whole = self._finished(tmp_path / "whole", self.NAMES)
        _write_svd(tmp_path / "late", self.NAMES, reopen=True)
        SVDStoreWriter(tmp_path / "late", {}, reopen=True).finish()
        assert_same_tree(whole, tmp_path / "late")
