"""The per-block work of ``stats``: every figure of a row block in one sweep over its slabs.

For each slab of about :data:`SLAB` elements (per operand; in the CPU cache), the operands
are read and upcast (:mod:`streamvec.ops.stats.slabs`), each float32 task vector ``t_i`` is
formed (upcast before subtracting, as ``diff``), and then, on that cache-resident data:

* ``bits_i = float32 bits of |t_i|``: their maximum is ``max |t_i|`` (the order of
  non-negative floats is the order of their bits), their non-zero count the zeros;
* ``t_i`` copied to float64 (products of float32 values are exact there) and the Gram
  matrix ``sum t_i t_j`` and ``sum |t_i| |t_j|`` as one ``dot`` per pair (BLAS ``ddot``
  measured 15-30x faster than one ``(N, s) @ (s, N)`` product for these shapes), and
  ``||base||^2`` the same way;
* with top-set thresholds: the mask ``bits_i >= threshold_i`` (non-zero entries only) and
  per pair the count of entries in both masks;
* with ``histogram``: the histogram of the top 15 bits of ``|t_i|`` (the exact top-k mode's
  first pass, as :mod:`streamvec.ops.merge.select`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamvec.io.blocks import BlockReader, matrix_shape
from streamvec.ops.merge.select import HI_BINS
from streamvec.ops.stats.accumulate import BlockSums
from streamvec.ops.stats.slabs import SlabReader

# Elements per operand per slab: a slab's buffers (operands, task vectors, their float64
# copies, masks) stay in L2/L3, and the ~20 numpy calls per slab cost little next to the
# arithmetic (1 << 14 measured 1.5-2x slower; 1 << 15 to 1 << 17 within noise).
SLAB = 1 << 16
_ABS = np.uint32(0x7FFFFFFF)


@dataclass(frozen=True)
class FusedStat:
    """All figures of rows ``[r0, r1)`` of one tensor (picklable; ship it to workers).

    Attributes:
        shape: the tensor's shape.
        readers: its distinct readers.
        coefs: per task vector, its coefficients over the readers.
        base: index of the base reader, or -1.
        moments: compute norms, Gram matrices, maxima and zeros (False: top-set counts only).
        histogram: also histogram the magnitudes (the exact top-k mode's first pass).
    """

    shape: tuple[int, ...]
    readers: tuple[BlockReader, ...]
    coefs: tuple[tuple[float, ...], ...]
    base: int
    moments: bool = True
    histogram: bool = False

    def __call__(self, r0: int, r1: int, thresholds: np.ndarray | None = None) -> BlockSums:
        """Sums over rows ``[r0, r1)``.

        Args:
            r0: first row.
            r1: end row.
            thresholds: ``(N,)`` uint32 float32-bit patterns of each vector's top-set
                threshold on ``|t|``, or None (no top-set counts).

        Returns:
            The block's :class:`~streamvec.ops.stats.accumulate.BlockSums`.
        """
        n = len(self.coefs)
        _, cols = matrix_shape(self.shape)
        size = (r1 - r0) * cols
        width = max(1, min(SLAB, size))
        gram = np.zeros((n, n))
        absgram = np.zeros((n, n))
        maxbits = np.zeros(n, np.uint32)
        nonzero = np.zeros(n, np.int64)
        base_sq = 0.0
        hist = np.zeros((n, HI_BINS), np.int64) if self.histogram else None
        both = np.zeros((n, n), np.int64) if thresholds is not None else None
        t32 = np.empty((n, width), np.float32)
        bits = np.empty((n, width), np.uint32)
        t64 = np.empty((n, width)) if self.moments else None
        a64 = np.empty((n, width)) if self.moments and n > 1 else None
        b64 = np.empty(width) if self.moments and self.base >= 0 else None
        masks = np.empty((n, width), np.bool_) if thresholds is not None else None
        pair = np.empty(width, np.bool_) if thresholds is not None and n > 1 else None
        floor = None if thresholds is None else np.maximum(thresholds, 1).astype(np.uint32)
        plan = plan_vectors(self.coefs)
        with SlabReader(self.readers, r0, r1, width) as rd:
            for s0 in range(0, size, width):
                s1 = min(size, s0 + width)
                w = s1 - s0
                ops = rd.load(s0, s1)
                t = task_vectors(ops, plan, t32[:, :w])
                b = bits[:, :w]
                np.bitwise_and(t.view(np.uint32), _ABS, out=b)
                if t64 is not None:
                    np.maximum(maxbits, b.max(axis=1), out=maxbits)
                    for i in range(n):  # with axis=, count_nonzero measured 10x slower
                        nonzero[i] += np.count_nonzero(b[i])
                    x = t64[:, :w]
                    np.copyto(x, t)  # exact
                    for i in range(n):
                        for j in range(i, n):
                            gram[i, j] += np.dot(x[i], x[j])
                    if a64 is not None:
                        a = a64[:, :w]
                        np.abs(x, out=a)
                        for i in range(n):
                            for j in range(i + 1, n):
                                absgram[i, j] += np.dot(a[i], a[j])
                    if b64 is not None:
                        bb = b64[:w]
                        np.copyto(bb, ops[self.base])
                        base_sq += float(np.dot(bb, bb))
                if hist is not None:
                    for i in range(n):
                        hist[i] += np.bincount(b[i] >> np.uint32(16), minlength=HI_BINS)
                if masks is not None and floor is not None and both is not None:
                    m = masks[:, :w]
                    # floor >= 1 leaves exact zeros out of every top set (frozen tensors)
                    np.greater_equal(b, floor[:, None], out=m)
                    for i in range(n):
                        both[i, i] += np.count_nonzero(m[i])
                        for j in range(i + 1, n):
                            assert pair is not None
                            np.logical_and(m[i], m[j], out=pair[:w])
                            both[i, j] += np.count_nonzero(pair[:w])
        iu = np.triu_indices(n, 1)
        gram[(iu[1], iu[0])] = gram[iu]
        absgram[(iu[1], iu[0])] = absgram[iu]
        absgram[np.diag_indices(n)] = np.diag(gram)  # |t|.|t| is t.t
        if both is not None:
            both[(iu[1], iu[0])] = both[iu]
        return BlockSums(
            gram,
            absgram,
            maxbits.view(np.float32).astype(np.float64),
            size - nonzero,
            base_sq,
            hist,
            both,
        )


Plan = tuple[tuple[tuple[float, int], ...], ...]


def plan_vectors(coefs: tuple[tuple[float, ...], ...]) -> Plan:
    """Per task vector, its non-zero ``(coefficient, operand)`` terms (``ft - base``: the
    ``+1`` first)."""
    out = []
    for row in coefs:
        terms = [(c, r) for r, c in enumerate(row) if c != 0.0]
        if len(terms) == 2 and {terms[0][0], terms[1][0]} == {1.0, -1.0}:
            terms.sort(key=lambda x: -x[0])
        out.append(tuple(terms))
    return tuple(out)


def task_vectors(ops: Sequence[np.ndarray], plan: Plan, out: np.ndarray) -> np.ndarray:
    """``(N, w)`` float32 task vectors ``sum_r c_r x_r`` of one slab into ``out``.

    ``ft - base`` is one correctly rounded subtraction (the float32 task vector ``diff``
    stores); a store's vector is its values.

    Args:
        ops: every operand's slab, float32.
        plan: from :func:`plan_vectors`.
        out: ``(N, w)`` float32.

    Returns:
        ``out``.
    """
    for i, terms in enumerate(plan):
        acc = out[i]
        if len(terms) == 2 and terms[0][0] == 1.0 and terms[1][0] == -1.0:
            np.subtract(ops[terms[0][1]], ops[terms[1][1]], out=acc)
            continue
        if not terms:
            acc[:] = 0.0
            continue
        c0, r0 = terms[0]
        if c0 == 1.0:
            np.copyto(acc, ops[r0])
        else:
            np.multiply(ops[r0], np.float32(c0), out=acc)
        for c, r in terms[1:]:
            if c == 1.0:
                np.add(acc, ops[r], out=acc)
            elif c == -1.0:
                np.subtract(acc, ops[r], out=acc)
            else:
                acc += np.float32(c) * ops[r]
    return out
