"""Tied weights: tensors a checkpoint need not store because the model shares them.

A causal LM with ``tie_word_embeddings`` uses its input embedding as its output head, and
``save_pretrained`` then stores only one of the two (``model.embed_tokens.weight``, not
``lm_head.weight``); T5 shares ``shared.weight`` with ``encoder.embed_tokens``,
``decoder.embed_tokens`` and, when tied, ``lm_head``. Two checkpoints of the same model may
therefore store different members of a tied group. A member missing from a checkpoint *is*
the member it stores, so the edit of a tied model is a tied edit whichever checkpoint stores
the head.

Which keys are tied is read from transformers itself: the model class named by
``config.json``'s ``architectures`` is built on the meta device (no memory, no weights) and
asked for ``get_expanded_tied_weights_keys``, which already applies the config's
``tie_word_embeddings``. Where transformers cannot say (no config, an unknown class), a short
table of the common layouts is used, still only when the config ties word embeddings.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Used only when transformers cannot build the model class: (tied key, key it is tied to).
FALLBACK_PAIRS = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("lm_head.weight", "shared.weight"),
    ("encoder.embed_tokens.weight", "shared.weight"),
    ("decoder.embed_tokens.weight", "shared.weight"),
    ("lm_head.weight", "model.language_model.embed_tokens.weight"),
)


def read_config(root: Path) -> dict[str, Any] | None:
    """``root/config.json`` as a dict, or None when absent or unreadable."""
    try:
        doc = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def ties_word_embeddings(config: Mapping[str, Any]) -> bool:
    """Whether a config ties word embeddings (top level or its ``text_config``).

    A config that does not say is taken as untied (transformers 5 has no global default; each
    model's config class has its own, which the transformers path below applies).
    """
    for c in (config, config.get("text_config")):
        if isinstance(c, Mapping) and c.get("tie_word_embeddings") is not None:
            return bool(c["tie_word_embeddings"])
    return False


def _groups(pairs: Iterable[tuple[str, str]]) -> list[frozenset[str]]:
    """Connected groups of names from (a, b) pairs (a small union-find)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    out: dict[str, set[str]] = {}
    for x in list(parent):
        out.setdefault(find(x), set()).add(x)
    return [frozenset(g) for g in out.values() if len(g) > 1]


def _transformers_pairs(root: Path, config: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    """Tied (target, source) keys as transformers computes them, or None if it cannot."""
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        return None
    try:
        import torch
        import transformers

        cls = getattr(transformers, archs[0], None)
        if cls is None or not hasattr(cls, "get_expanded_tied_weights_keys"):
            return None
        cfg = transformers.AutoConfig.from_pretrained(str(root))
        with torch.device("meta"):
            model = cls(cfg)
        mapping = model.get_expanded_tied_weights_keys(all_submodels=True)
    except Exception:  # any failure means "transformers cannot say": use the table
        return None
    return [(str(k), str(v)) for k, v in mapping.items()]


class TieRules:
    """The tied groups of one checkpoint, worked out on first use (it may import transformers).

    Args:
        root: the checkpoint directory (where ``config.json`` is).
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._groups: list[frozenset[str]] | None = None
        self._lock = threading.Lock()

    def groups(self) -> list[frozenset[str]]:
        """Sets of tensor names that are one tensor in the loaded model."""
        with self._lock:
            if self._groups is None:
                self._groups = self._compute()
            return self._groups

    def _compute(self) -> list[frozenset[str]]:
        config = read_config(self.root) if self.root is not None else None
        if config is None:
            return []
        assert self.root is not None
        pairs = _transformers_pairs(self.root, config)
        if pairs is not None:
            return _groups(pairs)
        return _groups(FALLBACK_PAIRS) if ties_word_embeddings(config) else []

    def partners(self, name: str) -> frozenset[str]:
        """The other names tied to ``name`` (empty when it is not tied)."""
        for g in self.groups():
            if name in g:
                return g - {name}
        return frozenset()

    def __repr__(self) -> str:
        return f"TieRules({self.root})"


def stored_partner(name: str, stored: Mapping[str, Any], rules: Iterable[TieRules]) -> str | None:
    """A name ``stored`` holds that is tied to ``name`` under any of ``rules``, or None.

    Args:
        name: a tensor name missing from ``stored``.
        stored: the tensors a checkpoint or store holds.
        rules: tie rules of the checkpoints involved (the architecture is the same for all).

    Returns:
        The stored tensor that ``name`` is, in the loaded model; None when it is not tied.
    """
    for r in rules:
        for other in sorted(r.partners(name)):
            if other in stored:
                return other
    return None


def tied_copies_equal(a: Any, b: Any, block_rows: int = 4096) -> bool:
    """Whether two stored tensors hold the same values (read in row blocks, never whole)."""
    if a.shape != b.shape:
        return False
    rows = a.shape[0] if a.shape else 1
    for r0 in range(0, rows, block_rows):
        r1 = min(rows, r0 + block_rows)
        x, y = a.reader.read(r0, r1), b.reader.read(r0, r1)
        if x.dtype != y.dtype:
            x, y = x.astype("float64"), y.astype("float64")
        if x.tobytes() != y.tobytes():
            return False
    return True


__all__ = ["TieRules", "read_config", "stored_partner", "tied_copies_equal", "ties_word_embeddings"]
