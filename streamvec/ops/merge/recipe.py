"""mergekit-style YAML recipes: parse, check every field, bind to a method and open the models.

Supported (the task-vector family, mergekit's ``models:`` form)::

    merge_method: ties            # a name from `streamvec merge --list`
    base_model: ./llama-base      # a local checkpoint, or a Hub id org/name[@revision]
    models:
      - model: ./llama-math       # a local checkpoint, or a streamvec task-vector store
        parameters: {weight: 0.5, density: 0.4}
      - model: ./llama-code
        parameters:
          weight: [{filter: self_attn, value: 0.7}, {value: 0.3}]
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32                # mergekit's compute dtype; here: output dtype if no out_dtype
    out_dtype: bfloat16
    seed: 0                       # streamvec extension (mergekit ignores unknown keys)
    tokenizer_source: base        # or union: the vocabulary policy (docs/checkpoints.md)

Any other field (``slices``, ``modules``, ``tokenizer``, ``chat_template``, a typo) is an
error naming it: a recipe is never half-applied.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamvec.dtypes import parse_output_dtype
from streamvec.errors import StreamvecError
from streamvec.model.algebra import Source
from streamvec.names import NameFilter
from streamvec.ops.merge.method import MergeMethod
from streamvec.ops.merge.params import (
    ParamSpec,
    evaluate,
    is_uniform,
    layer_position,
)

SUPPORTED_FIELDS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "seed",
    "tokenizer_source",
)
# mergekit fields streamvec knows but does not do, with what to do instead.
_UNSUPPORTED = {
    "slices": "layer slices (passthrough/frankenmerges) are not supported; merge whole models "
    "with `models:`",
    "modules": "per-module definitions are not supported; merge whole models with `models:`",
    "tokenizer": "tokenizer merging is not supported; the output keeps the base model's "
    "tokenizer files",
    "chat_template": "chat templates are not set by streamvec; the base model's "
    "tokenizer_config.json is copied as it is",
}
_MODEL_FIELDS = ("model", "parameters")


@dataclass(frozen=True)
class ModelEntry:
    """One entry of ``models:``.

    Attributes:
        path: the model path as written.
        parameters: its raw per-model settings.
        where: its location in the recipe, e.g. ``models[1]``.
    """

    path: str
    parameters: Mapping[str, Any]
    where: str


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe (fields checked for form, not yet against a method)."""

    merge_method: str
    base_model: str | None
    models: tuple[ModelEntry, ...]
    parameters: Mapping[str, Any]
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int | None = None
    source: str = "<recipe>"
    # mergekit's tokenizer_source (base or union): the vocabulary policy of the merge.
    tokenizer_source: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and check a YAML recipe file.

    Raises:
        StreamvecError: missing file, invalid YAML, or an unsupported or malformed field.
    """
    p = Path(path)
    if not p.exists():
        raise StreamvecError(f"{p}: no such recipe file")
    if not p.is_file():
        # A device (/dev/zero) or FIFO would be read forever or block: never open one.
        raise StreamvecError(
            f"{p}: not a regular file (a directory, device or FIFO); give a recipe"
        )
    try:
        import yaml
    except ModuleNotFoundError:
        raise StreamvecError(
            "reading merge recipes needs PyYAML: pip install pyyaml (or pip install streamvec)"
        ) from None
    with p.open("rb") as f:
        raw = f.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise StreamvecError(
            f"{p}: larger than {MAX_RECIPE_BYTES >> 10} KiB; a recipe is a short YAML file "
            "(check that this is the recipe)"
        )
    try:
        text = raw.decode("utf-8")
        _check_yaml_bounds(text, str(p))
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StreamvecError(f"{p}: not valid YAML: {exc}".replace("\n", " ")) from None
    except UnicodeDecodeError:
        raise StreamvecError(f"{p}: not a text (UTF-8) file") from None
    return parse_recipe(data, str(p))


# Bounds on what a recipe may make the YAML reader do: a recipe is a few hundred lines at
# most, so these are far above real recipes and far below what costs time or memory.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_DEPTH = 32
MAX_RECIPE_NODES = 100_000


def _check_yaml_bounds(text: str, source: str) -> None:
    """Refuse deep nesting and alias expansion (a "billion laughs" bomb) before building data.

    Nesting is counted on the event stream (the YAML composer recurses, so a deep document
    would exhaust the stack); the expanded size is counted on the composed node graph, where
    an alias is a shared node, with one visit per distinct node.
    """
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_RECIPE_DEPTH:
                raise StreamvecError(
                    f"{source}: nested more than {MAX_RECIPE_DEPTH} levels deep; a recipe is "
                    "a shallow mapping (merge_method, base_model, models, parameters)"
                )
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def expanded(node: yaml.Node) -> int:
        if id(node) in open_nodes:
            raise StreamvecError(
                f"{source}: a YAML alias refers to a node that contains it (a cycle); write "
                "the recipe out without it"
            )
        if id(node) in sizes:
            return sizes[id(node)]
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(expanded(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(expanded(k) + expanded(v) for k, v in node.value)
        open_nodes.discard(id(node))
        sizes[id(node)] = min(total, MAX_RECIPE_NODES + 1)
        return sizes[id(node)]

    if root is not None and expanded(root) > MAX_RECIPE_NODES:
        raise StreamvecError(
            f"{source}: expands to more than {MAX_RECIPE_NODES} values through YAML aliases "
            "(&anchor / *alias); write the recipe out without them"
        )


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Check a recipe's structure (a dict as YAML loads it) and return it as a :class:`Recipe`.

    Example:
        >>> r = parse_recipe({"merge_method": "ties", "base_model": "b",
        ...                   "models": [{"model": "a", "parameters": {"weight": 1}}]})
        >>> r.merge_method, r.models[0].parameters
        ('ties', {'weight': 1})
    """
    if not isinstance(data, Mapping):
        raise StreamvecError(f"{source}: a recipe is a YAML mapping (merge_method, models...)")
    for key in data:
        if key in _UNSUPPORTED:
            raise StreamvecError(
                f"{source}: recipe field '{key}' is not supported: {_UNSUPPORTED[key]}"
            )
        if key not in SUPPORTED_FIELDS:
            raise StreamvecError(
                f"{source}: unsupported recipe field '{key}' (streamvec reads "
                f"{', '.join(SUPPORTED_FIELDS)})"
            )
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise StreamvecError(f"{source}: recipe field 'merge_method' is missing or not text")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise StreamvecError(
            f"{source}: base_model must be text: a local path or a Hub id "
            "(org/name or org/name@revision); mergekit's mapping form is not read"
        )
    tok = data.get("tokenizer_source")
    if tok is not None and tok not in ("base", "union"):
        raise StreamvecError(
            f"{source}: tokenizer_source {tok!r} is not supported: use base (the base's "
            "vocabulary and tokenizer) or union (added tokens kept; see docs/checkpoints.md)"
        )
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise StreamvecError(f"{source}: recipe field 'models' must be a non-empty list")
    entries = []
    for i, m in enumerate(models):
        where = f"models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, Mapping):
            raise StreamvecError(f"{source}: {where} must be a mapping with 'model'")
        for key in m:
            if key not in _MODEL_FIELDS:
                raise StreamvecError(
                    f"{source}: unsupported field '{where}.{key}' (a model entry takes model "
                    "and parameters)"
                )
        path = m.get("model")
        if not isinstance(path, str) or not path:
            raise StreamvecError(
                f"{source}: {where}.model must be text: a local path, a Hub id "
                "(org/name@revision) or MODEL+LORA; mergekit's mapping form is not read"
            )
        params = m.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise StreamvecError(f"{source}: {where}.parameters must be a mapping")
        entries.append(ModelEntry(path, dict(params), where))
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise StreamvecError(f"{source}: recipe field 'parameters' must be a mapping")
    for key in ("dtype", "out_dtype"):
        v = data.get(key)
        if v is not None and not isinstance(v, str):
            raise StreamvecError(f"{source}: {key} must be a dtype name, got {v!r}")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise StreamvecError(f"{source}: seed must be an integer >= 0, got {seed!r}")
    return Recipe(
        merge_method=method,
        base_model=base,
        models=tuple(entries),
        parameters=dict(params),
        dtype=data.get("dtype"),
        out_dtype=data.get("out_dtype"),
        seed=seed,
        source=source,
        tokenizer_source=tok,
        raw=dict(data),
    )


def parse_dtype(name: str, where: str) -> np.dtype:
    """A recipe dtype (``bfloat16``, ``torch.float16``...) as numpy; float types only."""
    text = name[len("torch.") :] if name.startswith("torch.") else name
    try:
        dt = parse_output_dtype(text)
    except StreamvecError:
        raise StreamvecError(
            f"{where}: unsupported dtype {name!r} (use float32, float16, bfloat16 or float64)"
        ) from None
    assert dt is not None
    return dt


@dataclass(frozen=True)
class TensorParams:
    """Parameter values for one tensor: the global ones and one dict per fine-tuned model."""

    globals: Mapping[str, Any]
    models: tuple[Mapping[str, Any], ...]

    def per_model(self, name: str) -> tuple[Any, ...]:
        """One parameter's value for every model, in recipe order."""
        return tuple(m[name] for m in self.models)


@dataclass
class MergeRequest:
    """A recipe bound to its method, with every input opened (headers only).

    Attributes:
        method: the merge method.
        recipe: the parsed recipe.
        base: the base checkpoint.
        models: the fine-tuned models (the base left out), in recipe order.
        entries: their recipe entries, in the same order.
        seed: the seed of randomised methods (``--seed``, else the recipe's, else 0).
        out_dtype: output dtype of float tensors (``out_dtype``, else ``dtype``; None: the
            base's dtype per tensor).
        name_filter: tensors outside it keep the base's values.
        num_layers: decoder layers, for gradient parameters.
        vocab: the vocabulary policy when inputs' vocabularies differ (None: refuse).
    """

    method: MergeMethod
    recipe: Recipe
    base: Source
    models: tuple[Source, ...]
    entries: tuple[ModelEntry, ...]
    seed: int
    out_dtype: np.dtype | None
    name_filter: NameFilter | None
    num_layers: int
    vocab: str | None = None

    def _value(
        self, spec: ParamSpec, settings: list[tuple[Mapping[str, Any], str]], tensor: str
    ) -> Any:
        t = layer_position(tensor, self.num_layers)
        for scope, where in settings:
            if spec.name in scope:
                v = evaluate(spec, scope[spec.name], tensor, t, f"{where}.{spec.name}")
                if v is not None:
                    return v
        return spec.default

    def values(self, tensor: str) -> TensorParams:
        """Every parameter's value for one tensor (filters and gradients applied).

        Raises:
            StreamvecError: a required parameter has no value for this tensor.
        """
        top = (self.recipe.parameters, "parameters")
        glob = {}
        for spec in self.method.params:
            if spec.scope == "global":
                glob[spec.name] = self._value(spec, [top], tensor)
        per = []
        for entry in self.entries:
            vals = {}
            for spec in self.method.params:
                if spec.scope != "model":
                    continue
                own = (entry.parameters, f"{entry.where}.parameters")
                v = self._value(spec, [own, top], tensor)
                if spec.required and v is spec.default:
                    raise StreamvecError(
                        f"{self.recipe.source}: {entry.where} ({entry.path}): no value of the "
                        f"required parameter '{spec.name}' of {self.method.name} applies to "
                        f"tensor {tensor}; set it in the model's parameters or in the global "
                        "parameters"
                    )
                vals[spec.name] = v
            per.append(vals)
        return TensorParams(glob, tuple(per))

    def uniform(self) -> bool:
        """True when every setting is one plain value (no filters, no gradients)."""
        scopes = [self.recipe.parameters, *(e.parameters for e in self.entries)]
        return all(is_uniform(v) for s in scopes for v in s.values())

    def describe(self) -> str:
        """``ties(base; a, b, c)`` with the paths as written."""
        models = ", ".join(e.path for e in self.entries)
        seed = f", seed {self.seed}" if self.method.randomized else ""
        return f"{self.method.name}({self.base.label}; {models}{seed})"
