"""Quantized inputs: FP8 read dequantized and written re-quantized, other formats refused,
int/bool changes never dropped, and no NaN/inf written silently.

FP8 checkpoints are built with torch's float8 dtypes in the layouts real releases use (block
scales ``weight_scale_inv`` as in DeepSeek-V3/Qwen3-FP8, per-channel ``weight_scale`` as in
FBGEMM FP8, one per-tensor scale), with different scales in base and fine-tune and stored
values at the format's limits. References are float64 dequantizations written here with
torch, independent of streamvec's reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from tests.conftest import (
    BF16,
    assert_matches_float64,
    run_cli,
    run_cli_subprocess,
    write_checkpoint,
)

FP8_E4M3_NP = np.dtype(ml_dtypes.float8_e4m3fn)
FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}
BLOCK = 128
LAYER = "model.layers.0."
LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


# -- building FP8 checkpoints (torch, independent of streamvec) ---------------------------------


def quantize(w: torch.Tensor, layout: str, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``w ~= q.double() * scale`` in ``layout``; the max of each tile
    (row, tensor) lands on the format's largest value."""
    dtype, fmax = FP8[fmt]
    w = w.double()
    m, n = w.shape
    if layout == "tensor":
        scale = (w.abs().max() / fmax).reshape(())
        full = scale
    elif layout == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / fmax  # (m, 1)
        full = scale
    else:
        tr, tc = -(-m // BLOCK), -(-n // BLOCK)
        padded = torch.zeros(tr * BLOCK, tc * BLOCK, dtype=torch.float64)
        padded[:m, :n] = w.abs()
        scale = padded.reshape(tr, BLOCK, tc, BLOCK).amax(dim=(1, 3)) / fmax
        full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:m, :n]
    scale = scale.float()
    q = (w / full.float().double()).clamp(-fmax, fmax).to(dtype)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """float64 ``q * scale``, the scale broadcast over its tiles, rows or tensor."""
    w = q.double()
    s = scale.double()
    if s.numel() == 1:
        return (w * s.reshape(())).numpy()
    m, n = w.shape
    if s.shape == (m, 1):
        return (w * s).numpy()
    return (w * s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:m, :n]).numpy()


SCALE_NAME = {"block": "weight_scale_inv", "channel": "weight_scale", "tensor": "weight_scale_inv"}


def fp8_state(
    dense: dict[str, torch.Tensor], layout: str, fmt: str
) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """A state dict with every 2-D ``*_proj.weight`` quantized, and the float64 weights it
    really holds (dequantized)."""
    state: dict[str, torch.Tensor] = {}
    real: dict[str, np.ndarray] = {}
    for name, w in dense.items():
        if name.endswith("_proj.weight"):
            q, s = quantize(w, layout, fmt)
            state[name] = q
            state[name.removesuffix("weight") + SCALE_NAME[layout]] = s
            real[name] = dequantize(q, s)
        else:
            state[name] = w
            real[name] = w.double().numpy()
    return state, real


def fp8_config(layout: str) -> dict:
    if layout == "channel":
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
    return {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [BLOCK, BLOCK] if layout == "block" else None,
    }


def save(path: Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def stored(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


@pytest.fixture(scope="session")
def llama_fp8(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama in the DeepSeek-V3/Qwen3-FP8 layout (e4m3, 128x128 block scales), and a
    fine-tune whose weights, and so whose scales, differ: some tiles 4x larger."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=384,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=300,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    base_dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft_dense = {}
    for k, v in base_dense.items():
        w = v.float() + 0.01 * torch.randn(v.shape)
        if k.endswith("_proj.weight"):
            w[:BLOCK, :BLOCK] *= 4.0  # a tile whose fine-tuned scale is 4x the base's
        ft_dense[k] = w.to(torch.bfloat16)
    root = tmp_path_factory.mktemp("llama-fp8")
    config = cfg.to_dict() | {"quantization_config": fp8_config("block")}
    base_state, base_real = fp8_state(base_dense, "block", "e4m3")
    ft_state, ft_real = fp8_state(ft_dense, "block", "e4m3")
    return {
        "base": save(root / "base", base_state, config),
        "ft": save(root / "ft", ft_state, config),
        "base_real": base_real,
        "ft_real": ft_real,
        "base_state": base_state,
        "ft_state": ft_state,
    }


def make_pair(root: Path, layout: str, fmt: str, shape: tuple[int, int] = (300, 200)) -> dict:
    """A small base/fine-tune pair in one layout, values up to the format's limits."""
    gen = torch.Generator().manual_seed(1)
    big = 1000.0 if fmt == "e5m2" else 3.0  # real magnitudes well past 448 for e5m2 scales
    w = torch.randn(shape, generator=gen) * big
    w2 = w + torch.randn(shape, generator=gen) * big * 0.05
    w2[:7] *= 3.0  # rows (and tiles) whose scales differ 3x between base and fine-tune
    dense_b = {"layers.0.mlp.up_proj.weight": w, "norm.weight": torch.ones(shape[1])}
    dense_f = {"layers.0.mlp.up_proj.weight": w2, "norm.weight": torch.full((shape[1],), 1.5)}
    sb, rb = fp8_state(dense_b, layout, fmt)
    sf, rf = fp8_state(dense_f, layout, fmt)
    cfg = {"model_type": "llama", "quantization_config": fp8_config(layout)}
    return {
        "base": save(root / f"base-{layout}-{fmt}", sb, cfg),
        "ft": save(root / f"ft-{layout}-{fmt}", sf, cfg),
        "base_real": rb,
        "ft_real": rf,
        "base_state": sb,
        "ft_state": sf,
    }


LAYOUTS = [("block", "e4m3"), ("block", "e5m2"), ("channel", "e4m3"), ("tensor", "e5m2")]


@pytest.fixture(scope="session")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    root = tmp_path_factory.mktemp("fp8-pairs")
    return {(lay, fmt): make_pair(root, lay, fmt) for lay, fmt in LAYOUTS}


def within_one_fp8_rounding(
    got: np.ndarray, want: np.ndarray, scale_of_elem: np.ndarray, fmt: str
) -> None:
    """``got`` is ``want`` rounded once to the FP8 grid of its tile: the error is at most half
    a spacing of the format at that magnitude (3 mantissa bits for e4m3, 2 for e5m2), or half
    the smallest subnormal times the scale, plus float32 rounding of the arithmetic."""
    mant = 3 if fmt == "e4m3" else 2
    sub = 2.0**-9 if fmt == "e4m3" else 2.0**-16
    tol = np.abs(want) * 2.0 ** -(mant + 1) + scale_of_elem * sub + 1e-6 * np.abs(want) + 1e-30
    err = np.abs(got - want)
    assert (err <= tol).all(), f"max excess {(err - tol).max()}"


def expand(scale: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    s = np.asarray(scale, np.float64)
    if s.size == 1:
        return np.full(shape, float(s.reshape(-1)[0]))
    if s.shape == (shape[0], 1):
        return np.broadcast_to(s, shape)
    return np.repeat(np.repeat(s, BLOCK, 0), BLOCK, 1)[: shape[0], : shape[1]]


# -- FP8: the reported bug ---------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "fmt"), LAYOUTS)
def test_fp8_combined_on_real_values_dequantized(pairs, tmp_path: Path, layout, fmt) -> None:
    """Regression (issue 15): FP8 weights were combined on the stored 8-bit numbers and the
    scales linearly, giving NaN (e4m3) or inf (e5m2) with exit 0. The result must be the
    float64 formula on the dequantized weights."""
    p = pairs[(layout, fmt)]
    out = tmp_path / "edited"
    code = run_cli(
        "combine", "--base", p["base"], "-o", out, f"{p['ft']}:2", "--dtype", "bfloat16", "-q"
    )
    assert code == 0
    got = stored(out)
    name = "layers.0.mlp.up_proj.weight"
    wb, wf = p["base_real"][name], p["ft_real"][name]
    exact = wb + 2.0 * (wf - wb)
    g = got[name].float().numpy().astype(BF16)
    assert_matches_float64(g, exact, np.abs(wb) + 2 * np.abs(wf) + 2 * np.abs(wb), 3, name)
    # Scale tensors are never combined as weights, nor written in a dequantized output.
    assert not any(k.endswith(("_scale", "_scale_inv")) for k in got)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config


@pytest.mark.parametrize(("layout", "fmt"), LAYOUTS)
def test_fp8_task_vector_against_float64(pairs, tmp_path: Path, layout, fmt) -> None:
    import zarr

    p = pairs[(layout, fmt)]
    assert run_cli("diff", p["base"], p["ft"], "-o", tmp_path / "t.zarr", "-q") == 0
    store = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    name = "layers.0.mlp.up_proj.weight"
    got = np.asarray(store[name][...], np.float64)
    wb, wf = p["base_real"][name], p["ft_real"][name]
    # Each input is dequantized in float32 (one rounding of q * s), then subtracted once.
    tol = 2.0**-23 * (np.abs(wb) + np.abs(wf)) + 2.0**-24 * np.abs(wf - wb)
    assert (np.abs(got - (wf - wb)) <= tol).all()
    assert sorted(store.array_keys()) == sorted(
        ["layers.0.mlp.up_proj.weight", "norm.weight"]
    )  # no scale tensor became a "task vector"


@pytest.mark.parametrize(("layout", "fmt"), LAYOUTS)
def test_fp8_output_requantized_in_the_base_layout(pairs, tmp_path: Path, layout, fmt) -> None:
    p = pairs[(layout, fmt)]
    out = tmp_path / "edited"
    assert run_cli("combine", "--base", p["base"], "-o", out, f"{p['ft']}:0.5", "-q") == 0
    got = stored(out)
    name = "layers.0.mlp.up_proj.weight"
    scale_name = name.removesuffix("weight") + SCALE_NAME[layout]
    assert got[name].dtype == FP8[fmt][0]
    assert got[scale_name].dtype == torch.float32
    assert tuple(got[scale_name].shape) == tuple(p["base_state"][scale_name].shape)
    wb, wf = p["base_real"][name], p["ft_real"][name]
    want = wb + 0.5 * (wf - wb)
    # Fresh scales: amax of the result per tile (row, tensor) / fp8 max.
    fmax = FP8[fmt][1]
    s = got[scale_name].double().numpy()
    if layout == "tensor":
        np.testing.assert_allclose(s.reshape(()), np.abs(want).max() / fmax, rtol=1e-6)
    elif layout == "channel":
        np.testing.assert_allclose(s[:, 0], np.abs(want).max(axis=1) / fmax, rtol=1e-6)
    else:
        m, n = want.shape
        tiles = np.zeros((-(-m // BLOCK) * BLOCK, -(-n // BLOCK) * BLOCK))
        tiles[:m, :n] = np.abs(want)
        amax = tiles.reshape(tiles.shape[0] // BLOCK, BLOCK, -1, BLOCK).max(axis=(1, 3))
        np.testing.assert_allclose(s, amax / fmax, rtol=1e-6)
    deq = dequantize(got[name], got[scale_name])
    within_one_fp8_rounding(deq, want, expand(s, want.shape), fmt)
    # The unedited-dtype tensor keeps its dtype; the config still announces FP8.
    assert got["norm.weight"].dtype == torch.float32
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == fp8_config(layout)
    assert run_cli("verify", out, "-q") == 0


def test_fp8_unchanged_weights_are_copied_bit_for_bit(llama_fp8, tmp_path: Path) -> None:
    out = tmp_path / "edited"
    code = run_cli(
        "combine",
        "--base",
        llama_fp8["base"],
        "-o",
        out,
        f"{llama_fp8['ft']}:0.5",
        "--include",
        "*.q_proj.*",
        "-q",
    )
    assert code == 0
    got = stored(out)
    base = llama_fp8["base_state"]
    assert set(got) == set(base)
    for k, v in base.items():
        if "q_proj" in k:
            continue
        assert got[k].dtype == v.dtype and torch.equal(
            got[k].view(torch.uint8), v.view(torch.uint8)
        ), k
    assert not torch.equal(
        got[LAYER + "self_attn.q_proj.weight"].float(),
        base[LAYER + "self_attn.q_proj.weight"].float(),
    )
    assert run_cli("verify", out, "-q") == 0


def test_fp8_output_loads_in_transformers(llama_fp8, tmp_path: Path) -> None:
    """The re-quantized output loads through transformers' FP8 path (on CPU it dequantizes
    the 128x128 block scales), and holds the edit within one FP8 rounding."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "edited"
    code = run_cli(
        "combine", "--base", llama_fp8["base"], "-o", out, f"{llama_fp8['ft']}:0.5", "-q"
    )
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    params = dict(model.named_parameters())
    for proj in LINEARS:
        name = LAYER + proj + ".weight"
        loaded = params[name].detach().double().numpy()
        wb, wf = llama_fp8["base_real"][name], llama_fp8["ft_real"][name]
        want = wb + 0.5 * (wf - wb)
        scale = stored(out)[name.removesuffix("weight") + "weight_scale_inv"].double().numpy()
        within_one_fp8_rounding(loaded, want, expand(scale, want.shape), "e4m3")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_fp8_dequantized_output_loads_in_transformers(llama_fp8, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "edited"
    code = run_cli(
        "combine",
        "--base",
        llama_fp8["base"],
        "-o",
        out,
        f"{llama_fp8['ft']}:0.5",
        "--dtype",
        "bfloat16",
        "-q",
    )
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    name = LAYER + "mlp.down_proj.weight"
    loaded = dict(model.named_parameters())[name].detach()
    assert loaded.dtype == torch.bfloat16
    wb, wf = llama_fp8["base_real"][name], llama_fp8["ft_real"][name]
    exact = wb + 0.5 * (wf - wb)
    got = loaded.float().numpy().astype(BF16)
    assert_matches_float64(got, exact, np.abs(wb) + np.abs(wf), 3, name)


# -- formats streamvec cannot dequantize -------------------------------------------------------


def gptq_checkpoint(path: Path, qweight_seed: int) -> Path:
    rng = np.random.default_rng(qweight_seed)
    tensors = {
        "model.layers.0.mlp.up_proj.qweight": rng.integers(0, 2**31, (8, 64), dtype=np.int32),
        "model.layers.0.mlp.up_proj.qzeros": rng.integers(0, 2**31, (1, 8), dtype=np.int32),
        "model.layers.0.mlp.up_proj.scales": rng.random((1, 64), dtype=np.float32).astype(
            np.float16
        ),
        "model.norm.weight": np.ones(64, np.float16),
    }
    write_checkpoint(path, tensors)
    (path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64}})
    )
    return path


@pytest.mark.parametrize("command", ["combine", "diff"])
def test_gptq_is_refused_naming_tensor_and_format(tmp_path: Path, command: str) -> None:
    b = gptq_checkpoint(tmp_path / "b", 0)
    f = gptq_checkpoint(tmp_path / "f", 1)
    out = tmp_path / "out"
    args = (
        ["combine", "--base", b, "-o", out, f]
        if command == "combine"
        else ["diff", b, f, "-o", out]
    )
    proc = run_cli_subprocess(*args)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "model.layers.0.mlp.up_proj.qweight" in err and "GPTQ" in err
    assert not out.exists()


def test_bitsandbytes_int8_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def ckpt(p: Path) -> Path:
        return write_checkpoint(
            p,
            {
                "lm.weight": rng.integers(-127, 128, (16, 8), dtype=np.int8),
                "lm.SCB": rng.random(16, dtype=np.float32),
                "lm.weight_format": np.array([0], np.uint8),
            },
        )

    proc = run_cli_subprocess(
        "combine", "--base", ckpt(tmp_path / "b"), "-o", tmp_path / "o", ckpt(tmp_path / "f")
    )
    assert proc.returncode == 2
    assert "lm.SCB" in proc.stderr and "bitsandbytes" in proc.stderr


def test_unknown_quant_method_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for side in ("b", "f"):
        p = write_checkpoint(
            tmp_path / side,
            {
                "w.weight_packed": rng.integers(0, 255, (8, 4), dtype=np.uint8),
                "norm.weight": np.ones(4, np.float32),
            },
        )
        (p / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    proc = run_cli_subprocess("diff", tmp_path / "b", tmp_path / "f", "-o", tmp_path / "t.zarr")
    assert proc.returncode == 2
    assert "w.weight_packed" in proc.stderr


# -- int and bool tensors ------------------------------------------------------------------


@pytest.fixture
def int8_pair(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    rng = np.random.default_rng(0)
    base = {
        "layer.weight": rng.integers(-127, 128, (40, 16), dtype=np.int8),
        "layer.bias": rng.standard_normal(40).astype(np.float32),
        "mask": np.ones((4, 4), bool),
    }
    ft = {k: v.copy() for k, v in base.items()}
    ft["layer.weight"][23, 5] += 1  # the fine-tune changed one int8 weight
    ft["layer.bias"] += 0.5
    return write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "f", ft), base, ft


def test_changed_int8_weight_is_an_error(int8_pair, tmp_path: Path) -> None:
    """Regression (issue 15): an int8 weight the fine-tune changed was passed through from
    the base: the edit of that layer was dropped, exit code 0."""
    b, f, _, _ = int8_pair
    out = tmp_path / "edited"
    proc = run_cli_subprocess("combine", "--base", b, "-o", out, f"{f}:1")
    assert proc.returncode == 2, proc.stderr
    assert "layer.weight" in proc.stderr and "row 23" in proc.stderr
    assert "--int-tensors" in proc.stderr
    assert not out.exists()
    proc = run_cli_subprocess("diff", b, f, "-o", tmp_path / "t.zarr")
    assert proc.returncode == 2 and "layer.weight" in proc.stderr
    assert not (tmp_path / "t.zarr").exists()


@pytest.mark.parametrize("policy", ["base", "finetune"])
def test_int_tensors_policy(int8_pair, tmp_path: Path, policy: str) -> None:
    b, f, base, ft = int8_pair
    out = tmp_path / "edited"
    assert run_cli("combine", "--base", b, "-o", out, f, "--int-tensors", policy, "-q") == 0
    got = stored(out)
    want = (ft if policy == "finetune" else base)["layer.weight"]
    np.testing.assert_array_equal(got["layer.weight"].numpy(), want)
    np.testing.assert_array_equal(got["mask"].numpy(), base["mask"])
    assert run_cli("diff", b, f, "-o", tmp_path / "t.zarr", "--int-tensors", policy, "-q") == 0


def test_finetune_policy_refuses_two_different_changes(int8_pair, tmp_path: Path) -> None:
    b, f, _, ft = int8_pair
    other = {k: v.copy() for k, v in ft.items()}
    other["layer.weight"][23, 5] += 1  # the same element, a different value
    g = write_checkpoint(tmp_path / "g", other)
    proc = run_cli_subprocess(
        "combine",
        "--base",
        b,
        "-o",
        tmp_path / "o",
        f"{f}:0.5",
        f"{g}:0.5",
        "--int-tensors",
        "finetune",
    )
    assert proc.returncode == 2 and "two fine-tunes" in proc.stderr


def test_equal_int_tensors_pass_through(pair_factory, tmp_path: Path) -> None:
    b, f, base, _ = pair_factory(np.float32)
    out = tmp_path / "edited"
    assert run_cli("combine", "--base", b, "-o", out, f"{f}:0.5", "-q") == 0
    np.testing.assert_array_equal(
        stored(out)["model.position_ids"].numpy(), base["model.position_ids"]
    )


# -- no silent NaN/inf -----------------------------------------------------------------------


def test_overflow_from_finite_inputs_is_an_error(tmp_path: Path) -> None:
    base = {"w": np.full((6, 4), 1e38, np.float32).astype(BF16), "v": np.ones(3, np.float32)}
    ft = {"w": np.full((6, 4), 3e38, np.float32).astype(BF16), "v": np.ones(3, np.float32)}
    ft["w"][:2] = base["w"][:2]  # rows 0-1 unchanged: the first overflow is at row 2
    b, f = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "f", ft)
    out = tmp_path / "edited"
    proc = run_cli_subprocess("combine", "--base", b, "-o", out, f"{f}:2")
    assert proc.returncode == 2
    err = proc.stderr
    assert "w: 16 values, first at row 2" in err and "every input was finite" in err
    assert "--no-check-finite" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Asked for explicitly, the values are written (and the old opt-in flag still parses).
    assert run_cli("combine", "--base", b, "-o", out, f"{f}:2", "--no-check-finite", "-q") == 0
    assert np.isinf(stored(out)["w"].float().numpy()[2:]).all()
    proc = run_cli_subprocess(
        "combine", "--base", b, "-o", tmp_path / "o2", f"{f}:2", "--check-finite"
    )
    assert proc.returncode == 2


def test_nonfinite_inputs_are_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((8, 4)).astype(np.float16)}
    ft = {"w": base["w"].copy()}
    ft["w"][5, 1] = np.nan
    b, f = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "f", ft)
    proc = run_cli_subprocess("combine", "--base", b, "-o", tmp_path / "o", f"{f}:0.5")
    assert proc.returncode == 2
    assert "w: 1 values, first at row 5" in proc.stderr
    assert str(f / "model.safetensors") in proc.stderr and "already holds" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, BF16])
def test_finite_check_finds_every_kind(dtype) -> None:
    from streamvec.compute.finite import nonfinite_rows

    x = np.zeros((300, 700), np.float32).astype(dtype)
    assert nonfinite_rows(x) == (0, -1)
    if np.dtype(dtype).itemsize >= 4:
        big = np.full((4, 4), np.finfo(np.float32).max / 2, dtype)
        assert nonfinite_rows(big) == (0, -1)  # a sum that overflows is not a NaN
    for value in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[211, 650] = value
        y[299, 0] = value
        assert nonfinite_rows(y) == (2, 211)


@pytest.mark.parametrize(("layout", "fmt"), LAYOUTS)
def test_fp8_output_does_not_depend_on_the_block_partition(pairs, tmp_path: Path, layout, fmt):
    """Small blocks (several per weight, cut on tile boundaries) give the same bytes."""
    p = pairs[(layout, fmt)]
    outs = []
    for i, size in enumerate(["64MB", "40kB"]):
        out = tmp_path / f"o{i}"
        args = ["combine", "--base", p["base"], "-o", out, f"{p['ft']}:0.7", "--block-size", size]
        assert run_cli(*args, "-q") == 0
        outs.append(stored(out))
    for k in outs[0]:
        a, b = outs[0][k].reshape(-1), outs[1][k].reshape(-1)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), k


def test_fp8_mixes_with_bf16_checkpoints(pairs, tmp_path: Path) -> None:
    """A bf16 base with an FP8 fine-tune: the fine-tune is dequantized, the output is bf16."""
    p = pairs[("block", "e4m3")]
    name = "layers.0.mlp.up_proj.weight"
    wb = p["base_real"][name]
    bf16_base = write_checkpoint(
        tmp_path / "bf16-base",
        {name: wb.astype(np.float32).astype(BF16), "norm.weight": np.ones(200, np.float32)},
    )
    out = tmp_path / "edited"
    assert run_cli("combine", "--base", bf16_base, "-o", out, f"{p['ft']}:1", "-q") == 0
    got = stored(out)[name]
    assert got.dtype == torch.bfloat16
    wb32 = wb.astype(np.float32).astype(BF16).astype(np.float64)
    exact = wb32 + (p["ft_real"][name] - wb32)
    assert_matches_float64(got.float().numpy().astype(BF16), exact, np.abs(exact), 2, name)


def test_open_hides_scales_and_reads_real_values(pairs) -> None:
    """Scales are not tensors of the source (never operands); the weight reads dequantized.
    The model itself, saved as is, is the stored form: weight and scale bit for bit."""
    import streamvec as sv

    p = pairs[("channel", "e4m3")]
    base, ft = sv.open(p["base"]), sv.open(p["ft"])
    name = "layers.0.mlp.up_proj.weight"
    assert sorted(base.source.tensors) == [name, "norm.weight"]
    reader = base.source.tensors[name].reader
    np.testing.assert_allclose(reader.read(0, 300), p["base_real"][name], rtol=2.0**-24)
    assert sorted(ft - base) == [name, "norm.weight"]
    assert (ft - base)[name].dtype == np.float32
    assert sorted(base) == [name, name + "_scale", "norm.weight"]
    assert base[name].dtype == FP8_E4M3_NP


def test_fp8_merge_recipe_keeps_the_base_format(pairs, tmp_path: Path) -> None:
    p = pairs[("block", "e4m3")]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {p['base']}\nmodels:\n"
        f"  - model: {p['ft']}\n    parameters: {{weight: 0.5}}\n"
    )
    out = tmp_path / "merged"
    assert run_cli("merge", recipe, "-o", out, "-q") == 0
    got = stored(out)
    name = "layers.0.mlp.up_proj.weight"
    assert got[name].dtype == torch.float8_e4m3fn
    scale = got[name.removesuffix("weight") + "weight_scale_inv"]
    deq = dequantize(got[name], scale)
    wb, wf = p["base_real"][name], p["ft_real"][name]
    want = wb + 0.5 * (wf - wb)
    within_one_fp8_rounding(deq, want, expand(scale.double().numpy(), want.shape), "e4m3")
    assert "quantization_config" in json.loads((out / "config.json").read_text())


def test_unknown_method_refuses_integer_weights_and_accepts_float_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def pair(kind: str, weight: np.ndarray) -> tuple[Path, Path]:
        paths = []
        for side in ("b", "f"):
            p = write_checkpoint(tmp_path / kind / side, {"x.weight": weight})
            (p / "config.json").write_text(
                json.dumps({"quantization_config": {"quant_method": "hqq"}})
            )
            paths.append(p)
        return paths[0], paths[1]

    b, f = pair("int", rng.integers(0, 9, (4, 4), dtype=np.int32))
    proc = run_cli_subprocess("combine", "--base", b, "-o", tmp_path / "o1", f)
    assert proc.returncode == 2 and "'x.weight'" in proc.stderr and "hqq" in proc.stderr
    # A dequantized model whose config kept the entry: nothing to dequantize, accepted.
    b, f = pair("float", rng.standard_normal((4, 4)).astype(np.float32))
    assert run_cli("combine", "--base", b, "-o", tmp_path / "o2", f"{f}:0.5", "-q") == 0
