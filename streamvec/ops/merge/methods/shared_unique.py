"""Shared and unique components as a merge: ``base + lambda * sum_i (s_i shared_i + u_i unique_i)``.

Each task vector is split by :func:`streamvec.ops.decompose.decompose` into the component
shared by all of them and its own unique component (``shared_i + unique_i = tau_i``); the recipe
weighs the two separately per model. Weights ``shared: 1, unique: 1`` give plain task
arithmetic; ``shared: 0, unique: -1`` on a toxic model negates only what is unique to it;
``shared: 2, unique: 1`` adds the shared component once more as an extra task vector.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from streamvec.dtypes import dtype_name
from streamvec.errors import StreamvecError
from streamvec.ops.merge.method import MergeMethod, RunSettings
from streamvec.ops.merge.params import ParamSpec
from streamvec.ops.merge.recipe import MergeRequest
from streamvec.ops.merge.svd_bridge import RSVD_PARAMS
from streamvec.signals import deferred

PARAMS = (
    ParamSpec("shared", float, 1.0, "model", "weight of the model's shared component"),
    ParamSpec("unique", float, 1.0, "model", "weight of the model's unique component"),
    ParamSpec("lambda", float, 1.0, "global", "scale of the merged task vector"),
    ParamSpec("rank", int, 16, "global", "top singular subspace of each task, per matrix"),
    ParamSpec("threshold", float, 0.85, "global", "eigenvalue cut for common directions"),
    *RSVD_PARAMS,
)


def run(request: MergeRequest, output: str | os.PathLike[str], settings: RunSettings) -> Any:
    from streamvec.ops.combine import TermSpec, combine_terms
    from streamvec.ops.decompose import decompose
    from streamvec.ops.svd import SVDOptions

    if not request.uniform():
        raise StreamvecError(
            f"{request.recipe.source}: shared_unique takes plain parameter values (no filters "
            "or gradients)"
        )
    if len(request.entries) < 2:
        raise StreamvecError(f"{request.recipe.source}: shared_unique needs at least two models")
    values = request.values(next(iter(request.base.tensors)))
    g = values.globals
    flt = request.name_filter
    include = list(flt.include) or None if flt else None
    exclude = list(flt.exclude) or None if flt else None
    # The components are intermediate: a hidden sibling of the output, removed afterwards
    # (decompose replaces one left by an earlier run, and continues an unfinished one with
    # --resume).
    work = Path(output).absolute().parent / f".{Path(output).name}.components"
    report = None
    try:
        report = decompose(
            [str(e.path) for e in request.entries],
            work,
            options=SVDOptions(
                rank=int(g["rank"]),
                oversample=int(g["oversample"]),
                power_iters=None if g["power_iters"] is None else int(g["power_iters"]),
                seed=request.seed,
            ),
            threshold=float(g["threshold"]),
            base=request.base.label,
            include=include,
            exclude=exclude,
            run=settings.svd_run_options("shared_unique", intermediate=True),
            intermediate=True,
        )
        terms = []
        weights = zip(values.per_model("shared"), values.per_model("unique"), strict=True)
        for entry, (s, u) in zip(request.entries, weights, strict=True):
            parts = report.components[str(entry.path)]
            terms.append(TermSpec(str(work / parts["shared"]), float(s)))
            terms.append(TermSpec(str(work / parts["unique"]), float(u)))
        model = combine_terms(
            terms,
            base=request.base.label,
            scale=float(g["lambda"]),
            include=include,
            exclude=exclude,
            dtype=dtype_name(request.out_dtype) if request.out_dtype is not None else None,
            # The components hold float tensors only (within the filter): others keep the base.
            keep_base_when_missing=True,
        )
        return model.save(output, description="merge shared_unique", **settings.engine_kwargs())
    finally:
        if report is not None:  # this run's components; never what it refused to replace
            with deferred():  # a signal must not cut the removal short
                shutil.rmtree(work, ignore_errors=True)


METHOD = MergeMethod(
    name="shared_unique",
    summary="split task vectors into shared and unique components (decompose), then "
    "base + lambda * sum_i (shared_i * w_shared_i + unique_i * w_unique_i)",
    paper="Damirchi et al., arXiv:2512.22511, 2025 (shared/unique task-vector components)",
    params=PARAMS,
    run=run,
    notes="per-model weights `shared` and `unique`; see docs/decompositions.md",
)
