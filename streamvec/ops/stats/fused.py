"""The per-block work of ``stats``: every figure of a row block in one sweep over its slabs.

A block is read a slab of about :data:`SLAB` elements per operand at a time
(:mod:`streamvec.ops.stats.slabs`: ``pread`` into buffers reused for the whole block), and
each slab goes through one compiled loop (:mod:`streamvec.ops.stats.kernel`) that forms the
float32 task vectors ``t_i`` (upcast before subtracting, as ``diff``) and adds:

* from the float32 bits of ``|t_i|``: ``max |t_i|`` (the order of non-negative floats is
  the order of their bits) and the count of non-zero entries;
* the Gram matrix ``sum t_i t_j`` and ``sum |t_i| |t_j|`` in float64 (products of float32
  values are exact there), and ``||base||^2``;
* with top-set thresholds: per pair, the entries at or above both thresholds (non-zero
  entries only);
* with ``histogram``: the histogram of the top 15 bits of ``|t_i|`` (the exact top-k mode's
  first pass, as :mod:`streamvec.ops.merge.select`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamvec.io.blocks import BlockReader, matrix_shape
from streamvec.ops.merge.select import HI_BINS
from streamvec.ops.stats.accumulate import BlockSums
from streamvec.ops.stats.slabs import SlabReader

# Elements per operand per slab (one pread each; the raw buffers stay in L2): a pass on one
# thread took 0.84x the CPU of 2^16 at 2^17, 0.86x at 2^18, 1.21x at 2^14 (bench_stats_kernels
# slabs): fewer slabs, fewer preads and calls from Python.
SLAB = 1 << 17


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
        # numba (0.3 s to import, 0.5-0.7 s to load the cached code) only when a pass runs
        from streamvec.ops.stats import kernel

        n = len(self.coefs)
        _, cols = matrix_shape(self.shape)
        size = (r1 - r0) * cols
        width = max(1, min(SLAB, size))
        gram = np.zeros((n, n))
        absgram = np.zeros((n, n))
        maxbits = np.zeros(n, np.uint32)
        nonzero = np.zeros(n, np.int64)
        base_sq = np.zeros(1)
        hist = np.zeros((n, HI_BINS) if self.histogram else (0, 0), np.int64)
        both = np.zeros((n, n), np.int64)
        # floor >= 1 leaves exact zeros out of every top set (frozen tensors)
        floor = np.maximum(np.zeros(0) if thresholds is None else thresholds, 1).astype(np.uint32)
        idx, coef, nterms, sub = plan_arrays(self.coefs, len(self.readers))
        with SlabReader(self.readers, r0, r1, width) as rd:
            for s0 in range(0, size, width):
                s1 = min(size, s0 + width)
                raw, shift = rd.load_bits(s0, s1)
                kernel.slab_sums(
                    raw, shift, s1 - s0, idx, coef, nterms, sub, self.base, self.moments,
                    floor, hist, gram, absgram, maxbits, nonzero, both,
                    base_sq,
                )  # fmt: skip
        iu = np.triu_indices(n, 1)
        gram[(iu[1], iu[0])] = gram[iu]
        absgram[(iu[1], iu[0])] = absgram[iu]
        absgram[np.diag_indices(n)] = np.diag(gram)  # |t|.|t| is t.t
        both[(iu[1], iu[0])] = both[iu]
        return BlockSums(
            gram,
            absgram,
            maxbits.view(np.float32).astype(np.float64),
            size - nonzero,
            float(base_sq[0]),
            hist if self.histogram else None,
            both if thresholds is not None else None,
        )


def plan_arrays(
    coefs: tuple[tuple[float, ...], ...], operands: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each task vector's terms as :mod:`streamvec.ops.stats.kernel` takes them.

    Returns:
        ``(idx, coef, nterms, sub)``: per vector its operands with a non-zero coefficient
        (``(N, R)`` int64), their float32 coefficients, the number of terms, and whether it
        is one ``a - b`` (``ft - base``: the ``+1`` first, one correctly rounded subtraction).
    """
    n, width = len(coefs), max(operands, 1)
    idx = np.zeros((n, width), np.int64)
    coef = np.zeros((n, width), np.float32)
    nterms = np.zeros(n, np.int64)
    sub = np.zeros(n, np.bool_)
    for i, row in enumerate(coefs):
        terms = [(c, r) for r, c in enumerate(row) if c != 0.0]
        sub[i] = sorted(c for c, _ in terms) == [-1.0, 1.0]
        if sub[i]:
            terms.sort(key=lambda x: -x[0])
        nterms[i] = len(terms)
        for q, (c, r) in enumerate(terms):
            idx[i, q], coef[i, q] = r, c
    return idx, coef, nterms, sub
