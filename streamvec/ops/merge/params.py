"""Merge parameters: their specs, and how a recipe's settings resolve for one tensor.

A recipe gives each parameter as mergekit does:

* a scalar: ``density: 0.5``;
* a *gradient*, a list of numbers interpolated over the decoder layers (``[0.2, 0.5, 0.8]``:
  0.2 at the first layer, 0.8 at the last, linear in between; tensors outside the layers, such
  as embeddings and the final norm, take the first value, as mergekit does);
* conditional values, a list of ``{filter: TEXT, value: V}`` entries tried in order: the first
  entry whose ``filter`` occurs *as a substring* in the tensor name (mergekit's rule; ``*`` or
  a missing filter matches every name) gives the value, itself a scalar or a gradient.

When nothing matches in a model's own ``parameters`` the global ``parameters`` are tried, then
the method's default; a required parameter with no value is an error naming model and tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from streamvec.errors import StreamvecError

Scope = Literal["model", "global"]


class _Required:
    """Sentinel default of a parameter that has none."""

    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a merge method takes.

    Attributes:
        name: the recipe key (mergekit's name where mergekit has the parameter).
        type: ``float``, ``int`` or ``bool``.
        default: the value when the recipe gives none, or :data:`REQUIRED`.
        scope: ``model`` (one value per fine-tuned model, settable globally as a default) or
            ``global`` (one value for the merge).
        doc: one line for ``streamvec merge --list`` and the docs.
    """

    name: str
    type: type
    default: Any
    scope: Scope
    doc: str

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any, where: str) -> Any:
        """Check and convert one scalar value (YAML gives numbers, bools and strings).

        Raises:
            StreamvecError: the value has the wrong type (naming ``where``).
        """
        bad = StreamvecError(f"{where}: {self.name} must be {_type_word(self.type)}, got {value!r}")
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise bad
        if isinstance(value, bool):
            raise bad
        if self.type is int:
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; mergekit's pydantic accepts it.
            try:
                out = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(out):
            raise StreamvecError(f"{where}: {self.name} must be finite, got {value!r}")
        return out


def _type_word(t: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number"}[t]


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def check_setting(spec: ParamSpec, setting: Any, where: str) -> None:
    """Validate a setting's shape and every scalar in it, before any tensor is seen.

    Raises:
        StreamvecError: an unknown form, an unknown key in a conditional entry, or a value of
            the wrong type.
    """
    if _is_scalar(setting):
        spec.coerce(setting, where)
        return
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list) or not setting:
        raise StreamvecError(
            f"{where}: {spec.name} must be a value, a list of values (a gradient) or a list "
            f"of {{filter, value}} entries, got {setting!r}"
        )
    if all(_is_scalar(e) for e in setting):
        for e in setting:
            spec.coerce(e, where)
        return
    for i, entry in enumerate(setting):
        at = f"{where}[{i}]"
        if not isinstance(entry, Mapping):
            raise StreamvecError(
                f"{at}: mix of plain values and {{filter, value}} entries in {spec.name}; "
                "use one form"
            )
        unknown = set(entry) - {"filter", "value"}
        if unknown:
            raise StreamvecError(
                f"{at}: unsupported field(s) {', '.join(sorted(map(str, unknown)))} in a "
                f"conditional value of {spec.name} (only filter and value)"
            )
        if "value" not in entry:
            raise StreamvecError(f"{at}: conditional value of {spec.name} has no 'value'")
        flt = entry.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise StreamvecError(f"{at}: filter must be text, got {flt!r}")
        value = entry["value"]
        if isinstance(value, list):
            if not value or not all(_is_scalar(v) for v in value):
                raise StreamvecError(f"{at}: value must be a scalar or a list of scalars")
            for v in value:
                spec.coerce(v, at)
        else:
            if not _is_scalar(value):
                raise StreamvecError(f"{at}: value must be a scalar or a list of scalars")
            spec.coerce(value, at)


def is_uniform(setting: Any) -> bool:
    """True when the setting is one plain value (the same for every tensor)."""
    return _is_scalar(setting)


def evaluate(spec: ParamSpec, setting: Any, tensor_name: str, t: float, where: str) -> Any:
    """The value of a setting for one tensor, or None when no conditional entry matches.

    Args:
        spec: the parameter.
        setting: the raw recipe value (already checked by :func:`check_setting`).
        tensor_name: the tensor being planned.
        t: its position in the layer stack, 0..1, for gradients.
        where: recipe location, for messages.
    """
    if _is_scalar(setting):
        return spec.coerce(setting, where)
    if isinstance(setting, Mapping):
        setting = [setting]
    if all(_is_scalar(e) for e in setting):
        return _gradient(spec, setting, t, where)
    for entry in setting:
        flt = entry.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            value = entry["value"]
            if isinstance(value, list):
                return _gradient(spec, value, t, where)
            return spec.coerce(value, where)
    return None


def _gradient(spec: ParamSpec, values: Sequence[Any], t: float, where: str) -> Any:
    vals = [spec.coerce(v, where) for v in values]
    if spec.type is bool:
        return vals[int(t * (len(vals) - 1))]
    scaled = t * (len(vals) - 1)
    i0 = int(scaled)
    i1 = min(len(vals) - 1, i0 + 1)
    frac = scaled - i0
    out = (1 - frac) * vals[i0] + frac * vals[i1]
    return spec.coerce(round(out) if spec.type is int else out, where)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.7.mlp...`` -> 7), if any."""
    m = _LAYER.search(tensor_name)
    return int(m.group(1)) if m else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """``t`` of a tensor for gradients: ``layer / (L - 1)`` (mergekit's rule); 0 outside layers.

    Example:
        >>> layer_position("model.layers.3.mlp.up_proj.weight", 4), layer_position("lm_head", 4)
        (1.0, 0.0)
    """
    idx = layer_index(tensor_name)
    if idx is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, idx / (num_layers - 1))
