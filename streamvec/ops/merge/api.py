"""Run a recipe: ``merge(recipe, output)`` is what ``streamvec merge`` calls."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamvec.errors import StreamvecError
from streamvec.io.output import check_destination, input_paths
from streamvec.model.algebra import Model
from streamvec.ops.merge.binding import bind
from streamvec.ops.merge.method import RunSettings
from streamvec.ops.merge.recipe import MergeRequest, Recipe, load_recipe


@dataclass
class MergeReport:
    """What a merge did: the method, the request and the engine's (or SVD merge's) report."""

    method: str
    request: MergeRequest
    run: Any

    def summary(self) -> str:
        """One line for the terminal."""
        return f"merge {self.method}: {self.run.summary()}"


def _recipe(recipe: Recipe | str | os.PathLike[str]) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def request_for(
    recipe: Recipe | str | os.PathLike[str],
    *,
    seed: int | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    vocab: str | None = None,
    strict: bool = False,
) -> MergeRequest:
    """Load (if a path), check and bind a recipe; opens every input's headers.

    ``strict``: an adapter recorded with another local base is an error, not a warning.
    """
    return bind(
        _recipe(recipe), seed=seed, include=include, exclude=exclude, vocab=vocab, strict=strict
    )


def _bound(
    recipe: Recipe | str | os.PathLike[str],
    seed: int | None,
    include: list[str] | None,
    exclude: list[str] | None,
    settings: RunSettings | None,
    vocab: str | None,
) -> tuple[RunSettings, MergeRequest]:
    """The run's settings, holding the ``vocab=`` keyword (one value each), and the recipe
    bound with them."""
    settings = (settings or RunSettings()).with_keywords(vocab=vocab)
    request = request_for(
        recipe,
        seed=seed,
        include=include,
        exclude=exclude,
        vocab=settings.vocab,
        strict=settings.strict,
    )
    return settings, request


def build_model(
    recipe: Recipe | str | os.PathLike[str],
    *,
    seed: int | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    settings: RunSettings | None = None,
    vocab: str | None = None,
) -> Model:
    """The merged model of a recipe, lazily (nothing is computed until it is saved or read).

    ``settings`` tells how its first passes run (scheduler, workers, memory limit).

    Raises:
        StreamvecError: a bad recipe, or a method that cannot be a lazy model (tsv, iso_c:
            use :func:`merge`).

    Example:
        >>> model = build_model("ties.yaml")  # doctest: +SKIP
        >>> model["model.layers.0.mlp.up_proj.weight"].compute()  # doctest: +SKIP
    """
    settings, request = _bound(recipe, seed, include, exclude, settings, vocab)
    if request.method.build is None:
        raise StreamvecError(
            f"{request.method.name} factors matrices before streaming and is not a lazy "
            "model; run it with streamvec.ops.merge.merge(recipe, output)"
        )
    return request.method.build(request, settings)


def merge(
    recipe: Recipe | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    seed: int | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    settings: RunSettings | None = None,
    vocab: str | None = None,
) -> MergeReport:
    """Run a mergekit-style recipe and write the merged model (sharded safetensors, HF layout).

    Args:
        recipe: a YAML path or a parsed :class:`Recipe`.
        output: the output directory; it appears only when complete.
        seed: overrides the recipe's ``seed`` (randomised methods).
        include: merge only tensors matching these patterns; others keep the base.
        exclude: tensors matching these keep the base.
        settings: workers, scheduler, memory limit, progress, overwrite, shard size.

    Returns:
        A :class:`MergeReport`.

    Example:
        >>> merge("dare.yaml", "merged", seed=1)  # doctest: +SKIP
    """
    settings, request = _bound(recipe, seed, include, exclude, settings, vocab)
    method = request.method
    # Every recipe kind, including those that write intermediates beside the output first
    # (tsv, iso_c, shared_unique): never over the base or a model of the recipe.
    check_destination(
        Path(output),
        overwrite=settings.overwrite,
        inputs=input_paths([request.base, *request.models]),
    )
    if method.run is not None:
        return MergeReport(method.name, request, method.run(request, output, settings))
    assert method.build is not None
    model = method.build(request, settings)
    attrs = {
        "merge": _jsonable(
            {
                "method": method.name,
                "paper": method.paper,
                "seed": request.seed if method.randomized else None,
                "recipe": dict(request.recipe.raw),
                "recipe_file": request.recipe.source,
            }
        )
    }
    report = model.save(
        output,
        description=f"merge {method.name}",
        extra_attrs=attrs,
        **settings.engine_kwargs(),
    )
    return MergeReport(method.name, request, report)


def _jsonable(value: Any) -> Any:
    # YAML can hold dates and other types the JSON manifest cannot.
    return json.loads(json.dumps(value, default=str))
