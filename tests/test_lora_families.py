"""``streamvec lora`` on tiny models of every family: PEFT wraps every target and applies it right.

For each family a base and a fine-tune (every float parameter perturbed) are saved with
``save_pretrained``; the adapter is loaded with ``PeftModel.from_pretrained`` on the base and
merged. The reference is independent of streamvec's naming: both checkpoints are loaded with
their own class (transformers' or diffusers' key conversion), ``tau = ft - base`` per loaded
parameter in float64, and every parameter of a module PEFT wrapped must equal
``base + best rank-r approximation of tau`` (exact SVD); every other parameter the base's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.adapter_models import FAMILIES, load, save_pair
from tests.conftest import run_cli

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

RANK = 3


@pytest.fixture(scope="module")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


def _best_rank(tau: np.ndarray, r: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(tau, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_export_is_applied_exactly_by_peft(
    family: str, family_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if family == "unet":
        pytest.importorskip("diffusers")
    base_dir, ft_dir = save_pair(family, family_root)
    out = family_root / f"{family}-lora"
    rc = run_cli(
        "lora", base_dir, ft_dir, "-o", out, "--rank", str(RANK), "--method", "exact", "-q"
    )
    assert rc == 0
    err = capsys.readouterr().err
    report = json.loads((out / "streamvec_lora.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    exported = set(report["modules"])

    base = load(base_dir)
    ft_state = {k: v.double() for k, v in load(ft_dir).state_dict().items()}
    model = peft.PeftModel.from_pretrained(base, out)
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    wrapped = {n[len(prefix) :] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    # Every module the adapter holds is wrapped, and nothing else is.
    assert wrapped == exported, (wrapped ^ exported, config["target_modules"])
    merged = model.merge_and_unload()
    base_state = {k: v.double() for k, v in load(base_dir).state_dict().items()}

    # Parameters tied to a wrapped module's weight (a tied lm_head) follow it.
    owner: dict[int, str] = {}
    for name, p in merged.named_parameters(remove_duplicate=False):
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module in exported:
            owner[id(p)] = name
    edited = {name for name, p in merged.named_parameters(remove_duplicate=False) if id(p) in owner}
    for name, got in merged.state_dict().items():
        got64 = got.double()
        want = base_state[name]
        if name in edited:
            tau = (ft_state[name] - base_state[name]).numpy()
            rows = tau.reshape(tau.shape[0], -1)
            want = base_state[name] + torch.from_numpy(_best_rank(rows, RANK).reshape(tau.shape))
        # float32 factors and one float32 rounding of W + B A: ~1e-7 relative to |W| ~ 0.1-1.
        assert float((got64 - want).abs().max()) < 1e-5, (family, name)

    # Changed tensors no LoRA layer can hold are listed, with why, on stderr and in README.
    left_out = report["left_out_changed"]
    readme = (out / "README.md").read_text()
    for name, why in left_out.items():
        assert f"`{name}`" in readme and why in readme
        assert name in err
    if family in ("mixtral", "qwen2_moe"):
        assert any("router" in why for why in left_out.values())
        assert any("converts it on load" in why for why in left_out.values())
    if family == "gpt2":
        assert config["fan_in_fan_out"] is True
    if family == "t5":
        assert any(m.endswith("relative_attention_bias") for m in exported)
    if family == "unet":
        # "0" would match every module named ...0: full names for to_out.0.
        assert "0" not in config["target_modules"]
        assert any(m.endswith("to_out.0") for m in exported)
    if family == "vit":
        # Loaded names (transformers 5 converts ViT's keys): q_proj, not attention.query.
        assert any(m.endswith("q_proj") for m in exported)
