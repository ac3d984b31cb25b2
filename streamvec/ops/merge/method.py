"""What a merge method is: a name, its paper, its parameters and a factory.

Every method lives in one module of :mod:`streamvec.ops.merge.methods` that defines one
:class:`MergeMethod`; :mod:`streamvec.ops.merge.registry` lists them in one table. A method either
*builds* a lazy :class:`~streamvec.model.algebra.Model` (streamed by the engine like any other
model)
or, for merges that must factor matrices before streaming (TSV-M, Iso-C), *runs* itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from streamvec.engine.settings import Settings
from streamvec.ops.merge.params import ParamSpec

if TYPE_CHECKING:
    from streamvec.model.algebra import Model
    from streamvec.ops.merge.recipe import MergeRequest


@dataclass(frozen=True)
class RunSettings(Settings):
    """How to run a merge: the run settings (:class:`streamvec.engine.settings.Settings`), with no
    progress bar unless asked for (the Python API's default)."""

    progress: bool = False

    def svd_run_options(self, method: str, *, intermediate: bool = False) -> Settings:
        """The settings of a merge that runs the SVD commands (``tsv``, ``iso_c``,
        ``shared_unique``), all carried over; one the method cannot honour is refused,
        naming the flag and the method, rather than dropped.

        Args:
            method: the recipe's ``merge_method``, for the messages.
            intermediate: the SVD command writes an intermediate of the merge's own, beside
                its output (``shared_unique``'s components): one left complete by an
                unfinished run is replaced, one left unfinished is continued with
                ``--resume``.

        Returns:
            The settings for :func:`streamvec.ops.merge_svd.merge_svd` or
            :func:`streamvec.ops.decompose.decompose`.

        Raises:
            StreamvecError: a setting the method does not support was given.
        """
        from streamvec.ops.registry import operation

        self.check_supported("merge", operation("merge").settings, f" with merge_method {method}")
        settings = Settings.from_kwargs({f.name: getattr(self, f.name) for f in fields(Settings)})
        if intermediate:
            settings = settings.replace(overwrite=True)
        # Settings the merge honours in its own output pass (shard size...) are not the SVD
        # command's to refuse.
        command = "decompose" if intermediate else "merge-svd"
        return settings.only(operation(command).settings)


Builder = Callable[["MergeRequest", RunSettings], "Model"]
Runner = Callable[["MergeRequest", "str | os.PathLike[str]", RunSettings], Any]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method.

    Attributes:
        name: the ``merge_method`` value in a recipe.
        summary: one line: what it computes.
        paper: the citation it implements.
        params: the parameters it takes (names, types, defaults, scope).
        build: factory of the lazy merged model (streamed by the engine).
        run: for methods that cannot be one lazy model: do the whole merge, return a report
            with a ``summary()``. Exactly one of ``build`` and ``run`` is set.
        randomized: draws random masks (takes the recipe's ``seed``).
        mergekit: same name, parameters and semantics as mergekit 0.1.5's method.
        notes: how it differs from mergekit or the paper, for the docs and ``--list``.
    """

    name: str
    summary: str
    paper: str
    params: tuple[ParamSpec, ...]
    build: Builder | None = None
    run: Runner | None = None
    randomized: bool = False
    mergekit: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if (self.build is None) == (self.run is None):
            raise ValueError(f"merge method {self.name}: give exactly one of build and run")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"merge method {self.name}: duplicate parameter names")

    def param(self, name: str) -> ParamSpec | None:
        """The spec of a parameter, or None when the method has no such parameter."""
        return next((p for p in self.params if p.name == name), None)
