"""``streamvec.merge``: the public name of :mod:`streamvec.ops.merge`.

A re-export only: ``streamvec.merge.merge`` is public API, the code lives in
:mod:`streamvec.ops.merge`.
"""

from streamvec.ops.merge import (
    METHODS,
    MergeMethod,
    MergeModel,
    MergeReport,
    Recipe,
    RunSettings,
    build_model,
    get_method,
    load_recipe,
    merge,
    parse_recipe,
    request_for,
)

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
