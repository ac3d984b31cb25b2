"""The merge methods, in one explicit table: recipe name -> :class:`MergeMethod`.

Adding a method: write ``streamvec/merge/methods/<name>.py`` defining ``METHOD`` and add one
line below.
"""

from __future__ import annotations

from streamvec.errors import StreamvecError
from streamvec.ops.merge.method import MergeMethod
from streamvec.ops.merge.methods import (
    breadcrumbs,
    breadcrumbs_paper,
    breadcrumbs_ties,
    dare_linear,
    dare_paper,
    dare_ties,
    della,
    della_linear,
    iso_c,
    shared_unique,
    task_arithmetic,
    ties,
    ties_paper,
    tsv,
)

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        # mergekit 0.1.5's generalized task arithmetic, same names, parameters and defaults
        task_arithmetic.METHOD,
        ties.METHOD,
        dare_ties.METHOD,
        dare_linear.METHOD,
        breadcrumbs.METHOD,
        breadcrumbs_ties.METHOD,
        della.METHOD,
        della_linear.METHOD,
        # the papers' own definitions where they differ from mergekit's
        ties_paper.METHOD,
        dare_paper.METHOD,
        breadcrumbs_paper.METHOD,
        # SVD-based merges (streamvec.ops.merge_svd)
        tsv.METHOD,
        iso_c.METHOD,
        # shared/unique components of the task vectors (streamvec.ops.decompose)
        shared_unique.METHOD,
    )
}


def get_method(name: str) -> MergeMethod:
    """The method of a recipe's ``merge_method`` (``-`` and ``_`` are interchangeable).

    Raises:
        StreamvecError: no such method (the message lists them).
    """
    method = METHODS.get(name) or METHODS.get(name.replace("-", "_"))
    if method is None:
        raise StreamvecError(
            f"unknown merge_method {name!r}; streamvec merges: {', '.join(METHODS)} "
            "(`streamvec merge --list` describes them)"
        )
    return method
