"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

``theta = theta_base + lambda * sum_i w_i tau_i``: negation (``w = -1``) forgets a task,
addition builds multi-task models, and the analogy ``tau_C + (tau_B - tau_A)`` transfers a
relation. A term is a task-vector store, a PEFT LoRA adapter folder (its ``scaling * B @ A``
per target, see :mod:`streamvec.model.peft_source`) or a fine-tuned checkpoint whose task vector
relative to the base is formed on the fly (``ft - base``), never stored.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from streamvec.errors import StreamvecError
from streamvec.model.algebra import Model
from streamvec.model.nonfloat import IntPolicy
from streamvec.model.sources import open as open_model


@dataclass(frozen=True)
class TermSpec:
    """``PATH[:WEIGHT]`` from the command line."""

    path: str
    weight: float = 1.0


def parse_term(text: str) -> TermSpec:
    """Parse ``PATH`` or ``PATH:WEIGHT`` (a path that itself contains ``:`` still works).

    Example:
        >>> parse_term("tox.zarr:-1")
        TermSpec(path='tox.zarr', weight=-1.0)
    """
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            w = float(weight)
        except ValueError:
            pass
        else:
            if not math.isfinite(w):
                raise StreamvecError(f"term {text!r}: weight must be a finite number")
            return TermSpec(path, w)
    return TermSpec(text)


def term_vector(
    path: str,
    base_model: Model | None,
    base: str | os.PathLike[str] | None = None,
    *,
    strict: bool = False,
) -> Model:
    """The task vector a TERM stands for: a store as it is, a checkpoint minus the base.

    Every command taking TERMs (``combine``, ``stats``) opens them here, so a new kind of
    term is accepted everywhere at once.

    Args:
        path: the term's path.
        base_model: the opened base (required for checkpoint terms).
        base: the base's path as given (to refuse the base itself as a term; a LoRA adapter
            term maps its module names through it).
        strict: a LoRA adapter term recorded with another local base is an error.

    Returns:
        The lazy task vector.

    Raises:
        StreamvecError: a checkpoint term without a base, or the base itself.
    """
    src = open_model(path, base=base, strict=strict)
    if not src.source.is_point:
        return src  # a store, or a LoRA adapter (a sparse task vector)
    if base_model is None:
        raise StreamvecError(
            f"term {path}: is a checkpoint; pass --base BASE so its task vector "
            "can be formed, or give a task-vector store made by `streamvec diff`"
        )
    if base is not None and Path(path).resolve() == Path(str(base)).resolve():
        raise StreamvecError(f"term {path}: is the base itself (its task vector is 0)")
    return src - base_model


def combine_terms(
    terms: list[TermSpec],
    *,
    base: str | os.PathLike[str] | None = None,
    scale: float = 1.0,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    dtype: str | None = None,
    keep_base_when_missing: bool = False,
    strict: bool = False,
    int_tensors: IntPolicy = "error",
    vocab: str | None = None,
) -> Model:
    """Build ``base + scale * sum(w_i tau_i)`` (or ``scale * sum(w_i tau_i)`` without a base).

    Args:
        terms: task-vector stores or fine-tuned checkpoints, with weights.
        base: the base checkpoint; required for checkpoint terms; gives an edited model.
        scale: lambda.
        include: restrict the edit to these tensors (others keep the base value).
        exclude: leave these tensors unedited.
        dtype: output dtype (default: the base's per tensor; float32 for a task vector).
        keep_base_when_missing: where a term lacks a tensor, keep the base value.
        strict: a LoRA adapter term recorded with another local base is an error.
        int_tensors: where a fine-tune changed an int/bool tensor: ``error`` (default),
            ``base`` or ``finetune`` (see :mod:`streamvec.model.nonfloat`).
        vocab: ``base``, ``common`` or ``union`` when the vocabularies differ (see
            :mod:`streamvec.model.vocab`); None refuses a difference.

    Returns:
        The lazy result; ``.save(path)`` writes it.
    """
    if not terms:
        raise StreamvecError("combine needs at least one TERM")
    if not math.isfinite(scale):
        raise StreamvecError("--scale must be a finite number")
    base_model = open_model(base) if base is not None else None
    total: Model | None = None
    for spec in terms:
        tau = term_vector(spec.path, base_model, base, strict=strict)
        total = spec.weight * tau if total is None else total + spec.weight * tau
    assert total is not None
    edit = scale * total
    model = base_model + edit if base_model is not None else edit
    model = model.filter(include, exclude)
    if keep_base_when_missing:
        model = model.keep_base_when_missing()
    if int_tensors != "error":
        model = model.on_changed_nonfloat(int_tensors)
    if vocab is not None:
        model = model.with_vocab(vocab)
    return model.astype(dtype) if dtype else model
