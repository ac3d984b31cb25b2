"""Vocabulary changes: combining checkpoints whose embedding and head have different row counts.

A chat fine-tune often adds tokens, so its ``embed_tokens`` and ``lm_head`` have more rows than
the base's. Rows are token ids: row ``i`` of every input is the same token when the fine-tunes
extended the base tokenizer by appending tokens, which is how ``add_tokens`` /
``resize_token_embeddings`` work. A policy says which rows the output has:

- ``base``: the base's rows. Rows a fine-tune added are dropped; an input with fewer rows is
  read as the base there (no change).
- ``common``: the rows every input has (the smallest vocabulary).
- ``union``: every row any input has. Where an input lacks a row it is read as the *donor*'s
  row, the donor being the first checkpoint (in the expression's order) that has it: the
  fine-tune that added the token. An added token's row therefore contributes no change from
  any other input and comes out exactly as that fine-tune trained it (whatever the weights).

A tensor is vocabulary-indexed when the inputs' shapes differ only in the first dimension and
each input's first dimension is the ``vocab_size`` of a checkpoint's ``config.json`` (top level
or ``text_config``): the config says what the rows are, not a table of names. The output's
``config.json`` gets the new ``vocab_size`` and the tokenizer files of the input whose
vocabulary the output has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from streamvec.io.blocks import BlockReader, matrix_shape
from streamvec.model.ties import read_config

if TYPE_CHECKING:
    from streamvec.model.algebra import Source, SourceTensor

VocabPolicy = Literal["base", "common", "union"]
VOCAB_POLICIES: tuple[str, ...] = ("base", "common", "union")
VOCAB_HINT = (
    "pass --vocab base (keep the base's rows), --vocab common (rows every input has) or "
    "--vocab union (keep added tokens' rows); see docs/checkpoints.md"
)


def config_vocab_size(source: Source) -> int | None:
    """``vocab_size`` from a checkpoint's ``config.json`` (or its ``text_config``)."""
    ties = getattr(source, "ties", None)
    root = getattr(ties, "root", None)
    config = read_config(root) if root is not None else None
    if config is None:
        return None
    for c in (config, config.get("text_config")):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


@dataclass(frozen=True)
class PaddedReader:
    """Rows of ``inner`` up to ``rows``: cut short, or extended with rows of ``fill``.

    Picklable and hashable like every reader; ``fill`` has at least ``rows`` rows.
    """

    inner: BlockReader
    rows: int
    fill: BlockReader | None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.inner.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        if self.fill is None or self.fill.dtype == self.inner.dtype:
            return self.inner.dtype
        return np.dtype(np.float32)  # exact for every float dtype streamvec reads

    def read(self, r0: int, r1: int) -> np.ndarray:
        if not 0 <= r0 <= r1 <= self.rows:
            # Rows past ``rows`` would otherwise read as more padding.
            raise IndexError(f"rows [{r0}, {r1}) outside 0..{self.rows}")
        have = self.inner.shape[0]
        parts = []
        if r0 < have:
            parts.append(self.inner.read(r0, min(r1, have)).astype(self.dtype, copy=False))
        if r1 > have:
            a = max(r0, have)
            if self.fill is None:
                _, cols = matrix_shape(self.shape)
                parts.append(np.zeros((r1 - a, cols), self.dtype))
            else:
                parts.append(self.fill.read(a, r1).astype(self.dtype, copy=False))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass(frozen=True)
class VocabChoice:
    """What a policy made of the vocabulary: the output's rows and whose tokenizer it has."""

    policy: str
    rows: int
    tokenizer_from: Source | None

    def config_updates(self) -> dict[str, Any]:
        """What the output's ``config.json`` must say."""
        return {"vocab_size": self.rows}

    def describe(self) -> dict[str, Any]:
        """For the output's attrs and model card."""
        donor = self.tokenizer_from.label if self.tokenizer_from is not None else None
        return {"policy": self.policy, "rows": self.rows, "tokenizer_from": donor}


class VocabMismatch(Exception):
    """Shapes differ in a way no vocabulary policy explains (an ordinary mismatch)."""


def align(
    name: str,
    parts: Sequence[tuple[float, SourceTensor, Source]],
    policy: str | None,
    reference: Source | None,
) -> tuple[list[tuple[float, SourceTensor]], VocabChoice] | None:
    """Bring the inputs of one vocabulary-indexed tensor to the rows a policy asks for.

    Args:
        name: the tensor.
        parts: (coefficient, tensor, its source) of every active term; shapes differ.
        policy: ``base``, ``common``, ``union``, or None (refuse).
        reference: the base checkpoint (``base`` keeps its rows; its rows are first).

    Returns:
        The parts with padded or cut readers and the choice made; None when the shapes do not
        differ like a vocabulary (then it is an ordinary mismatch).

    Raises:
        VocabMismatch: a vocabulary difference without a policy (the message names it).
    """
    shapes = [p.shape for _, p, _ in parts]
    if any(len(s) == 0 or s[1:] != shapes[0][1:] for s in shapes):
        return None
    sizes = {v for _, _, s in parts if s.is_point and (v := config_vocab_size(s)) is not None}
    if len(sizes) < 2 or any(s[0] not in sizes for s in shapes):
        return None
    if policy is None:
        raise VocabMismatch(
            f"{name}: vocabularies differ ("
            + ", ".join(f"{src.label}: {p.shape[0]} rows" for _, p, src in parts)
            + f"); {VOCAB_HINT}"
        )
    if policy not in VOCAB_POLICIES:
        raise VocabMismatch(f"--vocab must be one of {', '.join(VOCAB_POLICIES)}, got {policy!r}")
    by_source = {src: p for _, p, src in parts}
    if policy == "base":
        if reference is None or reference not in by_source:
            raise VocabMismatch(
                f"{name}: --vocab base needs a base checkpoint among the inputs; use --vocab "
                "common or union"
            )
        rows = by_source[reference].shape[0]
        donor: Source | None = reference
    elif policy == "common":
        rows = min(s[0] for s in shapes)
        donor = None
    else:
        rows = max(s[0] for s in shapes)
        donor = next(
            (src for _, p, src in parts if src.is_point and p.shape[0] == rows and rows > 0), None
        )
        if donor is None:
            raise VocabMismatch(
                f"{name}: --vocab union takes added tokens' rows from a checkpoint that has "
                f"them, and none of the inputs with {rows} rows is a checkpoint (a task-vector "
                "store holds changes, not values); pass the fine-tuned checkpoint itself"
            )
    fill = by_source[donor].reader if donor is not None else None
    out: list[tuple[float, SourceTensor]] = []
    for coef, p, _ in parts:
        if p.shape[0] == rows:
            out.append((coef, p))
            continue
        reader = PaddedReader(p.reader, rows, fill if p.shape[0] < rows else None)
        # The same tensor with new geometry; replace() keeps this module free of an import
        # of streamvec.model.algebra (which imports this one).
        padded = replace(p, shape=(rows, *p.shape[1:]), dtype=reader.dtype, reader=reader)
        out.append((coef, padded))
    tokenizer_from = next((src for _, p, src in parts if src.is_point and p.shape[0] == rows), None)
    if reference is not None and by_source.get(reference) is not None:
        if by_source[reference].shape[0] == rows:
            tokenizer_from = reference
    return out, VocabChoice(policy, rows, tokenizer_from)


__all__ = [
    "VOCAB_POLICIES",
    "PaddedReader",
    "VocabChoice",
    "VocabMismatch",
    "VocabPolicy",
    "align",
    "config_vocab_size",
]
