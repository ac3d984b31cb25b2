"""Tests for the synthetic checkpoint builder (tiny shapes, so the whole file runs in seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import safetensors

from streamvec.errors import OutputError, StreamvecError
from streamvec.tools.synth import (
    INDEX_NAME,
    INT_BUFFER_NAME,
    LlamaShape,
    build_checkpoint,
    build_finetune,
    llama_shape_for,
    parse_param_count,
    parse_size,
)

TINY = LlamaShape(hidden=64, intermediate=176, layers=2, heads=2, kv_heads=1, vocab=256)


def load_dir(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a sharded checkpoint, read through its index."""
    index = json.loads((path / INDEX_NAME).read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safetensors.safe_open(path / file, framework="numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def file_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def base_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "ckpt"
    return build_checkpoint(out, shape=TINY, dtype="float32", shard_size="40KB", seed=3)


# --- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("512MiB", 512 * 2**20),
        ("100MB", 100 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("1.1GB", 1_100_000_000),
        (" 2 kib ", 2048),
        ("7", 7),
        ("64B", 64),
        ("3G", 3 * 10**9),
        (12345, 12345),
        (0, 0),
    ],
)
def test_parse_size_good(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "abc", "5XB", "-1", -1, "1.5B", "1e9", True, 1.5, None])
def test_parse_size_bad(text: object) -> None:
    with pytest.raises(StreamvecError) as info:
        parse_size(text)  # type: ignore[arg-type]
    assert repr(text) in str(info.value)


def test_parse_size_error_names_forms() -> None:
    with pytest.raises(StreamvecError, match="MiB"):
        parse_size("lots")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.1B", 100_000_000),
        ("1B", 10**9),
        ("300M", 300_000_000),
        ("2.5k", 2500),
        ("7b", 7 * 10**9),
        ("1000", 1000),
        (42, 42),
    ],
)
def test_parse_param_count_good(text: str | int, expected: int) -> None:
    assert parse_param_count(text) == expected


@pytest.mark.parametrize("text", ["", "B", "1.5x", "-3M", 0, "0", "0.0000000001B", False, 2.0])
def test_parse_param_count_bad(text: object) -> None:
    with pytest.raises(StreamvecError):
        parse_param_count(text)  # type: ignore[arg-type]


# --- shapes ------------------------------------------------------------------------------


def test_tensor_shapes_order_and_sizes() -> None:
    shapes = TINY.tensor_shapes()
    names = list(shapes)
    layer0 = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    ]
    assert names[0] == "model.embed_tokens.weight"
    assert names[1:10] == layer0
    assert names[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert len(names) == 1 + 9 * TINY.layers + 2
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (32, 64)  # 1 kv head of 32
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (64, 176)
    assert shapes["lm_head.weight"] == (256, 64)
    assert TINY.param_count() == sum(math.prod(s) for s in shapes.values())


def test_tied_embeddings_drop_lm_head() -> None:
    tied = LlamaShape(64, 176, 2, 2, 1, 256, tie_embeddings=True)
    assert "lm_head.weight" not in tied.tensor_shapes()
    assert tied.param_count() == TINY.param_count() - 256 * 64
    assert tied.config("float32")["tie_word_embeddings"] is True


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hidden": 60, "heads": 8},  # hidden not divisible by heads
        {"heads": 4, "kv_heads": 3},  # heads not divisible by kv_heads
        {"layers": 0},
        {"vocab": -1},
    ],
)
def test_invalid_shape(kwargs: dict[str, int]) -> None:
    args: dict[str, Any] = {
        "hidden": 64,
        "intermediate": 176,
        "layers": 2,
        "heads": 2,
        "kv_heads": 1,
    }
    args |= {"vocab": 256, **kwargs}
    with pytest.raises(StreamvecError):
        LlamaShape(**args)


def test_config_fields() -> None:
    cfg = json.loads(json.dumps(TINY.config("bfloat16")))  # must survive JSON
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["hidden_size"] == 64
    assert cfg["intermediate_size"] == 176
    assert cfg["num_hidden_layers"] == 2
    assert cfg["num_attention_heads"] == 2
    assert cfg["num_key_value_heads"] == 1
    assert cfg["head_dim"] == 32
    assert cfg["vocab_size"] == 256
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is False
    assert cfg["rms_norm_eps"] > 0
    assert cfg["max_position_embeddings"] > 0
    with pytest.raises(StreamvecError):
        TINY.config("int7")


@pytest.mark.parametrize("params", ["1M", "5M", "30M", "0.1B", "0.3B", "1B", "3B", "7B", "70B"])
def test_llama_shape_for(params: str) -> None:
    n = parse_param_count(params)
    shape = llama_shape_for(n)
    assert abs(shape.param_count() - n) / n <= 0.15
    assert shape.param_count() == sum(math.prod(s) for s in shape.tensor_shapes().values())
    assert shape.hidden % 64 == 0
    assert shape.heads == shape.hidden // 64
    assert shape.heads % shape.kv_heads == 0
    assert shape.intermediate % 64 == 0
    assert 2.5 <= shape.intermediate / shape.hidden <= 3.1
    assert shape.vocab == (32000 if n >= 500_000_000 else shape.vocab)
    assert shape.vocab <= 8192 or n >= 500_000_000


def test_llama_shape_for_too_small() -> None:
    with pytest.raises(StreamvecError, match="1M"):
        llama_shape_for(1000)


# --- build_checkpoint --------------------------------------------------------------------


def test_layout_and_index(base_f32: Path) -> None:
    index = json.loads((base_f32 / INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    shards = sorted(p.name for p in base_f32.glob("*.safetensors"))
    n = len(shards)
    assert n > 1
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(weight_map.values()) == set(shards)
    assert set(weight_map) == set(TINY.tensor_shapes()) | {INT_BUFFER_NAME}
    total = 0
    for shard in shards:
        with safetensors.safe_open(base_f32 / shard, framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert weight_map[name] == shard
                total += f.get_tensor(name).nbytes
    assert index["metadata"]["total_size"] == total
    assert json.loads((base_f32 / "config.json").read_text())["torch_dtype"] == "float32"
    gen = json.loads((base_f32 / "generation_config.json").read_text())
    assert gen == {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}
    assert isinstance(json.loads((base_f32 / "tokenizer_config.json").read_text()), dict)


def test_single_shard_still_uses_index(tmp_path: Path) -> None:
    out = build_checkpoint(tmp_path / "one", shape=TINY, shard_size="1GB")
    assert [p.name for p in out.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]
    assert (out / INDEX_NAME).is_file()


@pytest.mark.parametrize("limit", [20_000, 70_000, 100_000])
def test_shard_size_respected(tmp_path: Path, limit: int) -> None:
    out = build_checkpoint(tmp_path / "c", shape=TINY, dtype="float32", shard_size=limit)
    largest = max(math.prod(s) * 4 for s in TINY.tensor_shapes().values())  # 64 KiB embedding
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        with safetensors.safe_open(shard, framework="numpy") as f:
            sizes = [f.get_tensor(name).nbytes for name in f.keys()]
        assert sum(sizes) <= limit or (len(sizes) == 1 and sizes[0] > limit)
    assert largest > 20_000  # so the smallest limit exercises the oversized-tensor rule


@pytest.mark.parametrize(
    ("dtype", "np_dtype"),
    [("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16), ("float32", np.float32)],
)
def test_dtypes_and_values(tmp_path: Path, dtype: str, np_dtype: type) -> None:
    out = build_checkpoint(tmp_path / dtype, shape=TINY, dtype=dtype)
    tensors = load_dir(out)
    buffer = tensors.pop(INT_BUFFER_NAME)
    assert buffer.dtype == np.int64
    assert np.array_equal(buffer, np.arange(64).reshape(1, 64))
    for name, arr in tensors.items():
        assert arr.dtype == np.dtype(np_dtype), name
        assert arr.shape == TINY.tensor_shapes()[name]
    emb = tensors["model.embed_tokens.weight"].astype(np.float64)
    assert abs(emb.mean()) < 0.002
    assert 0.018 < emb.std() < 0.022
    norm = tensors["model.layers.0.input_layernorm.weight"].astype(np.float64)
    assert 0.97 < norm.mean() < 1.03
    assert 0 < norm.std() < 0.05
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


def test_no_int_buffer(tmp_path: Path) -> None:
    out = build_checkpoint(tmp_path / "c", shape=TINY, int_buffer=False)
    assert INT_BUFFER_NAME not in load_dir(out)


def test_build_from_param_count(tmp_path: Path) -> None:
    out = build_checkpoint(tmp_path / "c", params="1M", dtype="float16")
    cfg = json.loads((out / "config.json").read_text())
    shape = llama_shape_for(1_000_000)
    assert cfg["hidden_size"] == shape.hidden
    assert cfg["num_hidden_layers"] == shape.layers
    assert sum(a.size for a in load_dir(out).values()) == shape.param_count() + 64


def test_determinism(tmp_path: Path) -> None:
    a = build_checkpoint(tmp_path / "a", shape=TINY, seed=7, shard_size="50KB")
    b = build_checkpoint(tmp_path / "b", shape=TINY, seed=7, shard_size="50KB")
    c = build_checkpoint(tmp_path / "c", shape=TINY, seed=8, shard_size="50KB")
    assert file_bytes(a) == file_bytes(b)
    different = [k for k, v in file_bytes(c).items() if k.endswith(".safetensors")]
    assert all(file_bytes(a)[k] != file_bytes(c)[k] for k in different)


def test_values_independent_of_sharding(tmp_path: Path) -> None:
    one = load_dir(build_checkpoint(tmp_path / "one", shape=TINY, seed=5))
    many = load_dir(build_checkpoint(tmp_path / "many", shape=TINY, seed=5, shard_size=20_000))
    assert one.keys() == many.keys()
    for name in one:
        assert one[name].tobytes() == many[name].tobytes(), name


def test_build_errors(tmp_path: Path) -> None:
    with pytest.raises(StreamvecError, match="exactly one"):
        build_checkpoint(tmp_path / "x")
    with pytest.raises(StreamvecError, match="exactly one"):
        build_checkpoint(tmp_path / "x", params="1M", shape=TINY)
    with pytest.raises(StreamvecError, match="dtype"):
        build_checkpoint(tmp_path / "x", shape=TINY, dtype="int8")
    with pytest.raises(StreamvecError, match="shard_size"):
        build_checkpoint(tmp_path / "x", shape=TINY, shard_size=0)
    done = build_checkpoint(tmp_path / "done", shape=TINY)
    with pytest.raises(OutputError):
        build_checkpoint(done, shape=TINY)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError):
        build_checkpoint(tmp_path / "file", shape=TINY)


# --- build_finetune ----------------------------------------------------------------------


def _energy_ok(delta: np.ndarray, rank: int) -> None:
    s = np.linalg.svd(delta, compute_uv=False)
    energy = s**2
    assert energy[:rank].sum() / energy.sum() > 0.95
    assert s[rank] < 0.25 * s[rank - 1]  # a clear gap after the low-rank part


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_finetune_delta_is_low_rank_plus_noise(tmp_path: Path, base_f32: Path, dtype: str) -> None:
    base_dir = base_f32
    if dtype != "float32":
        base_dir = build_checkpoint(tmp_path / "base", shape=TINY, dtype=dtype, shard_size="40KB")
    rank = 4
    ft_dir = build_finetune(base_dir, tmp_path / "ft", rank=rank, seed=11)
    base, ft = load_dir(base_dir), load_dir(ft_dir)
    assert base.keys() == ft.keys()
    for name, b in base.items():
        f = ft[name]
        assert f.dtype == b.dtype and f.shape == b.shape
        if name == INT_BUFFER_NAME:
            assert f.tobytes() == b.tobytes()
            continue
        delta = f.astype(np.float64) - b.astype(np.float64)
        if delta.ndim == 2:
            _energy_ok(delta, rank)
            # entries of delta_scale * U @ V / sqrt(rank) have std delta_scale = 0.01
            assert 0.008 < delta.std() < 0.012, name
        elif dtype == "float32":
            assert 0.0005 < delta.std() < 0.002, name  # noise_scale = 0.001
        else:
            # Near 1.0 a bf16 step is 2**-7, so noise of 0.001 mostly rounds away; what
            # survives moves by single steps.
            assert np.abs(delta).max() <= 2**-7, name


def test_finetune_layout_copied(tmp_path: Path, base_f32: Path) -> None:
    ft = build_finetune(base_f32, tmp_path / "ft")
    for side in ("config.json", "generation_config.json", "tokenizer_config.json", INDEX_NAME):
        assert (ft / side).read_bytes() == (base_f32 / side).read_bytes()
    assert sorted(p.name for p in ft.glob("*.safetensors")) == sorted(
        p.name for p in base_f32.glob("*.safetensors")
    )
    for shard in ft.glob("*.safetensors"):
        with safetensors.safe_open(shard, framework="numpy") as f:
            with safetensors.safe_open(base_f32 / shard.name, framework="numpy") as g:
                assert sorted(f.keys()) == sorted(g.keys())
                assert f.metadata() == {"format": "pt"}


def test_finetune_only(tmp_path: Path, base_f32: Path) -> None:
    ft_dir = build_finetune(base_f32, tmp_path / "ft", only="*.self_attn.*")
    base, ft = load_dir(base_f32), load_dir(ft_dir)
    changed = {n for n in base if base[n].tobytes() != ft[n].tobytes()}
    attention = {n for n in base if ".self_attn." in n}
    assert changed == attention
    assert len(attention) == 4 * TINY.layers


def test_finetune_determinism(tmp_path: Path, base_f32: Path) -> None:
    a = build_finetune(base_f32, tmp_path / "a", seed=2)
    b = build_finetune(base_f32, tmp_path / "b", seed=2)
    c = build_finetune(base_f32, tmp_path / "c", seed=3)
    assert file_bytes(a) == file_bytes(b)
    assert file_bytes(a) != file_bytes(c)
    # A tensor's delta does not depend on which other tensors are fine-tuned.
    d = load_dir(build_finetune(base_f32, tmp_path / "d", seed=2, only="*.q_proj.*"))
    name = "model.layers.1.self_attn.q_proj.weight"
    assert d[name].tobytes() == load_dir(a)[name].tobytes()


def test_finetune_errors(tmp_path: Path, base_f32: Path) -> None:
    with pytest.raises(StreamvecError, match="rank"):
        build_finetune(base_f32, tmp_path / "x", rank=0)
    with pytest.raises(StreamvecError, match="noise_scale"):
        build_finetune(base_f32, tmp_path / "x", noise_scale=-1.0)
    with pytest.raises(StreamvecError):
        build_finetune(base_f32, base_f32)
    with pytest.raises(FileNotFoundError):
        build_finetune(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(StreamvecError):
        build_finetune(tmp_path, tmp_path / "x")  # a directory without a checkpoint
