"""Tiny random-weight models of real transformers / diffusers classes, for the adapter tests.

Each builder returns a freshly initialised model; :func:`save_pair` saves it as a base and a
fine-tune whose every float parameter is perturbed (full-rank noise), with ``save_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def _llama() -> Any:
    import transformers as T

    return T.LlamaForCausalLM(
        T.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


def _qwen2() -> Any:
    import transformers as T

    return T.Qwen2ForCausalLM(
        T.Qwen2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
    )


def _gpt2() -> Any:
    import transformers as T

    return T.GPT2LMHeadModel(
        T.GPT2Config(
            n_embd=16,
            n_layer=1,
            n_head=2,
            vocab_size=64,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def _bert() -> Any:
    import transformers as T

    return T.BertModel(
        T.BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=16,
        )
    )


def _t5() -> Any:
    import transformers as T

    return T.T5ForConditionalGeneration(
        T.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2)
    )


def _vit() -> Any:
    import transformers as T

    return T.ViTModel(
        T.ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=24,
            image_size=8,
            patch_size=4,
        )
    )


def _mixtral() -> Any:
    import transformers as T

    return T.MixtralForCausalLM(
        T.MixtralConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=2,
            num_experts_per_tok=1,
        )
    )


def _qwen2_moe() -> Any:
    import transformers as T

    return T.Qwen2MoeForCausalLM(
        T.Qwen2MoeConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=2,
            num_experts_per_tok=1,
        )
    )


def _clip() -> Any:
    import transformers as T

    return T.CLIPModel(
        T.CLIPConfig(
            text_config={
                "vocab_size": 64,
                "hidden_size": 16,
                "intermediate_size": 24,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 16,
                "projection_dim": 8,
            },
            vision_config={
                "hidden_size": 16,
                "intermediate_size": 24,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 8,
                "patch_size": 4,
                "projection_dim": 8,
            },
            projection_dim=8,
        )
    )


def _unet() -> Any:
    import diffusers

    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    )


FAMILIES: dict[str, Callable[[], Any]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "gpt2": _gpt2,
    "bert": _bert,
    "t5": _t5,
    "vit": _vit,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "clip": _clip,
    "unet": _unet,
}


def load(path: Path) -> Any:
    """Load a saved tiny model with the class it was saved from (transformers or diffusers)."""
    import json

    cfg = json.loads((path / "config.json").read_text())
    if "_class_name" in cfg:
        import diffusers

        return getattr(diffusers, cfg["_class_name"]).from_pretrained(path)
    import transformers

    return getattr(transformers, cfg["architectures"][0]).from_pretrained(path)


def save_pair(family: str, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Save ``family``'s base and a fine-tune with every float parameter perturbed."""
    import torch

    torch.manual_seed(seed)
    model = FAMILIES[family]()
    base = root / f"{family}-base"
    model.save_pretrained(base)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters appear once: one perturbation
            if p.dtype.is_floating_point:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    ft = root / f"{family}-ft"
    model.save_pretrained(ft)
    return base, ft
