"""The one-pass block statistics of N task vectors, and the pass that counts top-k overlaps.

Every figure ``stats`` reports per tensor is a sum (or a maximum) over elements, so each row
block of a tensor contributes a few small arrays and blocks are added in a tree by
:func:`streamvec.merge.passes.run_pass`, the engine's block planning, scheduler and progress
under the memory budget. Per block, with ``t_i`` the float32 task vector ``i`` (upcast before
subtracting, as ``diff`` computes it) and every product in float64:

* ``gram[i, j] = sum t_i t_j``: norms, cosines (the Gram matrix, float64);
* ``absgram[i, j] = sum |t_i| |t_j|``: with the Gram matrix, the magnitude-weighted sign
  agreement ``(absgram + gram) / (2 absgram)``: the share of ``sum |t_i t_j|`` on entries
  whose signs agree (1: no conflict; 0.5: signs independent of each other);
* ``base_sq = sum b^2`` (relative sizes), ``maxabs[i]``, ``zeros[i]`` (exact zeros);
* with a top-k density, ``hist[i]``: a histogram of the top 15 bits of ``|t_i|``
  (:mod:`streamvec.merge.select`'s pass 1), from which the magnitude threshold of the top
  ``density`` fraction is known to within one bin (relative width 2^-7).

A second pass (:class:`OverlapStat`) counts, per pair, the entries in both top sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from streamvec.merge.select import HI_BINS

# Elements (over all N vectors) per slab of the products: float64 buffers stay in L2.
_CACHE_SLAB = 1 << 17
# Elements per slab of the overlap pass and per histogram batch (bincount's fixed cost of
# 32768 bins is amortised over this many).
_SLAB = 1 << 20


@dataclass
class BlockSums:
    """Sums over some blocks of one tensor; adds like an array (``copy``, ``+=``).

    ``run_pass`` reduces block results with ``copy()`` and ``+=``: sums add and maxima take
    the larger, so a tree of any shape gives the same figures (sums up to float64 rounding).
    """

    gram: np.ndarray  # (N, N) float64
    absgram: np.ndarray  # (N, N) float64
    maxabs: np.ndarray  # (N,) float64
    zeros: np.ndarray  # (N,) int64
    base_sq: float = 0.0
    hist: np.ndarray | None = None  # (N, HI_BINS) int64

    def copy(self) -> BlockSums:
        return BlockSums(
            self.gram.copy(),
            self.absgram.copy(),
            self.maxabs.copy(),
            self.zeros.copy(),
            self.base_sq,
            None if self.hist is None else self.hist.copy(),
        )

    def __iadd__(self, other: BlockSums) -> BlockSums:
        self.gram += other.gram
        self.absgram += other.absgram
        np.maximum(self.maxabs, other.maxabs, out=self.maxabs)
        self.zeros += other.zeros
        self.base_sq += other.base_sq
        if self.hist is not None and other.hist is not None:
            self.hist += other.hist
        return self


def task_vectors(
    blocks: Sequence[np.ndarray], coefs: tuple[tuple[float, ...], ...], s0: int, s1: int
) -> np.ndarray:
    """``(N, s1 - s0)`` float32: every task vector over flat elements ``[s0, s1)``.

    Each is ``sum_r c_r x_r`` in float32 over operands already upcast: ``ft - base`` is one
    correctly rounded subtraction, the float32 task vector ``diff`` stores.
    """
    out = np.empty((len(coefs), s1 - s0), np.float32)
    for i, row in enumerate(coefs):
        acc = out[i]
        first = True
        for c, x in zip(row, blocks, strict=True):
            if c == 0.0:
                continue
            flat = x.reshape(-1)[s0:s1]
            if first and c == 1.0:
                np.copyto(acc, flat)
            elif first:
                np.multiply(flat, np.float32(c), out=acc)
            elif c == -1.0:
                np.subtract(acc, flat, out=acc)
            elif c == 1.0:
                np.add(acc, flat, out=acc)
            else:
                acc += np.float32(c) * flat
            first = False
        if first:
            acc[:] = 0.0
    return out


def _slabs(n: int, vectors: int, elements: int = _SLAB) -> list[tuple[int, int]]:
    step = max(1, elements // max(vectors, 1))
    return [(s, min(n, s + step)) for s in range(0, n, step)] or [(0, 0)]


@dataclass(frozen=True)
class MomentStat:
    """The per-block statistic of the main pass (a :class:`~streamvec.merge.passes.BlockStat`).

    Work goes in cache-sized slabs into buffers allocated once per block: the float64 copy
    a slab's products need measured several times slower as a fresh allocation per slab.

    Attributes:
        coefs: per task vector, its coefficients over the tensor's readers.
        base: index of the base reader, or -1.
        histogram: also histogram the magnitudes (for top-k overlaps).
    """

    coefs: tuple[tuple[float, ...], ...]
    base: int
    histogram: bool

    def __call__(
        self, name: str, shape: tuple[int, ...], blocks: Sequence[np.ndarray], r0: int, r1: int
    ) -> BlockSums:
        n = len(self.coefs)
        out = BlockSums(
            np.zeros((n, n)),
            np.zeros((n, n)),
            np.zeros(n),
            np.zeros(n, np.int64),
            0.0,
            np.zeros((n, HI_BINS), np.int64) if self.histogram else None,
        )
        size = blocks[0].size
        step = max(1, _CACHE_SLAB // n)
        t64 = np.empty((n, min(step, size)))  # (N, s)
        hist_step = max(step, (_SLAB // n) // step * step)  # bincount in larger batches
        bits = np.empty((n, min(hist_step, size)), np.uint16) if out.hist is not None else None
        filled = 0
        for s0, s1 in _slabs(size, n, _CACHE_SLAB):
            w = s1 - s0
            t32 = task_vectors(blocks, self.coefs, s0, s1)  # (N, w)
            out.zeros += w - np.count_nonzero(t32, axis=1)
            if w:
                # |t| is exact in float32: the maximum needs no float64 copy
                big = np.abs(np.maximum(t32.max(axis=1), -t32.min(axis=1)))  # no -0.0
                np.maximum(out.maxabs, big, out=out.maxabs)
            t = t64[:, :w]
            np.copyto(t, t32)  # exact: products of float32 values are exact in float64
            _add_gram(out.gram, t)
            if n > 1:
                np.abs(t, out=t)
                _add_gram(out.absgram, t)
            if self.base >= 0:
                np.copyto(t[0], blocks[self.base].reshape(-1)[s0:s1])
                out.base_sq += float(np.einsum("i,i->", t[0], t[0]))
            if bits is not None and out.hist is not None:
                if filled + w > bits.shape[1]:
                    _count(out.hist, bits[:, :filled])
                    filled = 0
                mag = np.abs(t32, out=t32).view(np.uint32)
                np.right_shift(
                    mag, np.uint32(16), out=bits[:, filled : filled + w], casting="unsafe"
                )
                filled += w
        if bits is not None and out.hist is not None and filled:
            _count(out.hist, bits[:, :filled])
        if n == 1:
            out.absgram[:] = out.gram  # |t|.|t| is t.t
        return out


def _add_gram(gram: np.ndarray, t: np.ndarray) -> None:
    """``gram += t @ t.T`` (float64; BLAS limited to one thread by the caller, see api)."""
    if t.shape[0] == 1:
        gram[0, 0] += float(np.einsum("i,i->", t[0], t[0]))
    else:
        gram += t @ t.T


def _count(hist: np.ndarray, bits: np.ndarray) -> None:
    for i in range(bits.shape[0]):
        hist[i] += np.bincount(bits[i], minlength=HI_BINS)


@dataclass(frozen=True)
class TensorMoments:
    """The main pass's figures for one tensor (the finished, small form of BlockSums).

    Attributes:
        gram: ``(N, N)`` Gram matrix (float64).
        absgram: ``(N, N)`` sums of ``|t_i t_j|``.
        maxabs: ``(N,)`` max ``|t_i|``.
        zeros: ``(N,)`` exact zeros.
        base_sq: ``||base||^2`` (0 without a base).
        top_bins: ``(N,)`` the lowest magnitude bin (top 15 bits of ``|t|``) of the top set,
            -1 without a density.
        top_counts: ``(N,)`` elements in bins ``>= top_bins`` (at least ``ceil(density n)``).
    """

    gram: np.ndarray
    absgram: np.ndarray
    maxabs: np.ndarray
    zeros: np.ndarray
    base_sq: float
    top_bins: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    top_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass(frozen=True)
class FinishMoments:
    """Runs inside the graph: drops the histograms, keeping each vector's top-set bin."""

    numel: int
    density: float

    def __call__(self, sums: BlockSums) -> TensorMoments:
        n = sums.gram.shape[0]
        bins = np.full(n, -1, np.int64)
        counts = np.zeros(n, np.int64)
        if sums.hist is not None:
            want = max(1, math.ceil(self.density * self.numel))
            for i in range(n):
                above = np.cumsum(sums.hist[i][::-1])[::-1]  # elements in bins >= h
                # the highest bin whose tail holds at least `want` elements
                h = int(np.flatnonzero(above >= want)[-1]) if above[0] >= want else 0
                bins[i], counts[i] = h, int(above[h])
        return TensorMoments(
            sums.gram, sums.absgram, sums.maxabs, sums.zeros, sums.base_sq, bins, counts
        )


@dataclass(frozen=True)
class OverlapStat:
    """Second pass: ``(N, N)`` counts of entries in the top sets of both vectors.

    Vector ``i``'s top set is its non-zero entries with ``|t_i|`` in bins ``>= bins[i]``.
    """

    coefs: tuple[tuple[float, ...], ...]
    bins: tuple[int, ...]

    def __call__(
        self, name: str, shape: tuple[int, ...], blocks: Sequence[np.ndarray], r0: int, r1: int
    ) -> np.ndarray:
        n = len(self.coefs)
        out = np.zeros((n, n), np.int64)
        for s0, s1 in _slabs(blocks[0].size, n):
            t32 = task_vectors(blocks, self.coefs, s0, s1)
            bits = np.abs(t32, out=t32).view(np.uint32)
            top = np.empty(bits.shape, np.float32)
            for i, h in enumerate(self.bins):
                # bits > 0 leaves exact zeros out of every top set (frozen tensors)
                top[i] = (bits[i] >= np.uint32(h << 16)) & (bits[i] > 0)
            # float32 0/1 products: exact while a slab holds fewer than 2^24 elements
            out += np.rint(top @ top.T).astype(np.int64)
        return out
