"""Tiny random-weight models of real transformers and diffusers classes, saved the way users
have them (``save_pretrained``), for the per-family tests.

Every family is a base and two fine-tunes (the base's weights plus small seeded noise), built
with a fixed seed. Hidden sizes are 16-32 and layer counts 1-2, so a whole family saves in
well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Family:
    """How to build one architecture and how to load it back.

    Attributes:
        name: the test id.
        build: returns a fresh model (random weights from the torch seed set before).
        loader: dotted path of the class whose ``from_pretrained`` loads the output.
        library: ``transformers`` or ``diffusers`` (the file names the outputs must keep).
        dtype: the dtype the checkpoint is saved in.
    """

    name: str
    build: Callable[[], Any]
    loader: str
    library: str = "transformers"
    dtype: str = "float32"


def _lm(config_cls: str, model_cls: str, **kw: Any) -> Callable[[], Any]:
    def build() -> Any:
        import transformers

        settings: dict[str, Any] = {
            "vocab_size": 64,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 32,
            "head_dim": 8,
        }
        settings.update(kw)
        config = getattr(transformers, config_cls)(**settings)
        return getattr(transformers, model_cls)(config)

    return build


def _gpt2() -> Any:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> Any:
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return transformers.BertForMaskedLM(cfg)


def _t5() -> Any:
    import transformers

    cfg = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2
    )
    return transformers.T5ForConditionalGeneration(cfg)


def _vit() -> Any:
    import transformers

    cfg = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(cfg)


def _clip() -> Any:
    import transformers

    text = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
    }
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 8,
        "patch_size": 4,
    }
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    return transformers.CLIPModel(cfg)


def _clip_text() -> Any:
    import transformers

    cfg = transformers.CLIPTextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    return transformers.CLIPTextModel(cfg)


def _unet() -> Any:
    import diffusers

    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        # One cross-attention block each way and no mid block: every kind of tensor a UNet
        # has (convs, norms, attention, to_out.0, time embedding), in 122 tensors.
        block_out_channels=(16,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        mid_block_type=None,
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _vae() -> Any:
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=8,
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "llama",
            _lm("LlamaConfig", "LlamaForCausalLM"),
            "transformers.LlamaForCausalLM",
            dtype="bfloat16",
        ),
        Family(
            "mistral", _lm("MistralConfig", "MistralForCausalLM"), "transformers.MistralForCausalLM"
        ),
        Family("qwen2", _lm("Qwen2Config", "Qwen2ForCausalLM"), "transformers.Qwen2ForCausalLM"),
        Family(
            "qwen3",
            _lm("Qwen3Config", "Qwen3ForCausalLM", tie_word_embeddings=True),
            "transformers.Qwen3ForCausalLM",
            dtype="bfloat16",
        ),
        Family(
            "gemma2", _lm("Gemma2Config", "Gemma2ForCausalLM"), "transformers.Gemma2ForCausalLM"
        ),
        Family(
            "gemma3",
            _lm("Gemma3TextConfig", "Gemma3ForCausalLM", sliding_window=8),
            "transformers.Gemma3ForCausalLM",
        ),
        Family(
            "phi3",
            _lm("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0),
            "transformers.Phi3ForCausalLM",
        ),
        Family(
            "mixtral",
            _lm("MixtralConfig", "MixtralForCausalLM", num_local_experts=2, num_experts_per_tok=1),
            "transformers.MixtralForCausalLM",
        ),
        Family(
            "qwen2_moe",
            _lm(
                "Qwen2MoeConfig",
                "Qwen2MoeForCausalLM",
                num_experts=2,
                num_experts_per_tok=1,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=16,
            ),
            "transformers.Qwen2MoeForCausalLM",
        ),
        Family("gpt2", _gpt2, "transformers.GPT2LMHeadModel"),
        Family("bert", _bert, "transformers.BertForMaskedLM"),
        Family("t5", _t5, "transformers.T5ForConditionalGeneration"),
        Family("vit", _vit, "transformers.ViTForImageClassification"),
        Family("clip", _clip, "transformers.CLIPModel"),
        Family("clip_text", _clip_text, "transformers.CLIPTextModel"),
        Family("unet", _unet, "diffusers.UNet2DConditionModel", library="diffusers"),
        Family("vae", _vae, "diffusers.AutoencoderKL", library="diffusers"),
    ]
}


def loader(family: Family) -> Any:
    """The class whose ``from_pretrained`` loads this family."""
    import importlib

    module, _, cls = family.loader.rpartition(".")
    return getattr(importlib.import_module(module), cls)


def perturb(model: Any, seed: int, scale: float = 0.01) -> None:
    """Add seeded noise to every parameter in place (tied parameters stay tied: one tensor)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # deduplicated: a tied tensor is perturbed once
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def save(model: Any, path: Path, family: Family, **kw: Any) -> Path:
    """``save_pretrained`` in the family's dtype (safetensors, as the libraries write it)."""
    import torch

    model = model.to(getattr(torch, family.dtype))
    model.save_pretrained(str(path), **kw)
    return path


def build_family(root: Path, family: Family) -> dict[str, Path]:
    """Base and two fine-tunes of ``family`` under ``root`` (seeds fixed)."""
    import torch

    torch.manual_seed(0)
    model = family.build().eval()
    out = {"base": save(model, root / "base", family)}
    for i, name in enumerate(("ft1", "ft2"), start=1):
        torch.manual_seed(i)
        ft = family.build().eval()
        ft.load_state_dict(model.state_dict())
        perturb(ft, seed=100 + i)
        out[name] = save(ft, root / name, family)
    return out


def read_all(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory in its own dtype, read with safetensors."""
    from streamvec.io.safetensors.checkpoint import resolve_checkpoint

    out: dict[str, np.ndarray] = {}
    for shard in resolve_checkpoint(path).shards:
        out.update(_load(shard))
    return out


def _load(path: Path) -> dict[str, np.ndarray]:
    # safetensors.numpy has no bfloat16: read through torch, and widen bf16 exactly.
    import ml_dtypes
    import torch
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if t.dtype == torch.bfloat16:
                out[k] = t.float().numpy().astype(ml_dtypes.bfloat16)
            else:
                out[k] = t.numpy().copy()
    return out
