"""PEFT LoRA of convolutions (a diffusers UNet's ``nn.Conv2d``) as task vectors.

A real tiny ``UNet2DConditionModel`` is saved with ``save_pretrained``; PEFT's ``LoraConfig``
targets its convolutions (3x3 ``conv_in``/``conv1``/``conv2``, 1x1 ``conv_shortcut`` and
``proj_in``) and one linear layer, with random factors (``init_lora_weights=False``). The
reference is PEFT's own ``merge_and_unload()`` on the base loaded in float64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

import streamvec as sv
from streamvec.model.peft_source import AdapterError
from tests.adapter_models import load, save_pair
from tests.conftest import run_cli

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("diffusers")

TARGETS = ["conv_in", "conv1", "conv2", "conv_shortcut", "proj_in", "to_q"]


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("conv-lora")
    base, _ = save_pair("unet", root)
    torch.manual_seed(7)
    cfg = peft.LoraConfig(
        r=3, lora_alpha=6, use_rslora=True, init_lora_weights=False, target_modules=TARGETS
    )
    pm = peft.get_peft_model(load(base), cfg)
    adapter = root / "unet-lora"
    pm.save_pretrained(adapter)
    kernels = {
        tuple(m.lora_A["default"].weight.shape[2:])
        for m in pm.modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A and m.lora_A["default"].weight.ndim == 4
    }
    # The reference: PEFT's merge in float64 on the float64 base (the float32 factors are
    # exact in float64).
    base64 = load(base).double()
    merged = peft.PeftModel.from_pretrained(base64, adapter).merge_and_unload()
    want = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    return {"root": root, "base": base, "adapter": adapter, "want": want, "kernels": kernels}


def _read(path: Path) -> dict[str, np.ndarray]:
    files = sorted(path.glob("*.safetensors"))
    out: dict[str, np.ndarray] = {}
    for f in files:
        with safe_open(str(f), framework="np") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_conv_lora_equals_merge_and_unload_in_float64(unet: dict[str, Any]) -> None:
    assert {(3, 3), (1, 1)} <= unet["kernels"]  # both kinds of conv are adapted
    out = unet["root"] / "combined"
    assert run_cli("combine", "--base", unet["base"], "-o", out, f"{unet['adapter']}:1", "-q") == 0
    got = _read(out)
    base = _read(unet["base"])
    assert set(got) == set(unet["want"])
    eps = float(np.finfo(np.float32).eps)
    changed = 0
    for name, want in unet["want"].items():
        g = got[name].astype(np.float64)
        # One float32 rounding of the update and one of W + tau: within 2 eps of the scale.
        scale = max(float(np.abs(want).max()), float(np.abs(base[name]).max()), 1e-30)
        diff = float(np.abs(g - want).max())
        assert diff <= 2 * eps * scale, (name, diff / (eps * scale))
        if not np.array_equal(base[name].astype(np.float64), want):
            changed += 1
            assert got[name].shape == base[name].shape
    assert changed >= len(TARGETS)


def test_conv_lora_task_vector_is_the_float64_product(unet: dict[str, Any]) -> None:
    """The adapter's task vector of a 3x3 conv: ``scaling * B @ A`` over flattened kernels."""
    lora = sv.open(str(unet["adapter"]), base=str(unet["base"]))
    w = safetensors.numpy.load_file(str(unet["adapter"] / "adapter_model.safetensors"))
    name = "conv_in.weight"
    a = w["base_model.model.conv_in.lora_A.weight"].astype(np.float64)  # (r, in, 3, 3)
    b = w["base_model.model.conv_in.lora_B.weight"].astype(np.float64)  # (out, r, 1, 1)
    scale = 6 / np.sqrt(3)  # rslora
    want = scale * np.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    tensor = lora.resolved().tensors[name]
    got = tensor.read_rows(0, tensor.shape[0]).reshape(want.shape)
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_grouped_conv_lora_is_refused_naming_the_module(
    unet: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PEFT's LoRA of a grouped conv has B (out, r / groups, 1, 1): its update is undefined."""
    bad = tmp_path / "grouped-lora"
    bad.mkdir()
    config = (unet["adapter"] / "adapter_config.json").read_bytes()
    (bad / "adapter_config.json").write_bytes(config)
    w = safetensors.numpy.load_file(str(unet["adapter"] / "adapter_model.safetensors"))
    key = "base_model.model.conv_in.lora_B.weight"
    w[key] = np.ascontiguousarray(w[key][:, :1])  # r=3, groups=3
    safetensors.numpy.save_file(w, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="'conv_in'.*grouped convolution"):
        sv.open(str(bad), base=str(unet["base"]))
    out = tmp_path / "out"
    assert run_cli("combine", "--base", unet["base"], "-o", out, f"{bad}:1", "-q") == 2
    err = capsys.readouterr().err
    assert "conv_in" in err and "target_modules" in err
    assert not out.exists()
