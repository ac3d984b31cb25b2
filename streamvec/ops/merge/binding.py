"""Binding a recipe to its merge method: the method looked up, its parameters checked, every
model opened (headers only).

Apart from :mod:`streamvec.ops.merge.recipe` (which only parses) because the method table
imports the methods, and the methods import the recipe's types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from streamvec.errors import StreamvecError
from streamvec.model.algebra import Source
from streamvec.names import NameFilter
from streamvec.ops.merge.method import MergeMethod
from streamvec.ops.merge.params import check_setting, layer_index
from streamvec.ops.merge.recipe import MergeRequest, ModelEntry, Recipe, parse_dtype
from streamvec.ops.merge.registry import get_method


def bind(
    recipe: Recipe,
    *,
    seed: int | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    vocab: str | None = None,
    strict: bool = False,
) -> MergeRequest:
    """Check a recipe against its method and open every model (headers only).

    Args:
        vocab: vocabulary policy (``base``, ``common``, ``union``) overriding the recipe's
            ``tokenizer_source``; None: the recipe's, else refuse differing vocabularies.
        strict: a LoRA adapter recorded with another local base than the one it is applied
            to is an error (otherwise a warning naming both).
        recipe: from :func:`load_recipe` or :func:`parse_recipe`.
        seed: overrides the recipe's seed.
        include: only tensors matching these patterns are merged; others keep the base.
        exclude: tensors matching these keep the base.

    Raises:
        StreamvecError: unknown method, unknown parameter or one at the wrong scope, a value of
            the wrong type, a missing or non-local model path, duplicate models.
    """
    from streamvec.model.peft_source import applied_source, split_model_plus_lora
    from streamvec.model.sources import open_source

    src = recipe.source
    method = get_method(recipe.merge_method)
    _check_parameters(recipe, method)
    if recipe.base_model is None:
        raise StreamvecError(
            f"{src}: {method.name} needs base_model (task vectors are taken relative to it)"
        )
    base = _open(recipe.base_model, "base_model", src, open_source)
    if not base.is_point:
        raise StreamvecError(f"{src}: base_model {recipe.base_model} is a store, not a checkpoint")
    models: list[Source] = []
    entries: list[ModelEntry] = []
    seen: dict[str, str] = {}
    for entry in recipe.models:
        s = _open(entry.path, f"{entry.where}.model", src, open_source, strict)
        if s.info.get("kind") == "lora_adapter":
            # An adapter alone stands for the base with it merged in (base_model+LORA).
            assert recipe.base_model is not None
            plain = split_model_plus_lora(recipe.base_model)
            lora = open_source(
                entry.path, base=plain[0] if plain else recipe.base_model, strict=strict
            )
            s = applied_source(base, lora, f"{recipe.base_model}+{entry.path}")
        if s.key == base.key:
            if entry.parameters:
                raise StreamvecError(
                    f"{src}: {entry.where}.parameters: {entry.path} is the base_model; "
                    f"{method.name} does not use parameters of the base (remove them)"
                )
            continue  # mergekit lets the base be listed among the models
        if s.key in seen:
            raise StreamvecError(
                f"{src}: {entry.where}: {entry.path} is already listed as {seen[s.key]}"
            )
        seen[s.key] = entry.where
        models.append(s)
        entries.append(entry)
    if not models:
        raise StreamvecError(f"{src}: models lists no model other than the base")
    out = recipe.out_dtype or recipe.dtype
    where = "out_dtype" if recipe.out_dtype else "dtype"
    if recipe.dtype:
        parse_dtype(recipe.dtype, f"{src}: dtype")
    if seed is not None and (isinstance(seed, bool) or seed < 0):
        raise StreamvecError(f"--seed must be an integer >= 0, got {seed!r}")
    return MergeRequest(
        method=method,
        recipe=recipe,
        base=base,
        models=tuple(models),
        entries=tuple(entries),
        seed=seed if seed is not None else (recipe.seed or 0),
        out_dtype=parse_dtype(out, f"{src}: {where}") if out else None,
        name_filter=NameFilter.from_patterns(include, exclude),
        num_layers=_num_layers(base),
        vocab=vocab or recipe.tokenizer_source,
    )


def _open(path: str, where: str, src: str, open_source: Any, strict: bool = False) -> Source:
    from streamvec.model.peft_source import applied_source, split_model_plus_lora

    plus = split_model_plus_lora(path)
    if plus is not None:  # mergekit's MODEL+LORA: the checkpoint with the adapter merged in
        model = _open(plus[0], where, src, open_source, strict)
        return applied_source(model, open_source(plus[1], base=plus[0], strict=strict), path)
    from streamvec.io.hub import parse_hub_id

    if not Path(path).exists() and parse_hub_id(path) is None:
        raise StreamvecError(
            f"{src}: {where}: {path!r} is neither a local path (no such file or directory) "
            "nor a Hugging Face model id (org/name or org/name@revision)"
        )
    source: Source = open_source(path)
    return source


def _check_parameters(recipe: Recipe, method: MergeMethod) -> None:
    src = recipe.source
    names = ", ".join(p.name for p in method.params) or "none"
    for key, setting in recipe.parameters.items():
        spec = method.param(str(key))
        if spec is None:
            raise StreamvecError(
                f"{src}: parameters.{key}: {method.name} has no parameter '{key}' "
                f"(it takes: {names})"
            )
        check_setting(spec, setting, f"{src}: parameters.{key}")
    for entry in recipe.models:
        for key, setting in entry.parameters.items():
            spec = method.param(str(key))
            at = f"{src}: {entry.where}.parameters.{key}"
            if spec is None:
                raise StreamvecError(
                    f"{at}: {method.name} has no parameter '{key}' (it takes: {names})"
                )
            if spec.scope == "global":
                raise StreamvecError(
                    f"{at}: '{key}' is a global parameter of {method.name}; set it in the "
                    "top-level parameters"
                )
            check_setting(spec, setting, at)


def _num_layers(base: Source) -> int:
    """Decoder layer count: the base's config.json, else the highest layer index + 1."""
    for f in base.extra_files:
        if Path(f).name == "config.json":
            try:
                cfg = json.loads(Path(f).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                break
            for c in (cfg, cfg.get("text_config") or {}):
                n = c.get("num_hidden_layers") if isinstance(c, dict) else None
                if isinstance(n, int) and n > 0:
                    return n
    idx = [layer_index(n) for n in base.tensors]
    found = [i for i in idx if i is not None]
    return max(found) + 1 if found else 1
