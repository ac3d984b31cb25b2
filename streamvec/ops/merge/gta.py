"""The generalized task-arithmetic family as mergekit 0.1.5 defines it, and its parameters.

mergekit's ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``,
``breadcrumbs_ties``, ``della`` and ``della_linear`` are one computation with three switches:
how each task vector is sparsified (none, top-k magnitude, random, magnitude with outliers,
DELLA's MagPrune), whether signs are elected (TIES), and the defaults of ``normalize`` and
``rescale``. :func:`gta_method` builds the :class:`~streamvec.ops.merge.method.MergeMethod` of one
member; the method modules only choose the switches.

Semantics, per tensor and model (``N`` elements, ``d`` = density), as mergekit:

* ``magnitude``: ``d >= 1`` keeps all, ``d <= 0`` none, else the top ``max(1, int(d N))`` by
  ``|tau|`` (ties broken by position here; mergekit's unstable sort picks arbitrarily);
* ``random``: keep each element with probability ``d`` (``d >= 1``: all);
* ``magnitude_outliers``: ``d >= 1`` keeps all; else drop the top ``int(gamma N)`` and the
  bottom ``N - int(d N) - int(gamma N)`` (at least 0), keeping ``int(d N)``;
* ``della_magprune``: ``d >= 1`` all, ``d <= 0`` none; else keep with probability
  ``d - eps + 2 eps r`` where ``r`` is the normalised magnitude rank along axis 1 (a row of a
  matrix; a 1-d tensor as a whole); ``d +- eps`` must lie in (0, 1);
* ``rescale`` (when sparsifying): multiply the kept elements by ``sum|tau| / sum|kept tau|``
  over the tensor (L1), unless either sum is below 1e-7;
* then weights, sign election, normalisation and lambda as in
  :mod:`streamvec.ops.merge.blockop`.
"""

from __future__ import annotations

import math
from typing import Literal

from streamvec.engine.settings import Settings
from streamvec.errors import StreamvecError
from streamvec.model.algebra import Model
from streamvec.ops.merge.method import MergeMethod, RunSettings
from streamvec.ops.merge.model import (
    DellaKeep,
    Dense,
    Empty,
    MergeModel,
    ModelTerm,
    Planner,
    RandomKeep,
    RankRange,
    Sparsify,
    TensorPlan,
)
from streamvec.ops.merge.params import REQUIRED, ParamSpec
from streamvec.ops.merge.recipe import MergeRequest, TensorParams

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]

WEIGHT = ParamSpec("weight", float, REQUIRED, "model", "weight w_i of the model's task vector")
DENSITY = ParamSpec(
    "density", float, 1.0, "model", "fraction of the task vector kept by sparsification"
)
GAMMA = ParamSpec(
    "gamma", float, 0.01, "model", "fraction of largest-magnitude entries dropped as outliers"
)
EPSILON = ParamSpec("epsilon", float, 0.15, "model", "half-width of DELLA's keep-probability range")
LAMBDA = ParamSpec("lambda", float, 1.0, "global", "scale of the merged task vector")
INT8_MASK = ParamSpec(
    "int8_mask", bool, False, "global", "mergekit memory option; accepted, no effect here"
)


def pass_options(settings: RunSettings) -> Settings:
    """The first passes run with the output pass's scheduler, workers, budget and progress."""
    return settings.only(("workers", "scheduler", "memory_limit", "block_size"))


def check_density(value: float, where: str) -> None:
    """Densities are fractions; a negative one is a mistake, not "none"."""
    if value < 0:
        raise StreamvecError(f"{where}: density must be >= 0, got {value}")


def sparsify_spec(
    kind: Sparsification | None, values: dict[str, float], numel: int, where: str
) -> Sparsify:
    """mergekit's choice of kept elements for one tensor of one model."""
    if kind is None:
        return Dense()
    d = float(values["density"])
    check_density(d, where)
    if d >= 1:
        return Dense()
    if kind == "magnitude":
        if d <= 0 or numel == 0:
            return Empty()
        k = max(1, int(d * numel))
        return RankRange(numel - k, None)
    if kind == "random":
        return RandomKeep(d) if d > 0 else Empty()
    if kind == "magnitude_outliers":
        target = int(d * numel)
        n_top = int(float(values["gamma"]) * numel)
        n_bot = max(0, numel - target - n_top)
        if target <= 0:
            return Empty()
        return RankRange(n_bot, min(numel, n_bot + target))
    if kind == "della_magprune":
        if d <= 0:
            return Empty()
        eps = float(values["epsilon"])
        if d + eps >= 1 or d - eps <= 0:
            raise StreamvecError(
                f"{where}: epsilon {eps} with density {d}: density +- epsilon must lie in (0, 1)"
            )
        return DellaKeep(d, eps)
    raise ValueError(f"unknown sparsification {kind!r}")


def gta_method(
    *,
    name: str,
    sparsification: Sparsification | None,
    consensus: bool,
    default_normalize: bool,
    default_rescale: bool,
    summary: str,
    paper: str,
    notes: str = "",
) -> MergeMethod:
    """The :class:`MergeMethod` of one member of mergekit's generalized task arithmetic."""
    params = [WEIGHT, DENSITY]
    if sparsification == "magnitude_outliers":
        params.append(GAMMA)
    if sparsification == "della_magprune":
        params.append(EPSILON)
    params += [
        ParamSpec(
            "normalize",
            bool,
            default_normalize,
            "global",
            "divide by the sum of weights (of the models agreeing in sign, with consensus)",
        ),
        ParamSpec(
            "rescale",
            bool,
            default_rescale,
            "global",
            "after sparsifying, restore each task vector's L1 norm per tensor",
        ),
        LAMBDA,
        INT8_MASK,
    ]

    def planner_for(request: MergeRequest) -> Planner:
        def plan(tensor: str, shape: tuple[int, ...], p: TensorParams) -> TensorPlan:
            numel = math.prod(shape)
            terms = []
            for entry, values in zip(request.entries, p.models, strict=True):
                where = f"{request.recipe.source}: {entry.where} ({entry.path}), tensor {tensor}"
                sp = sparsify_spec(sparsification, dict(values), numel, where)
                rescale: Literal["l1"] | None = None
                if p.globals["rescale"] and sparsification is not None:
                    rescale = "l1"
                terms.append(ModelTerm(sp, float(values["weight"]), rescale))
            return TensorPlan(
                tuple(terms),
                consensus="sum" if consensus else None,
                normalize=bool(p.globals["normalize"]),
                lam=float(p.globals["lambda"]),
                linear=sparsification is None and not consensus,
            )

        return plan

    def build(request: MergeRequest, settings: RunSettings) -> Model:
        return MergeModel(request, planner_for(request), pass_options(settings))

    return MergeMethod(
        name=name,
        summary=summary,
        paper=paper,
        params=tuple(params),
        build=build,
        randomized=sparsification in ("random", "della_magprune"),
        mergekit=True,
        notes=notes,
    )
