"""DARE as the paper defines it: drop with rate p, rescale the rest by exactly 1/(1 - p).

Yu et al. (ICML 2024): each delta parameter is dropped independently with probability ``p``
and the survivors are multiplied by ``1 / (1 - p)`` so the expected task vector is unchanged;
the sparsified task vectors are then merged by task arithmetic:
``theta = base + lambda * sum_i w_i * m_i * tau_i / density_i`` with ``density = 1 - p``.
(mergekit's ``dare_*`` instead restore each tensor's L1 norm.) The drop of an element is a
Philox draw keyed by ``(seed, tensor, model)`` at its flat index: the same seed gives the same
bytes whatever the scheduler, workers or memory budget.
"""

from __future__ import annotations

from streamvec.model.algebra import Model
from streamvec.ops.merge.gta import LAMBDA, check_density, pass_options
from streamvec.ops.merge.method import MergeMethod, RunSettings
from streamvec.ops.merge.model import Dense, Empty, MergeModel, ModelTerm, RandomKeep, TensorPlan
from streamvec.ops.merge.params import ParamSpec
from streamvec.ops.merge.recipe import MergeRequest, TensorParams

PARAMS = (
    ParamSpec("weight", float, 1.0, "model", "weight w_i of the model's task vector"),
    ParamSpec("density", float, 0.1, "model", "keep probability 1 - p (paper: drop rate p = 0.9)"),
    LAMBDA,
)


def build(request: MergeRequest, settings: RunSettings) -> Model:
    def plan(tensor: str, shape: tuple[int, ...], p: TensorParams) -> TensorPlan:
        terms = []
        for entry, values in zip(request.entries, p.models, strict=True):
            d = float(values["density"])
            check_density(d, f"{request.recipe.source}: {entry.where} ({entry.path})")
            w = float(values["weight"])
            if d >= 1:
                terms.append(ModelTerm(Dense(), w))
            elif d <= 0:
                terms.append(ModelTerm(Empty(), w))
            else:
                terms.append(ModelTerm(RandomKeep(d), w, rescale=1.0 / d))
        return TensorPlan(tuple(terms), lam=p.globals["lambda"])

    return MergeModel(request, plan, pass_options(settings))


METHOD = MergeMethod(
    name="dare_paper",
    summary="drop task-vector entries with rate p = 1 - density, rescale survivors by "
    "1/density, task arithmetic",
    paper="Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous "
    "Models as a Free Lunch, ICML 2024 (arXiv:2311.03099)",
    params=PARAMS,
    build=build,
    randomized=True,
    notes="exact 1/(1-p) rescale (mergekit's dare_* restore the L1 norm instead)",
)
