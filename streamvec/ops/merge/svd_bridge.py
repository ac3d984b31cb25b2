"""Run the SVD-based merges of :mod:`streamvec.ops.merge_svd` (TSV-M, Iso-C) from a recipe.

Those merges factor each matrix before anything can be streamed, so they are not one lazy
model: the recipe is translated to a :func:`streamvec.ops.merge_svd.merge_svd` call. Their
parameters are global plain values (the methods have no per-model weights).
"""

from __future__ import annotations

import os
from typing import Any

from streamvec.compute.linalg.defaults import DEFAULT_POWER_ITERS
from streamvec.dtypes import dtype_name
from streamvec.errors import StreamvecError
from streamvec.ops.merge.method import RunSettings
from streamvec.ops.merge.params import ParamSpec
from streamvec.ops.merge.recipe import MergeRequest

# The randomized SVD's own parameters, shared by every method that factors (tsv, iso_c,
# shared_unique).
RSVD_PARAMS = (
    ParamSpec("oversample", int, 10, "global", "extra random probes of the randomized SVD"),
    ParamSpec(
        "power_iters",
        int,
        DEFAULT_POWER_ITERS,
        "global",
        "subspace iterations of the randomized SVD (default: chosen per matrix)",
    ),
)

SVD_PARAMS = (
    ParamSpec("lambda", float, 1.0, "global", "scale alpha of the merged task vector"),
    ParamSpec(
        "rank", int, None, "global", "rank budget K per matrix (default: full rank min(m, n))"
    ),
    *RSVD_PARAMS,
)


def run_svd_merge(
    kind: str, request: MergeRequest, output: str | os.PathLike[str], settings: RunSettings
) -> Any:
    """Run ``merge_svd(kind, ...)`` with the recipe's models, base, parameters and dtype."""
    try:
        from streamvec.ops.merge_svd import merge_svd
        from streamvec.ops.svd import SVDOptions
    except ModuleNotFoundError:
        raise StreamvecError(
            f"merge method {request.method.name} needs streamvec.ops.merge_svd, which this "
            "installation does not have"
        ) from None
    if not request.uniform():
        raise StreamvecError(
            f"{request.recipe.source}: {request.method.name} takes plain parameter values "
            "(no filters or gradients)"
        )
    g = request.values(next(iter(request.base.tensors))).globals
    options = SVDOptions(
        rank=int(g["rank"] or 1),  # merge_svd takes the budget from `rank` below
        oversample=int(g["oversample"]),
        power_iters=None if g["power_iters"] is None else int(g["power_iters"]),
        seed=request.seed,
    )
    flt = request.name_filter
    return merge_svd(
        kind,
        [e.path for e in request.entries],
        output,
        options=options,
        rank=None if g["rank"] is None else int(g["rank"]),
        alpha=float(g["lambda"]),
        base=request.base.label,
        include=list(flt.include) or None if flt else None,
        exclude=list(flt.exclude) or None if flt else None,
        dtype=dtype_name(request.out_dtype) if request.out_dtype is not None else None,
        shard_size=settings.shard_size,
        # the recipe's tokenizer_source, or --vocab, as for every other method
        run=settings.svd_run_options(request.method.name).replace(vocab=request.vocab),
    )
