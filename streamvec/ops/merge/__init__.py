"""Merge methods beyond plain task arithmetic, and mergekit-style recipes.

``streamvec merge RECIPE.yaml -o OUT`` runs a recipe in mergekit's format for the task-vector
family (``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``,
``breadcrumbs_ties``, ``della``, ``della_linear``, with mergekit's parameters and defaults),
the papers' own variants (``ties_paper``, ``dare_paper``, ``breadcrumbs_paper``) and the SVD
merges (``tsv``, ``iso_c``). Every method streams block by block in bounded memory; methods
that rank whole tensors or models first run small histogram passes
(:mod:`streamvec.ops.merge.select`); randomised methods give the same bytes for the same seed
whatever the scheduler, workers or memory budget (:mod:`streamvec.ops.merge.rng`).

Example:
    >>> from streamvec.ops.merge import merge  # doctest: +SKIP
    >>> merge("ties.yaml", "merged").summary()  # doctest: +SKIP
"""

from streamvec.ops.merge.api import MergeReport, build_model, merge, request_for
from streamvec.ops.merge.method import MergeMethod, RunSettings
from streamvec.ops.merge.model import MergeModel
from streamvec.ops.merge.recipe import Recipe, load_recipe, parse_recipe
from streamvec.ops.merge.registry import METHODS, get_method

__all__ = [
    "METHODS",
    "MergeMethod",
    "MergeModel",
    "MergeReport",
    "Recipe",
    "RunSettings",
    "build_model",
    "get_method",
    "load_recipe",
    "merge",
    "parse_recipe",
    "request_for",
]
