"""Model Breadcrumbs as the paper defines it: mask both tails of each layer's magnitudes.

Davari & Belilovsky (ECCV 2024): for each layer (tensor) of each task vector, sort the
entries by magnitude and mask those below the ``beta`` percentile (negligible perturbations)
and those above the ``gamma`` percentile (outliers); ``theta = base + lambda * sum_i w_i *
m_i * tau_i``. Here ``beta`` and ``gamma`` are fractions (0.85 and 0.993: keep the band
between the 85th and the 99.3th percentile), so the kept ascending ranks are
``[int(beta N), int(gamma N))``, found exactly by streaming radix selection. (mergekit's
``breadcrumbs`` parametrises by the kept density and the dropped top fraction, and keeps
everything at its default density 1.)
"""

from __future__ import annotations

import math

from streamvec.errors import StreamvecError
from streamvec.model.algebra import Model
from streamvec.ops.merge.gta import LAMBDA, pass_options
from streamvec.ops.merge.method import MergeMethod, RunSettings
from streamvec.ops.merge.model import MergeModel, ModelTerm, RankRange, TensorPlan
from streamvec.ops.merge.params import ParamSpec
from streamvec.ops.merge.recipe import MergeRequest, TensorParams

PARAMS = (
    ParamSpec("weight", float, 1.0, "model", "weight w_i of the model's task vector"),
    ParamSpec(
        "beta", float, 0.85, "model", "lower percentile (fraction): smaller magnitudes masked"
    ),
    ParamSpec(
        "gamma", float, 0.993, "model", "upper percentile (fraction): larger magnitudes masked"
    ),
    LAMBDA,
)


def build(request: MergeRequest, settings: RunSettings) -> Model:
    def plan(tensor: str, shape: tuple[int, ...], p: TensorParams) -> TensorPlan:
        numel = math.prod(shape)
        terms = []
        for entry, values in zip(request.entries, p.models, strict=True):
            beta, gamma = float(values["beta"]), float(values["gamma"])
            if not 0.0 <= beta <= gamma <= 1.0:
                raise StreamvecError(
                    f"{request.recipe.source}: {entry.where} ({entry.path}): breadcrumbs_paper "
                    f"needs 0 <= beta <= gamma <= 1 (percentiles as fractions, e.g. beta 0.85, "
                    f"gamma 0.993), got beta {beta}, gamma {gamma}"
                )
            rng = RankRange(int(beta * numel), int(gamma * numel))
            terms.append(ModelTerm(rng, float(values["weight"])))
        return TensorPlan(tuple(terms), lam=p.globals["lambda"])

    return MergeModel(request, plan, pass_options(settings))


METHOD = MergeMethod(
    name="breadcrumbs_paper",
    summary="per layer, mask task-vector magnitudes below the beta and above the gamma "
    "percentile; task arithmetic",
    paper="Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with "
    "Sparse Masks, ECCV 2024 (arXiv:2312.06795)",
    params=PARAMS,
    build=build,
    notes="percentiles per tensor as in the paper (the authors' code ranks per output row)",
)
