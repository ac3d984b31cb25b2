"""TIES-Merging as the paper defines it: trim each task vector over the *whole model*.

Yadav et al. (NeurIPS 2023) keep the top-k% magnitudes of each task vector flattened over all
parameters (k = 20 in the paper), not per tensor as mergekit does. Their reference code keeps
``|tau| >= kthvalue(|tau|, N - int(N * density))`` (ties at the threshold kept). The threshold
of each model is found by streaming radix selection (:mod:`streamvec.ops.merge.select`): two
histogram passes over the model, 256 KiB of counts per model, exact; ``exact_threshold:
false`` stops after the first pass and keeps ``|tau| >=`` the lower edge of the threshold's
bin (relative threshold error < 2^-7; at most that bin's elements kept in excess).

Then, as in the paper and mergekit: elect the sign of each entry by the summed trimmed mass
(an exact zero elects +, where the reference code uses the model-wide majority: it decides
only entries whose nonzero trimmed values cancel exactly), and average the entries that agree
(disjoint mean; with weights, divided by the agreeing weights). ``theta = base + lambda *
merged``.
"""

from __future__ import annotations

from streamvec.model.algebra import Model
from streamvec.ops.merge.gta import LAMBDA, check_density, pass_options
from streamvec.ops.merge.method import MergeMethod, RunSettings
from streamvec.ops.merge.model import Dense, Empty, MergeModel, ModelTerm, ModelWideTopK, TensorPlan
from streamvec.ops.merge.params import ParamSpec
from streamvec.ops.merge.recipe import MergeRequest, TensorParams

PARAMS = (
    ParamSpec("weight", float, 1.0, "model", "weight w_i of the model's task vector"),
    ParamSpec(
        "density", float, 0.2, "model", "fraction of the whole task vector kept (paper: k=20%)"
    ),
    LAMBDA,
    ParamSpec(
        "exact_threshold",
        bool,
        True,
        "global",
        "two passes for the exact model-wide threshold; false: one pass, within 2^-7",
    ),
)


def build(request: MergeRequest, settings: RunSettings) -> Model:
    def plan(tensor: str, shape: tuple[int, ...], p: TensorParams) -> TensorPlan:
        exact = bool(p.globals["exact_threshold"])
        terms = []
        for entry, values in zip(request.entries, p.models, strict=True):
            d = float(values["density"])
            check_density(d, f"{request.recipe.source}: {entry.where} ({entry.path})")
            sp = Dense() if d >= 1 else Empty() if d <= 0 else ModelWideTopK(d, exact)
            terms.append(ModelTerm(sp, float(values["weight"])))
        return TensorPlan(tuple(terms), consensus="sum", normalize=True, lam=p.globals["lambda"])

    return MergeModel(request, plan, pass_options(settings))


METHOD = MergeMethod(
    name="ties_paper",
    summary="TIES with the paper's model-wide top-k trimming of each task vector, sign "
    "election and disjoint mean",
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 "
    "(arXiv:2306.01708)",
    params=PARAMS,
    build=build,
    notes="trimming threshold over the whole model by streaming radix selection (exact)",
)
