"""What a merge method is: a name, its paper, its parameters and a factory.

Every method lives in one module of :mod:`streamvec.merge.methods` that defines one
:class:`MergeMethod`; :mod:`streamvec.merge.registry` lists them in one table. A method either
*builds* a lazy :class:`~streamvec.algebra.Model` (streamed by the engine like any other model)
or, for merges that must factor matrices before streaming (TSV-M, Iso-C), *runs* itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from streamvec.merge.params import ParamSpec

if TYPE_CHECKING:
    from streamvec.algebra import Model
    from streamvec.merge.recipe import MergeRequest


@dataclass(frozen=True)
class RunSettings:
    """How to run a merge: the engine's knobs plus the output layout.

    Attributes:
        workers: blocks in flight at once (default: CPU count).
        scheduler: ``threads``, ``processes``, ``sync``, ``local:N`` or a scheduler address.
        memory_limit: ceiling on anonymous memory (``"4GB"``; default: half of available).
        progress: show progress bars.
        overwrite: replace an existing output once the new one is complete.
        shard_size: safetensors shard size.
        block_size: target bytes of float32 work per block (the engine's default when None);
            also used by the first passes.
        engine: further :func:`streamvec.engine.run` options passed through as they are
            (``resume``, ``check_finite``...).
    """

    workers: int | None = None
    scheduler: str = "threads"
    memory_limit: str | int | None = None
    progress: bool = False
    overwrite: bool = False
    shard_size: str | int = "5GB"
    block_size: str | int | None = None
    engine: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], **more: Any) -> RunSettings:
        """Settings from ``streamvec.cli._run_kwargs``-style options; unknown ones go to the
        engine as they are (the CLI's run options grow without this module changing)."""
        known = {f.name for f in fields(cls)} - {"engine"}
        merged = {**kwargs, **more}
        return cls(
            **{k: v for k, v in merged.items() if k in known},
            engine={k: v for k, v in merged.items() if k not in known},
        )

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`streamvec.engine.run` (and ``Model.save``)."""
        out: dict[str, Any] = {
            "workers": self.workers,
            "scheduler": self.scheduler,
            "memory_limit": self.memory_limit,
            "progress": self.progress,
            "overwrite": self.overwrite,
            "shard_size": self.shard_size,
            **self.engine,
        }
        if self.block_size is not None:
            out["block_size"] = self.block_size
        return out

    def svd_run_options(self, method: str, *, intermediate: bool = False) -> Any:
        """The :class:`streamvec.ops.svd.RunOptions` of a merge that runs the SVD commands.

        Every setting is carried over (resume, finite check, block size and device included);
        one these commands cannot honour is refused, naming the flag and the method, rather
        than dropped.

        Args:
            method: the recipe's ``merge_method``, for the messages.
            intermediate: the SVD command writes an intermediate that is always recomputed
                (``shared_unique``'s components); ``resume`` then applies to the merge's own
                output pass only (:meth:`engine_kwargs`), not to this command.

        Returns:
            The run options.

        Raises:
            StreamvecError: a setting the SVD commands do not support was given.
        """
        from streamvec.errors import StreamvecError
        from streamvec.ops.svd import RunOptions

        run_fields = {f.name for f in fields(RunOptions)}
        # Values that mean "not asked for": the engine's defaults.
        unset: dict[str, Any] = {"compression": "lz4"}
        extra = {}
        for key, value in self.engine.items():
            if key in run_fields:
                extra[key] = value
            elif value not in (None, False, unset.get(key)):
                flag = "--" + key.replace("_", "-")
                raise StreamvecError(
                    f"{flag} is not supported by `streamvec merge` with merge_method {method}; "
                    "rerun without it"
                )
        if intermediate:
            extra["resume"] = False
        elif extra.get("resume"):
            raise StreamvecError(
                f"--resume is not supported by `streamvec merge` with merge_method {method} "
                "yet; rerun without it (the output appears only when complete)"
            )
        return RunOptions(
            workers=self.workers,
            scheduler=self.scheduler,
            memory_limit=self.memory_limit,
            progress=self.progress,
            overwrite=self.overwrite,
            block_size=self.block_size,
            **extra,
        )


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
