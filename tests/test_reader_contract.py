"""The block-reader contract (tests/reader_contract.py) run against every reader streamvec has.

Each class builds its reader from real files, the way users reach it (``open_source`` on a
checkpoint, a store or an adapter), in a private copy, and an independent float64 reference:
``safetensors.safe_open`` for checkpoint bytes, ``zarr`` for stores, numpy on the stored
factors for ``U S Vh`` and ``B @ A``, torch for FP8 dequantization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from safetensors import safe_open

from streamvec.errors import StoreError
from streamvec.io.blocks import SafetensorsReader, ZarrReader, matrix_shape
from streamvec.io.peft.readers import DifferenceReader, LoraProductReader, SumReader
from streamvec.io.safetensors.fp8 import Fp8Reader
from streamvec.io.zarr.lowrank import LowRankReader
from streamvec.model.nonfloat import NonFloatReader
from streamvec.model.sources import open_source
from streamvec.model.vocab import PaddedReader
from streamvec.names import encode_array_path

from .conftest import BF16, run_cli, write_checkpoint
from .reader_contract import ReaderCase, ReaderTests, copy_tree

torch = pytest.importorskip("torch")

WEIGHTS = "model.safetensors"


def _tensors(seed: int) -> dict[str, np.ndarray]:
    """Every geometry a reader meets: 2-d with a short last block, 1-d, 0-d, 4-d, empty."""
    rng = np.random.default_rng(seed)

    def f(*shape: int, dtype: Any = np.float32) -> np.ndarray:
        return np.asarray(rng.standard_normal(shape) * 0.02, np.float32).astype(dtype)

    return {
        "w.f32": f(37, 6),
        "w.bf16": f(23, 5, dtype=BF16),
        "w.f16": f(11, 4, dtype=np.float16),
        "conv.f32": f(5, 3, 2, 2),
        "norm.f32": f(9),
        "scale.f32": f(),
        "empty.f32": f(0, 4),
        "nocols.f32": f(3, 0),
        # Integer and bool buffers are the same in every checkpoint, as in real fine-tunes.
        "ids.i64": np.arange(12, dtype=np.int64).reshape(2, 6),
        "mask.bool": np.eye(4, dtype=bool),
    }


def reference(path: Path, name: str) -> np.ndarray:
    """A tensor of a safetensors file as float64 ``(rows, cols)``, read by safetensors."""
    with safe_open(str(path), framework="pt") as f:
        t = f.get_tensor(name)
    return t.double().numpy().reshape(matrix_shape(tuple(t.shape)))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints written by safetensors, and stores written by ``streamvec diff``/``svd``."""
    root = tmp_path_factory.mktemp("reader-contract")
    base = write_checkpoint(root / "base", _tensors(0))
    ft = write_checkpoint(root / "ft", _tensors(1))
    stores = {}
    for dtype in ("float32", "bfloat16", "float16"):
        out = root / f"tau-{dtype}.zarr"
        # 64-byte blocks: a few rows per chunk, so reads cross chunks and the last is short.
        rc = run_cli("diff", base, ft, "-o", out, "--dtype", dtype, "--block-size", "64B", "-q")
        assert rc == 0
        stores[dtype] = out
    svd = root / "tau-svd.zarr"
    rc = run_cli("svd", ft, "--base", base, "-o", svd, "--rank", "2", "--block-size", "64B", "-q")
    assert rc == 0
    return {"base": base, "ft": ft, "svd": svd, **{f"tau-{k}": v for k, v in stores.items()}}


def _open(pristine: dict[str, Path], which: str, tmp_path: Path) -> tuple[Path, Any]:
    copy = copy_tree(pristine[which], tmp_path / pristine[which].name)
    return copy, open_source(copy)


# -- safetensors files ---------------------------------------------------------------------


class TestSafetensorsReader(ReaderTests):
    @pytest.fixture(params=sorted(_tensors(0)))
    def case(self, request: pytest.FixtureRequest, pristine, tmp_path: Path) -> ReaderCase:
        name = request.param
        copy, src = _open(pristine, "base", tmp_path)
        reader = src.tensors[name].reader
        assert isinstance(reader, SafetensorsReader)
        file = copy / WEIGHTS
        declared = _tensors(0)[name]
        return ReaderCase(
            reader, reference(file, name), declared.shape, declared.dtype, target=file
        )


# -- Zarr stores ---------------------------------------------------------------------------


def _chunk0(store: Path, array_path: str, ndim: int) -> Path:
    return store / array_path / ("c" if ndim == 0 else "/".join(["c"] + ["0"] * ndim))


def _zarr_reference(store: Path, array_path: str, dtype: np.dtype) -> np.ndarray:
    data = zarr.open_array(str(store), path=array_path, mode="r")[...]
    if dtype == BF16:
        data = data.view(BF16)  # zarr has no bfloat16: streamvec stores its bits as uint16
    return data.astype(np.float64).reshape(matrix_shape(data.shape))


ZARR_CASES = [
    ("float32", "w.f32"),
    ("float32", "conv.f32"),
    ("float32", "norm.f32"),
    ("float32", "scale.f32"),
    ("float32", "empty.f32"),
    ("float32", "nocols.f32"),
    ("bfloat16", "w.bf16"),
    ("float16", "w.f16"),
]


class TestZarrReader(ReaderTests):
    @pytest.fixture(params=ZARR_CASES, ids=["-".join(c) for c in ZARR_CASES])
    def case(self, request: pytest.FixtureRequest, pristine, tmp_path: Path) -> ReaderCase:
        dtype, name = request.param
        store, src = _open(pristine, f"tau-{dtype}", tmp_path)
        reader = src.tensors[name].reader
        assert isinstance(reader, ZarrReader)
        shape = _tensors(0)[name].shape
        path = encode_array_path(name)
        want = np.dtype(BF16 if dtype == "bfloat16" else dtype)
        return ReaderCase(
            reader,
            _zarr_reference(store, path, want),
            shape,
            want,
            target=_chunk0(store, path, len(shape)),
            error=StoreError,
            names=str(store),
        )


class TestLowRankReader(ReaderTests):
    @pytest.fixture(params=["w.f32", "conv.f32", "w.bf16"])
    def case(self, request: pytest.FixtureRequest, pristine, tmp_path: Path) -> ReaderCase:
        name = request.param
        store, src = _open(pristine, "svd", tmp_path)
        reader = src.tensors[name].reader
        assert isinstance(reader, LowRankReader)
        group = encode_array_path(name)
        u, s, vh = (
            zarr.open_array(str(store), path=f"{group}/{f}", mode="r")[...].astype(np.float64)
            for f in ("U", "S", "Vh")
        )
        return ReaderCase(
            reader,
            (u * s) @ vh,
            _tensors(0)[name].shape,
            np.dtype(np.float32),
            target=_chunk0(store, f"{group}/U", 2),
            tolerance=1.0,  # float64 products summed in another order, rounded once
            error=StoreError,
            names=str(store),
        )


# -- FP8 checkpoints -----------------------------------------------------------------------

FP8_LAYOUTS = [("block", "e4m3"), ("channel", "e4m3"), ("tensor", "e5m2")]


@pytest.fixture(scope="module")
def fp8_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    from .test_quantized import make_pair

    root = tmp_path_factory.mktemp("reader-fp8")
    # 130 rows: two 128-row scale tiles, the second short.
    return {lay: make_pair(root, lay, fmt, shape=(130, 40)) for lay, fmt in FP8_LAYOUTS}


class TestFp8Reader(ReaderTests):
    @pytest.fixture(params=[lay for lay, _ in FP8_LAYOUTS])
    def case(self, request: pytest.FixtureRequest, fp8_pairs, tmp_path: Path) -> ReaderCase:
        from .test_quantized import dequantize

        pair = fp8_pairs[request.param]
        name = "layers.0.mlp.up_proj.weight"
        copy = copy_tree(pair["base"], tmp_path / "base")
        reader = open_source(copy).tensors[name].reader
        assert isinstance(reader, Fp8Reader)
        with safe_open(str(copy / WEIGHTS), framework="pt") as f:
            prefix = name.removesuffix("weight")
            scale_name = next(k for k in f.keys() if k != name and k.startswith(prefix))
            want = dequantize(f.get_tensor(name), f.get_tensor(scale_name))
        return ReaderCase(
            reader,
            want,
            (130, 40),
            np.dtype(np.float32),
            target=copy / WEIGHTS,
            tolerance=0.5,  # q * scale rounded once to float32
        )


# -- PEFT adapters -------------------------------------------------------------------------

LORA_R, LORA_ALPHA = 4, 8
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real PEFT adapter (plain linear, embedding, a head saved whole) on a tiny Llama."""
    from .adapter_models import save_pair
    from .test_adapters import _make_adapter

    root = tmp_path_factory.mktemp("reader-adapter")
    base, _ = save_pair("llama", root)
    _make_adapter(
        base,
        root / "lora",
        1,
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        target_modules=["q_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    return {"base": base, "lora": root / "lora"}


def _adapter_sources(adapter: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, Any, Any]:
    base = copy_tree(adapter["base"], tmp_path / "base")
    lora = copy_tree(adapter["lora"], tmp_path / "lora")
    base_src = open_source(base)
    return base, lora, base_src, open_source(lora, base=base)


class TestLoraProductReader(ReaderTests):
    @pytest.fixture(params=[(Q_PROJ, False), ("model.embed_tokens", True)])
    def case(self, request: pytest.FixtureRequest, adapter, tmp_path: Path) -> ReaderCase:
        from .test_adapters import _float64_tau

        module, transpose = request.param
        _, lora, base_src, src = _adapter_sources(adapter, tmp_path)
        reader = src.tensors[f"{module}.weight"].reader
        if isinstance(reader, SumReader):
            # PEFT also saves a targeted embedding whole (save_embedding_layers), read as its
            # difference from the base added to the product; the product is under test here.
            reader = reader.model
        assert isinstance(reader, LoraProductReader)
        want = _float64_tau(lora, module, transpose, LORA_ALPHA / LORA_R)
        return ReaderCase(
            reader,
            want,
            base_src.tensors[f"{module}.weight"].shape,
            np.dtype(np.float32),
            target=lora / "adapter_model.safetensors",
            tolerance=1.0,
        )


class TestDifferenceReader(ReaderTests):
    @pytest.fixture
    def case(self, adapter, tmp_path: Path) -> ReaderCase:
        base, lora, base_src, src = _adapter_sources(adapter, tmp_path)
        reader = src.tensors["lm_head.weight"].reader
        assert isinstance(reader, DifferenceReader)
        weights = lora / "adapter_model.safetensors"
        with safe_open(str(weights), framework="pt") as f:
            saved = next(k for k in f.keys() if "lm_head" in k)
        want = reference(weights, saved) - reference(base / WEIGHTS, "lm_head.weight")
        return ReaderCase(
            reader,
            want,
            base_src.tensors["lm_head.weight"].shape,
            np.dtype(np.float32),
            target=weights,
            tolerance=1.0,  # float32 operands subtracted, rounded once
        )


class TestSumReader(ReaderTests):
    """A checkpoint with an adapter applied (mergekit's MODEL+LORA)."""

    @pytest.fixture
    def case(self, adapter, tmp_path: Path) -> ReaderCase:
        from .test_adapters import _float64_tau

        base, lora, base_src, src = _adapter_sources(adapter, tmp_path)
        name = f"{Q_PROJ}.weight"
        reader = SumReader(base_src.tensors[name].reader, src.tensors[name].reader)
        tau = _float64_tau(lora, Q_PROJ, False, LORA_ALPHA / LORA_R)
        return ReaderCase(
            reader,
            reference(base / WEIGHTS, name) + tau,
            base_src.tensors[name].shape,
            np.dtype(np.float32),
            target=base / WEIGHTS,
            tolerance=2.0,  # the product rounded to float32, then the sum
        )


# -- readers over other readers ------------------------------------------------------------


class TestNonFloatReader(ReaderTests):
    """Integer and bool tensors checked across checkpoints (``--int-tensors``)."""

    @pytest.fixture(params=["error-equal", "finetune-changed", "base-changed"])
    def case(self, request: pytest.FixtureRequest, pristine, tmp_path: Path) -> ReaderCase:
        policy, which = request.param.split("-")
        name = "ids.i64"
        base = copy_tree(pristine["base"], tmp_path / "base")
        changed = _tensors(0)
        if which == "changed":
            changed[name] = changed[name].copy()
            changed[name][1, 2:4] = -7  # a fine-tune that edited a buffer
        ft = write_checkpoint(tmp_path / "ft", changed)
        b, f = open_source(base), open_source(ft)
        reader = NonFloatReader(
            name, b.tensors[name].reader, str(base), ((str(ft), f.tensors[name].reader),), policy
        )
        source = ft if policy == "finetune" else base
        return ReaderCase(
            reader,
            reference(source / WEIGHTS, name),
            (2, 6),
            np.dtype(np.int64),
            target=ft / WEIGHTS if policy != "base" else base / WEIGHTS,
        )


class TestPaddedReader(ReaderTests):
    """A vocabulary cut short or padded (``--vocab``): zeros, or rows of another tensor."""

    @pytest.fixture(params=["zeros", "fill", "cut"])
    def case(self, request: pytest.FixtureRequest, pristine, tmp_path: Path) -> ReaderCase:
        base = copy_tree(pristine["base"], tmp_path / "base")
        src = open_source(base)
        inner = src.tensors["w.f32"].reader  # 37 x 6
        want = reference(base / WEIGHTS, "w.f32")
        if request.param == "zeros":
            reader = PaddedReader(inner, 40, None)
            want = np.concatenate([want, np.zeros((3, 6))])
        elif request.param == "cut":
            reader = PaddedReader(inner, 30, None)
            want = want[:30]
        else:
            pad = np.concatenate([_tensors(3)["w.f32"], _tensors(4)["w.f32"][:5]]).astype(BF16)
            other = write_checkpoint(tmp_path / "fill", {"w": pad})
            fill = open_source(other).tensors["w"].reader  # 42 x 6 bf16
            reader = PaddedReader(inner, 42, fill)
            want = np.concatenate([want, reference(other / WEIGHTS, "w")[37:]])
        dtype = np.dtype(np.float32)
        return ReaderCase(reader, want, (want.shape[0], 6), dtype, target=base / WEIGHTS)


def test_every_reader_class_has_a_contract_suite() -> None:
    """A reader class added to a reading module must get a suite here (see the module doc)."""
    import importlib
    import inspect

    modules = [
        "streamvec.io.blocks",
        "streamvec.io.safetensors.fp8",
        "streamvec.io.zarr.lowrank",
        "streamvec.io.peft.readers",
        "streamvec.model.nonfloat",
        "streamvec.model.vocab",
    ]
    found = set()
    for m in modules:
        mod = importlib.import_module(m)
        for obj in vars(mod).values():
            if (
                inspect.isclass(obj)
                and obj.__module__ == m
                and callable(getattr(obj, "read", None))
                and not getattr(obj, "_is_protocol", False)
            ):
                found.add(obj)
    tested = {
        SafetensorsReader,
        ZarrReader,
        LowRankReader,
        Fp8Reader,
        LoraProductReader,
        DifferenceReader,
        SumReader,
        NonFloatReader,
        PaddedReader,
    }
    assert found == tested
    suites = [c for n, c in globals().items() if n.startswith("Test") and isinstance(c, type)]
    assert len([c for c in suites if issubclass(c, ReaderTests)]) == len(tested)
