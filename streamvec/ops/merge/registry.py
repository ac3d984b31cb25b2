"""The merge methods of ``merge`` recipes, by name: the merge-method entries of the one
operations table, :data:`streamvec.ops.registry.OPERATIONS`.

:data:`METHODS` reads like a dict (``METHODS["ties"]``, ``for name in METHODS``) and imports a
method's module when the method is first asked for, so resolving a recipe imports its own
method only. Adding a method: ``streamvec/ops/merge/methods/<name>.py`` defining ``METHOD``,
and one line in the table.

Example:
    >>> get_method("dare-ties").name  # `-` and `_` are interchangeable
    'dare_ties'
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from streamvec.errors import StreamvecError
from streamvec.ops.merge.method import MergeMethod
from streamvec.ops.registry import OPERATIONS, MergeMethodEntry

__all__ = ["METHODS", "get_method"]


_ENTRIES = {n: e for n, e in OPERATIONS.items() if isinstance(e, MergeMethodEntry)}


class _Methods(Mapping[str, MergeMethod]):
    """The table's merge methods, in its order, each loaded on first access."""

    def __getitem__(self, name: str) -> MergeMethod:
        return _ENTRIES[name].load()

    def __contains__(self, name: object) -> bool:
        return name in _ENTRIES  # without importing the method's module

    def __iter__(self) -> Iterator[str]:
        return iter(_ENTRIES)

    def __len__(self) -> int:
        return len(_ENTRIES)


METHODS: Mapping[str, MergeMethod] = _Methods()


def get_method(name: str) -> MergeMethod:
    """The method of a recipe's ``merge_method`` (``-`` and ``_`` are interchangeable).

    Raises:
        StreamvecError: no such method (the message lists them).
    """
    for candidate in (name, name.replace("-", "_")):
        if candidate in METHODS:
            return METHODS[candidate]
    raise StreamvecError(
        f"unknown merge_method {name!r}; streamvec merges: {', '.join(METHODS)} "
        "(`streamvec merge --list` describes them)"
    )
