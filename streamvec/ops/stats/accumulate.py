"""The sums ``stats`` keeps per tensor, and how block results add up.

Every figure ``stats`` reports per tensor is a sum (or a maximum) over elements, so each row
block of a tensor contributes a few small arrays (:class:`BlockSums`, computed by
:mod:`streamvec.ops.stats.fused`) and blocks are added in a tree
(:mod:`streamvec.ops.stats.runner`).
With ``t_i`` the float32 task vector ``i`` (upcast before subtracting, as ``diff`` computes
it) and every product in float64:

* ``gram[i, j] = sum t_i t_j``: norms, cosines (the Gram matrix, float64);
* ``absgram[i, j] = sum |t_i| |t_j|``: with the Gram matrix, the magnitude-weighted sign
  agreement ``(absgram + gram) / (2 absgram)``: the share of ``sum |t_i t_j|`` on entries
  whose signs agree (1: no conflict; 0.5: signs independent of each other);
* ``base_sq = sum b^2`` (relative sizes), ``maxabs[i]``, ``zeros[i]`` (exact zeros);
* ``top_both[i, j]``: entries in the top sets of both ``t_i`` and ``t_j`` (the diagonal: the
  sizes of the top sets), given each vector's magnitude threshold;
* in the exact top-k mode's first pass, ``hist[i]``: a histogram of the top 15 bits of
  ``|t_i|`` (:mod:`streamvec.ops.merge.select`'s pass 1), from which the threshold of the top
  ``density`` share is known to within one bin (relative width 2^-7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BlockSums:
    """Sums over some blocks of one tensor; adds like an array (``copy``, ``+=``).

    Blocks are reduced with ``copy()`` and ``+=``: sums add and maxima take the larger, so a
    tree of any shape gives the same figures (sums up to float64 rounding).
    """

    gram: np.ndarray  # (N, N) float64
    absgram: np.ndarray  # (N, N) float64
    maxabs: np.ndarray  # (N,) float64
    zeros: np.ndarray  # (N,) int64
    base_sq: float = 0.0
    hist: np.ndarray | None = None  # (N, HI_BINS) int64
    top_both: np.ndarray | None = None  # (N, N) int64

    def copy(self) -> BlockSums:
        return BlockSums(
            self.gram.copy(),
            self.absgram.copy(),
            self.maxabs.copy(),
            self.zeros.copy(),
            self.base_sq,
            None if self.hist is None else self.hist.copy(),
            None if self.top_both is None else self.top_both.copy(),
        )

    def __iadd__(self, other: BlockSums) -> BlockSums:
        self.gram += other.gram
        self.absgram += other.absgram
        np.maximum(self.maxabs, other.maxabs, out=self.maxabs)
        self.zeros += other.zeros
        self.base_sq += other.base_sq
        if self.hist is not None and other.hist is not None:
            self.hist += other.hist
        if self.top_both is not None and other.top_both is not None:
            self.top_both += other.top_both
        return self


@dataclass(frozen=True)
class TensorMoments:
    """The figures of one tensor (the finished, small form of BlockSums).

    Attributes:
        gram: ``(N, N)`` Gram matrix (float64).
        absgram: ``(N, N)`` sums of ``|t_i t_j|``.
        maxabs: ``(N,)`` max ``|t_i|``.
        zeros: ``(N,)`` exact zeros.
        base_sq: ``||base||^2`` (0 without a base).
        thresholds: ``(N,)`` uint32: the float32 bits of each vector's top-set threshold on
            ``|t|`` (empty without a density).
        top_both: ``(N, N)`` entries in both top sets (empty before they are counted).
    """

    gram: np.ndarray
    absgram: np.ndarray
    maxabs: np.ndarray
    zeros: np.ndarray
    base_sq: float
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    top_both: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))


@dataclass(frozen=True)
class FinishMoments:
    """Runs inside the graph: the small per-tensor result of the summed blocks.

    With a histogram (the exact top-k mode's first pass), each vector's threshold is the
    lower edge of the bin holding its ``ceil(density * numel)``-th largest magnitude.
    Otherwise the thresholds the blocks were counted with are kept.
    """

    numel: int
    density: float

    def __call__(self, sums: BlockSums, thresholds: np.ndarray | None = None) -> TensorMoments:
        n = sums.gram.shape[0]
        thr = np.zeros(0, np.uint32) if thresholds is None else np.asarray(thresholds, np.uint32)
        if sums.hist is not None:
            want = max(1, math.ceil(self.density * self.numel))
            thr = np.zeros(n, np.uint32)
            for i in range(n):
                above = np.cumsum(sums.hist[i][::-1])[::-1]  # elements in bins >= h
                # the highest bin whose tail holds at least `want` elements
                h = int(np.flatnonzero(above >= want)[-1]) if above[0] >= want else 0
                thr[i] = h << 16
        both = sums.top_both if sums.top_both is not None else np.zeros((0, 0), np.int64)
        return TensorMoments(
            sums.gram, sums.absgram, sums.maxabs, sums.zeros, sums.base_sq, thr, both
        )
