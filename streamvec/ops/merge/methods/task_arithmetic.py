"""Task arithmetic (Ilharco et al., ICLR 2023) with mergekit's parameters.

``theta = base + lambda * sum_i w_i tau_i`` (``normalize: true`` divides by ``sum_i w_i``).
A recipe whose parameters are plain values runs through :func:`streamvec.ops.combine.
combine_terms`, exactly as ``streamvec combine`` would; per-tensor values (filters, gradients)
become per-tensor weighted sums. Either way the engine's linear kernel computes it.
"""

from __future__ import annotations

from dataclasses import replace

from streamvec.dtypes import dtype_name
from streamvec.model.algebra import Model
from streamvec.ops.merge.gta import gta_method
from streamvec.ops.merge.method import RunSettings
from streamvec.ops.merge.recipe import MergeRequest

_GTA = gta_method(
    name="task_arithmetic",
    sparsification=None,
    consensus=False,
    default_normalize=False,
    default_rescale=False,
    summary="base + lambda * sum_i w_i (ft_i - base)",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
)


def build(request: MergeRequest, settings: RunSettings) -> Model:
    """``streamvec combine`` for uniform recipes, per-tensor weighted sums otherwise."""
    from streamvec.ops.combine import TermSpec, combine_terms

    if not request.uniform():
        assert _GTA.build is not None
        return _GTA.build(request, settings)
    values = request.values(next(iter(request.base.tensors)))
    weights = [float(w) for w in values.per_model("weight")]
    if values.globals["normalize"]:
        div = sum(weights)
        weights = [w / (div if abs(div) >= 1e-8 else 1.0) for w in weights]
    terms = [TermSpec(e.path, w) for e, w in zip(request.entries, weights, strict=True)]
    inc = request.name_filter.include if request.name_filter else ()
    exc = request.name_filter.exclude if request.name_filter else ()
    return combine_terms(
        terms,
        base=request.base.label,
        scale=float(values.globals["lambda"]),
        include=list(inc) or None,
        exclude=list(exc) or None,
        dtype=dtype_name(request.out_dtype) if request.out_dtype is not None else None,
        vocab=request.vocab,
    )


METHOD = replace(_GTA, build=build)
