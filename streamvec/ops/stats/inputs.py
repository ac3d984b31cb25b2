"""The task vectors to describe, opened like ``combine``'s terms and lined up tensor by tensor.

Each TERM becomes a lazy task vector through :func:`streamvec.ops.combine.term_vector` (a store
as it is, a checkpoint minus ``--base``). For every tensor the vectors share, the readers of
all of them are collected once (the base a checkpoint term subtracts is read once, not once per
term) and each task vector is a row of coefficients over those readers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamvec.errors import MismatchError, StreamvecError
from streamvec.io.blocks import BlockReader
from streamvec.model.algebra import Model
from streamvec.model.sources import open as open_model
from streamvec.model.tensor import LazyTensor
from streamvec.ops.combine import term_vector


@dataclass(frozen=True)
class TensorTerms:
    """One tensor of every task vector, as a weighted sum of distinct readers.

    Attributes:
        name: the tensor name.
        shape: its shape.
        readers: the distinct readers of every term (and of the base, when given).
        coefs: ``(N, len(readers))``: task vector ``i`` is ``sum_r coefs[i, r] * readers[r]``.
        base: index of the base's reader in ``readers``, or -1 without a base.
        vectors: each task vector's lazy tensor (for the spectrum).
    """

    name: str
    shape: tuple[int, ...]
    readers: tuple[BlockReader, ...]
    coefs: tuple[tuple[float, ...], ...]
    base: int
    vectors: tuple[LazyTensor, ...]

    @property
    def numel(self) -> int:
        """Elements of the tensor."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class StatsInputs:
    """What ``stats`` reads: the names of the task vectors and their tensors in order."""

    names: tuple[str, ...]
    tensors: tuple[TensorTerms, ...]
    base: str | None
    skipped_nonfloat: tuple[str, ...]


def term_label(path: str | os.PathLike[str]) -> str:
    """A short name for a term in tables and plots: its last path component, without
    ``.zarr``/``.safetensors``."""
    p = Path(str(path).rstrip("/"))
    name = p.name or str(path)
    for suffix in (".zarr", ".safetensors"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def open_inputs(
    terms: list[str],
    *,
    base: str | os.PathLike[str] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    labels: list[str] | None = None,
    vocab: str | None = None,
) -> StatsInputs:
    """Open every term as a task vector and line up the tensors they share.

    Args:
        terms: stores or fine-tuned checkpoints (checkpoints need ``base``).
        base: the base checkpoint: forms checkpoint terms' task vectors and gives the
            relative sizes ``||tau|| / ||base||``.
        include: only tensors matching these patterns.
        exclude: leave out tensors matching these.
        labels: names of the terms in outputs (default: their last path components, made
            unique).
        vocab: ``base`` or ``common`` for fine-tunes with a resized vocabulary (``union`` is
            refused: the task vectors would differ in shape).

    Returns:
        The lined-up inputs.

    Raises:
        StreamvecError: no terms, a checkpoint without ``base``, tensors missing in some terms
            or with different shapes (all listed).
    """
    if not terms:
        raise StreamvecError(
            "stats needs at least one TERM (a task-vector store, or a "
            "fine-tuned checkpoint with --base BASE)"
        )
    if vocab == "union":
        raise StreamvecError(
            "stats compares task vectors row by row, so --vocab union (added rows kept) "
            "cannot line them up; use --vocab base (the base's rows) or --vocab common"
        )
    base_model = open_model(base) if base is not None else None
    vectors: list[Model] = [term_vector(str(t), base_model, base) for t in terms]
    resolved = [v.filter(include, exclude).with_vocab(vocab).resolved() for v in vectors]
    names = _labels(terms, labels)
    base_tensors = base_model.resolved().tensors if base_model is not None else {}
    skipped = sorted({n for r in resolved for n in r.skipped_nonfloat})
    common = [n for n in resolved[0].tensors if all(n in r.tensors for r in resolved[1:])]
    problems = []
    every = {n for r in resolved for n in r.tensors}
    for n in sorted(every - set(common)):
        lacking = [names[i] for i, r in enumerate(resolved) if n not in r.tensors]
        problems.append(f"{n} (missing in {', '.join(lacking)})")
    out: list[TensorTerms] = []
    for n in common:
        lazy = tuple(r.tensors[n] for r in resolved)
        shapes = {t.shape for t in lazy}
        base_t = base_tensors.get(n)
        if base_t is not None:
            shapes.add(base_t.shape)
        if len(shapes) > 1:
            detail = ", ".join(f"{names[i]}: {list(t.shape)}" for i, t in enumerate(lazy))
            if base_t is not None:
                detail += f", base: {list(base_t.shape)}"
            problems.append(f"{n} shapes differ ({detail})")
            continue
        out.append(_line_up(n, lazy, base_t))
    if problems:
        shown = "; ".join(problems[:6])
        more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise MismatchError(
            f"task vectors do not match: {shown}{more} (select the tensors they share with "
            "--include/--exclude)"
        )
    if not out:
        raise StreamvecError("no floating-point tensors selected; check --include/--exclude")
    return StatsInputs(
        tuple(names), tuple(out), str(base) if base is not None else None, tuple(skipped)
    )


def _labels(terms: list[str], labels: list[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(terms):
            raise StreamvecError(f"{len(labels)} labels for {len(terms)} terms")
        return list(labels)
    out: list[str] = []
    for t in terms:
        label = term_label(t)
        while label in out:
            label = f"{label}'"
        out.append(label)
    return out


def _line_up(name: str, lazy: tuple[LazyTensor, ...], base_t: LazyTensor | None) -> TensorTerms:
    index: dict[BlockReader, int] = {}
    for t in lazy:
        for _, r in t.terms:
            index.setdefault(r, len(index))
    base = -1
    if base_t is not None:
        base_reader = base_t.terms[0][1]
        base = index.setdefault(base_reader, len(index))
    coefs = np.zeros((len(lazy), len(index)))
    for i, t in enumerate(lazy):
        for c, r in t.terms:
            coefs[i, index[r]] += c
    return TensorTerms(
        name,
        lazy[0].shape,
        tuple(index),
        tuple(tuple(float(c) for c in row) for row in coefs),
        base,
        lazy,
    )
