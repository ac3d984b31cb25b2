"""Which layer and which kind of module a tensor belongs to, from its name alone.

Names follow the Hugging Face conventions of the common families (Llama/Mistral/Qwen, GPT-2,
BERT/ViT, T5, CLIP, diffusers' attention blocks). A name that matches no rule is ``other``:
the grouping only aggregates figures, it never decides what is computed.
"""

from __future__ import annotations

import re

from streamvec.ops.merge.params import layer_index

# Module kinds, in the order tables and plots list them.
KINDS = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "mlp", "embed", "norm", "other")

# First match wins; each pattern is searched in the dotted name (``re.search``).
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("norm", r"(norm|(^|\.)ln_?\w*\.|layer_?norm|\.ln\d*\.)"),
        ("embed", r"(embed|(^|\.)wte\.|(^|\.)wpe\.|tok_embeddings|word_embeddings|shared\.)"),
        ("attn.qkv", r"(qkv|c_attn\.|query_key_value|in_proj_weight|in_proj_bias)"),
        ("attn.q", r"((^|\.)(q_proj|query|to_q|q_lin|wq|q)\.)"),
        ("attn.k", r"((^|\.)(k_proj|key|to_k|k_lin|wk|k)\.)"),
        ("attn.v", r"((^|\.)(v_proj|value|to_v|v_lin|wv|v)\.)"),
        (
            "attn.o",
            r"((^|\.)(o_proj|out_proj|to_out\.0|out_lin|wo|o)\.|attn\.c_proj\.|"
            r"attention\.output\.dense\.)",
        ),
        (
            "mlp",
            r"(mlp|feed_forward|ffn|(^|\.)(fc\d|gate_proj|up_proj|down_proj|w[123]|c_fc)\.|"
            r"intermediate\.|(^|\.)output\.dense\.|DenseReluDense)",
        ),
    )
)


def module_kind(name: str) -> str:
    """The kind of module a tensor belongs to: one of :data:`KINDS`.

    Args:
        name: the tensor name.

    Returns:
        ``attn.q``, ``attn.k``, ``attn.v``, ``attn.o`` (attention projections), ``attn.qkv``
        (fused), ``mlp``, ``embed`` (token/position embeddings), ``norm`` or ``other``.

    Example:
        >>> module_kind("model.layers.3.self_attn.q_proj.weight")
        'attn.q'
        >>> module_kind("transformer.h.0.mlp.c_fc.weight"), module_kind("lm_head.weight")
        ('mlp', 'other')
    """
    for kind, pattern in _RULES:
        if pattern.search(name):
            return kind
    return "other"


def layer_of(name: str) -> int | None:
    """The numbered block a tensor belongs to (``model.layers.7.mlp...`` -> 7), if any.

    The same rule as the merge recipes' layer gradients, so "layer 7" means one thing.
    """
    idx = layer_index(name)
    if idx is not None:
        return idx
    m = _LAYER_EXTRA.search(name)
    return int(m.group(1)) if m else None


# Encoders (BERT/ViT ``encoder.layer.N``, T5 ``block.N``) beyond the merge rule's names.
_LAYER_EXTRA = re.compile(r"(?:^|\.)(?:layer|block|resblocks)\.(\d+)\.")
