"""``streamvec lora``: a PEFT adapter that reproduces a fine-tune with exactly low-rank updates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from streamvec.io.peft.naming import target_modules_for
from streamvec.ops.lora import is_linear_weight
from tests.conftest import run_cli, tiny_llama_config

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

# Module -> rank of its exact update; v_proj of layer 1 gets rank 1 (a rank_pattern entry).
RANKS = {
    "model.layers.0.self_attn.q_proj": 2,
    "model.layers.0.self_attn.v_proj": 2,
    "model.layers.1.self_attn.q_proj": 2,
    "model.layers.1.self_attn.v_proj": 1,
}


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny float32 Llama and a fine-tune whose q_proj/v_proj updates are exactly low-rank.

    float32, not bf16: the check is that the adapter reproduces the fine-tune, and bf16
    rounding of ``W + delta`` would make the stored delta full-rank noise of size ulp(W).
    """
    root = tmp_path_factory.mktemp("lora")
    config = tiny_llama_config()
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    ft = transformers.LlamaForCausalLM(config)
    ft.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module, r in RANKS.items():
            p = ft.get_parameter(f"{module}.weight")
            a = torch.randn(p.shape[0], r, generator=gen, dtype=torch.float64)
            b = torch.randn(r, p.shape[1], generator=gen, dtype=torch.float64)
            p.copy_((p.double() + 0.02 * (a @ b)).float())  # one rounding to float32
    ft.save_pretrained(root / "ft")
    return {"base": root / "base", "ft": root / "ft", "root": root}


def test_peft_adapter_reproduces_low_rank_finetune(lora_models, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    rc = run_cli("lora", lora_models["base"], lora_models["ft"], "-o", out, "--rank", "4", "-q")
    assert rc == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 2 and config["lora_alpha"] == 2  # scaling alpha / r = 1
    assert config["target_modules"] == ["q_proj", "v_proj"]  # every q/v of the base changed
    assert config["rank_pattern"] == {"model.layers.1.self_attn.v_proj": 1}
    assert config["alpha_pattern"] == config["rank_pattern"]  # scaling 1 there too
    assert config["base_model_name_or_path"] == str(lora_models["base"])
    weights = safetensors.numpy.load_file(str(out / "adapter_model.safetensors"))
    assert len(weights) == 2 * len(RANKS)
    for module, r in RANKS.items():
        a = weights[f"base_model.model.{module}.lora_A.weight"]
        b = weights[f"base_model.model.{module}.lora_B.weight"]
        assert a.shape[0] == r and b.shape[1] == r and a.dtype == np.float32
        # Balanced split: A and B have the same spectral norm, sqrt(S_1).
        na, nb = np.linalg.norm(a, 2), np.linalg.norm(b, 2)
        assert abs(na - nb) <= 1e-5 * na
    report = json.loads((out / "streamvec_lora.json").read_text())
    assert {m: v["rank"] for m, v in report["modules"].items()} == RANKS
    assert report["left_out_changed"] == {}

    base = transformers.LlamaForCausalLM.from_pretrained(lora_models["base"])
    ft = transformers.LlamaForCausalLM.from_pretrained(lora_models["ft"])
    model = peft.PeftModel.from_pretrained(base, out)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ft(ids).logits
        got_adapter = model(ids).logits  # unmerged: W x + B (A x)
        merged = model.merge_and_unload()
        got_merged = merged(ids).logits
        plain = transformers.LlamaForCausalLM.from_pretrained(lora_models["base"])(ids).logits
    # Tolerance: B A equals the float32 tau up to the float32 rounding of the factors
    # (~1e-7 relative to |delta| ~ 0.05) plus the one rounding of W + delta (ulp(W) ~ 1e-8);
    # merged weights are therefore within ~1e-7 absolute, and logits (O(1), a 2-layer net)
    # within ~1e-5. The fine-tune moves the logits by ~0.1-1, so the check is 4-5 orders
    # of magnitude tighter than the effect it reproduces.
    assert float((want - plain).abs().max()) > 0.05
    assert float((got_merged - want).abs().max()) < 1e-5
    assert float((got_adapter - want).abs().max()) < 1e-5
    ft_state = ft.state_dict()
    for name, w in merged.state_dict().items():
        assert float((w - ft_state[name]).abs().max()) < 1e-6, name


def test_include_gives_full_module_names_and_bf16(lora_models, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    rc = run_cli(
        "lora",
        lora_models["base"],
        lora_models["ft"],
        "-o",
        out,
        "--rank",
        "8",
        "--include",
        "model.layers.0.*",
        "--dtype",
        "bfloat16",
        "-q",
    )
    assert rc == 0
    config = json.loads((out / "adapter_config.json").read_text())
    # "q_proj" would also wrap layer 1's q_proj, which is not in the adapter.
    assert config["target_modules"] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert config["r"] == 2 and config["rank_pattern"] == {}
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        t = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
        assert t.dtype == torch.bfloat16 and tuple(t.shape) == (32, 2)


def test_linear_weight_selection_and_targets() -> None:
    assert is_linear_weight("model.layers.0.mlp.down_proj.weight", (32, 64))
    assert is_linear_weight("lm_head.weight", (128, 32))
    assert not is_linear_weight("model.embed_tokens.weight", (128, 32))
    assert not is_linear_weight("transformer.wte.weight", (128, 32))
    assert not is_linear_weight("model.norm.weight", (32,))
    assert not is_linear_weight("model.layers.0.self_attn.q_proj.bias", (32,))
    assert not is_linear_weight("model.conv.weight", (4, 3, 5, 5))
    base = ("a.0.q_proj", "a.1.q_proj", "a.0.k_proj", "a.1.k_proj")
    assert target_modules_for(["a.0.q_proj", "a.1.q_proj", "a.0.k_proj"], base) == [
        "a.0.k_proj",
        "q_proj",
    ]
    # A digit is never a short target: "0" would wrap every module whose name ends in .0.
    unet = ("up.0.attn.to_out", "up.0.attn.to_out.0", "up.0.attn.to_out.1", "down.0")
    assert target_modules_for(["up.0.attn.to_out.0"], unet) == ["up.0.attn.to_out.0"]
