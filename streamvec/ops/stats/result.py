"""The figures of a ``stats`` run: per-tensor sums, and every view derived from them.

Everything reported is computed from per-tensor sums (Gram matrices, sums of ``|t_i t_j|``,
``||base||^2``, counts) that add across tensors, so a layer's or a module kind's figure is the
figure of the concatenation of its tensors, not an average of per-tensor figures. Arrays are
plain numpy with their axis names alongside (``names`` for task vectors, ``labels`` for
groups): no dataframe library is a dependency.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamvec.ops.stats.grouping import KINDS
from streamvec.ops.stats.spectrum import Spectrum

PER = ("module", "layer", "tensor")


@dataclass(frozen=True)
class Figures:
    """Every figure of a set of groups (tensors, layers, module kinds, or all).

    Attributes:
        labels: ``(G,)`` group labels.
        names: ``(N,)`` task-vector names.
        numel: ``(G,)`` elements per group.
        tensors: ``(G,)`` tensors per group.
        gram: ``(G, N, N)`` Gram matrices ``sum t_i t_j`` (float64).
        absgram: ``(G, N, N)`` ``sum |t_i t_j|``.
        maxabs: ``(G, N)`` max ``|t_i|``.
        zeros: ``(G, N)`` exact zeros.
        base_sq: ``(G,)`` ``||base||^2`` (NaN without a base).
        top_both: ``(G, N, N)`` entries in both top sets (diagonal: the top set's size); NaN
            without a density.
    """

    labels: tuple[str, ...]
    names: tuple[str, ...]
    numel: np.ndarray
    tensors: np.ndarray
    gram: np.ndarray
    absgram: np.ndarray
    maxabs: np.ndarray
    zeros: np.ndarray
    base_sq: np.ndarray
    top_both: np.ndarray

    @property
    def norm(self) -> np.ndarray:
        """``(G, N)`` L2 norms ``||tau_i||``."""
        return np.sqrt(np.einsum("gii->gi", self.gram))

    @property
    def relative(self) -> np.ndarray:
        """``(G, N)`` ``||tau_i|| / ||base||`` (NaN without a base)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.norm / np.sqrt(self.base_sq)[:, None]

    @property
    def zero_fraction(self) -> np.ndarray:
        """``(G, N)`` share of entries exactly 0."""
        return self.zeros / np.maximum(self.numel, 1)[:, None]

    @property
    def cosine(self) -> np.ndarray:
        """``(G, N, N)`` cosine similarities (NaN where a vector is 0)."""
        n = self.norm
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.gram / (n[:, :, None] * n[:, None, :])

    @property
    def sign_agreement(self) -> np.ndarray:
        """``(G, N, N)`` sign agreement: ``sum_{agree} |t_i t_j| / sum |t_i t_j|``."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return (self.absgram + self.gram) / (2 * self.absgram)

    @property
    def top_overlap(self) -> np.ndarray:
        """``(G, N, N)`` ``|T_i & T_j| / sqrt(|T_i| |T_j|)`` of the top-density sets."""
        d = np.einsum("gii->gi", self.top_both)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.top_both / np.sqrt(d[:, :, None] * d[:, None, :])

    @property
    def top_density(self) -> np.ndarray:
        """``(G, N)`` the share of entries in each top set (the requested density within the
        threshold's sampling error; at or above it with ``exact_topk``)."""
        return np.einsum("gii->gi", self.top_both) / np.maximum(self.numel, 1)[:, None]

    def select(self, label: str) -> int:
        """Index of a group label."""
        return self.labels.index(label)

    def group(self, keys: Sequence[Any], order: Sequence[Any] | None = None) -> Figures:
        """Sum groups sharing a key (``keys[g]``; None: left out) into new groups.

        Args:
            keys: per current group, the new group's key.
            order: the new groups' order (default: first appearance).

        Returns:
            The regrouped figures, labelled ``str(key)``.
        """
        uniq = list(order) if order is not None else list(dict.fromkeys(k for k in keys))
        uniq = [k for k in uniq if k is not None and k in set(keys)]
        idx = [[g for g, k in enumerate(keys) if k == u] for u in uniq]

        def add(a: np.ndarray) -> np.ndarray:
            return np.stack([a[i].sum(axis=0) for i in idx]) if idx else a[:0]

        return Figures(
            tuple(str(u) for u in uniq),
            self.names,
            add(self.numel),
            add(self.tensors),
            add(self.gram),
            add(self.absgram),
            np.stack([self.maxabs[i].max(axis=0) for i in idx]) if idx else self.maxabs[:0],
            add(self.zeros),
            add(self.base_sq),
            add(self.top_both),
        )

    def rows(self) -> list[dict[str, Any]]:
        """Every figure per group, as JSON-ready dicts (NaN becomes None)."""
        out = []
        for g, label in enumerate(self.labels):
            out.append(
                {
                    "label": label,
                    "tensors": int(self.tensors[g]),
                    "numel": int(self.numel[g]),
                    "norm": _clean(self.norm[g]),
                    "relative_norm": _clean(self.relative[g]),
                    "max_abs": _clean(self.maxabs[g]),
                    "zero_fraction": _clean(self.zero_fraction[g]),
                    "cosine": _clean(self.cosine[g]),
                    "sign_agreement": _clean(self.sign_agreement[g]),
                    "top_overlap": _clean(self.top_overlap[g]),
                    "top_density": _clean(self.top_density[g]),
                    "gram": _clean(self.gram[g]),
                }
            )
        return out


def _clean(a: np.ndarray) -> Any:
    if np.ndim(a) == 0:
        v = float(a)
        return v if math.isfinite(v) else None
    return [_clean(x) for x in a]


@dataclass(frozen=True)
class RankRow:
    """The LoRA rank a module kind needs at a residual energy, per task vector."""

    kind: str
    matrices: int
    worst: list[int | None]  # max over the kind's matrices; None: above K somewhere
    median: list[float | None]
    above: list[int]  # matrices whose spectrum stops before the residual is reached
    known_to: list[int]  # the smallest K among the kind's spectra


@dataclass(frozen=True)
class Stats:
    """What :func:`streamvec.ops.stats` found: per-tensor figures and the views derived from them.

    Attributes:
        names: the task vectors' names (axis ``N``).
        per_tensor: :class:`Figures` with one group per tensor.
        kinds: per tensor, its module kind.
        layers: per tensor, its layer index (None outside numbered blocks).
        base: the base checkpoint, if one was given.
        density: the top-set density of ``top_overlap`` (0: not computed).
        spectra: per matrix, each vector's :class:`Spectrum` (None when not available).
        subspace: per matrix, ``(N, N)`` subspace overlaps ``||U_i^T U_j||_F^2 / K``.
        residual: the residual energy share the LoRA ranks are given for.
        skipped_nonfloat: non-float tensors left out.

    Example:
        >>> st = sv.stats(["math.zarr", "code.zarr"])  # doctest: +SKIP
        >>> st.overall.cosine[0]  # doctest: +SKIP
        array([[1.   , 0.013], [0.013, 1.   ]])
        >>> st.plot("stats-png")  # doctest: +SKIP
    """

    names: tuple[str, ...]
    per_tensor: Figures
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    base: str | None = None
    density: float = 0.0
    spectra: dict[str, list[Spectrum | None]] = field(default_factory=dict)
    subspace: dict[str, np.ndarray] = field(default_factory=dict)
    residual: float = 0.01
    skipped_nonfloat: tuple[str, ...] = ()

    @property
    def overall(self) -> Figures:
        """One group: every selected tensor."""
        return self.per_tensor.group(["all"] * len(self.kinds))

    @property
    def per_module(self) -> Figures:
        """One group per module kind (see :data:`streamvec.ops.stats.grouping.KINDS`)."""
        return self.per_tensor.group(list(self.kinds), order=KINDS)

    @property
    def per_layer(self) -> Figures:
        """One group per layer index (tensors outside numbered blocks left out)."""
        keys = list(self.layers)
        order = sorted({k for k in keys if k is not None})
        return self.per_tensor.group(keys, order=order)

    def per(self, what: str) -> Figures:
        """``module``, ``layer`` or ``tensor`` figures."""
        return {"module": self.per_module, "layer": self.per_layer}.get(what, self.per_tensor)

    def lora_ranks(self, residual: float | None = None) -> list[RankRow]:
        """Per module kind, the rank a LoRA needs so each matrix keeps ``1 - residual`` energy.

        Args:
            residual: residual energy share (default: the run's, 1%).

        Returns:
            One row per module kind with spectra.
        """
        e = self.residual if residual is None else residual
        n = len(self.names)
        by_kind: dict[str, list[list[Spectrum | None]]] = {}
        kind_of = dict(zip(self.per_tensor.labels, self.kinds, strict=True))
        for name, specs in self.spectra.items():
            by_kind.setdefault(kind_of[name], []).append(specs)
        rows = []
        for kind in KINDS:
            if kind not in by_kind:
                continue
            worst: list[int | None] = []
            median: list[float | None] = []
            above: list[int] = []
            known: list[int] = []
            for i in range(n):
                specs = [s[i] for s in by_kind[kind] if s[i] is not None]
                if not specs:
                    worst.append(None)
                    median.append(None)
                    above.append(0)
                    known.append(0)
                    continue
                ranks = [sp.rank_for(e) for sp in specs if sp is not None]
                found = [r for r in ranks if r is not None]
                above.append(len(ranks) - len(found))
                known.append(min(int(sp.s.size) for sp in specs if sp is not None))
                worst.append(max(found) if found and len(found) == len(ranks) else None)
                median.append(float(np.median(found)) if found else None)
            rows.append(RankRow(kind, len(by_kind[kind]), worst, median, above, known))
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Every figure as JSON-ready data (what ``stats.json`` holds)."""
        spectrum = {}
        for name, specs in self.spectra.items():
            spectrum[name] = {
                "singular_values": [None if s is None else s.s.tolist() for s in specs],
                "energy": [None if s is None else s.energy for s in specs],
                "source": [None if s is None else s.source for s in specs],
                "rank_at_residual": [
                    None if s is None else s.rank_for(self.residual) for s in specs
                ],
                "stable_rank": [None if s is None else s.stable_rank() for s in specs],
                "entropy_rank": [None if s is None else s.entropy_rank() for s in specs],
                "subspace_overlap": _clean(self.subspace[name]),
            }
        return {
            "streamvec_stats": 1,
            "names": list(self.names),
            "base": self.base,
            "density": self.density,
            "residual": self.residual,
            "definitions": DEFINITIONS,
            "overall": self.overall.rows()[0],
            "per_module": self.per_module.rows(),
            "per_layer": self.per_layer.rows(),
            "per_tensor": [
                dict(row, kind=k, layer=layer)
                for row, k, layer in zip(
                    self.per_tensor.rows(), self.kinds, self.layers, strict=True
                )
            ],
            "spectrum": spectrum,
            "lora_rank": [vars(r) for r in self.lora_ranks()],
            "skipped_nonfloat": list(self.skipped_nonfloat),
        }

    def plot(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write the PNG plots into ``directory`` (created); returns their paths."""
        from streamvec.ops.stats.plots import plot_all

        return plot_all(self, Path(directory))


DEFINITIONS = {
    "norm": "||tau_i||_2 over the group's entries",
    "relative_norm": "||tau_i|| / ||base|| (null without --base)",
    "max_abs": "max |tau_i|",
    "zero_fraction": "share of entries of tau_i exactly 0",
    "cosine": "<tau_i, tau_j> / (||tau_i|| ||tau_j||), Gram matrix accumulated in float64",
    "sign_agreement": "sum over entries with sign(tau_i) == sign(tau_j) of |tau_i tau_j|, "
    "over sum |tau_i tau_j| (1: no conflicts; 0.5: unrelated signs)",
    "top_overlap": "|T_i & T_j| / sqrt(|T_i| |T_j|), T_i the non-zero entries of tau_i with "
    "|tau_i| >= a per-tensor threshold: the density-quantile of a sample of the tensor (of the "
    "whole tensor when small; with --exact-topk the lower edge of its 2^-7 magnitude bin)",
    "top_density": "|T_i| / entries: the density actually kept (counted exactly)",
    "gram": "sum tau_i tau_j (float64)",
    "rank_at_residual": "smallest r with 1 - sum_{k<=r} s_k^2 / ||tau||_F^2 <= residual "
    "(null: above the K singular values known)",
    "subspace_overlap": "||U_i^T U_j||_F^2 / K, top-K left singular vectors",
    "stable_rank": "||tau||_F^2 / s_1^2",
    "entropy_rank": "exp(entropy of s_k / sum s) over the top K",
}
