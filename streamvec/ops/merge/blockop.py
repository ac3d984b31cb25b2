"""The block operation of the task-vector merge family (TIES, DARE, Breadcrumbs, DELLA...).

For one tensor, with base ``b``, fine-tuned models ``x_i`` and per-model weight ``w_i``, mask
``m_i`` and rescale factor ``s_i``::

    tau_i = x_i - b                           (or x_i itself for a task-vector store)
    d_i   = w_i * s_i * (m_i * tau_i)         (sparsify, rescale, weight)
    consensus (TIES "sum"):  M = sign(sum_i d_i) (0 -> +1);  keep d_i where sign(d_i) == M
    merged = sum_i kept d_i
    normalize:  merged /= sum_i w_i [kept]    (elementwise with consensus; 0 -> 1)
                merged /= sum_i w_i           (without; |sum| < 1e-8 -> 1)
    out = b + lambda * merged

Masks are decided on the float32 task vector (``x_i - b`` upcast first, one rounding, as the
rest of streamvec computes it); the arithmetic is float64 and the result is rounded once by
the kernel. Work goes slab by slab (about 128K elements) so temporaries stay in cache and the
op's memory is the block's, whatever the number of models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamvec.compute.kernel import SLAB_ELEMENTS
from streamvec.ops.merge.masks import Mask, SlabContext

CONSENSUS = ("sum", "count")


def task_vector32(x: np.ndarray, base: np.ndarray, is_delta: bool) -> np.ndarray:
    """``tau`` of one model's slab as float32 (inputs already float32): what masks rank."""
    return x if is_delta else x - base


def slab_rows(cols: int) -> int:
    """Rows per slab: about :data:`~streamvec.compute.kernel.SLAB_ELEMENTS` elements, at least one
    row."""
    return max(1, SLAB_ELEMENTS // max(cols, 1))


@dataclass(frozen=True)
class SparseMergeOp:
    """The :class:`~streamvec.compute.kernel.BlockOp` of the generalized task-arithmetic family.

    Attributes:
        shape: the tensor's shape (for ranks along axis 1 and flat indices).
        deltas: per model, True when its input already is a task vector (a store).
        masks: per model, which elements of ``tau_i`` are kept.
        scales: per model, the rescale factor applied to the kept elements.
        weights: per model, ``w_i``.
        consensus: ``None``, ``"sum"`` (TIES sign election by summed mass) or ``"count"``.
        normalize: divide by the (kept) weight sum.
        lam: the global scale ``lambda``.
        result_dtype: ``float32``, or ``float64`` for float64 outputs.
        work_dtype: arithmetic type: ``float32`` for 16-bit outputs (a few float32 roundings
            stay far below one bf16/f16 ulp, as in the engine's kernel), ``float64`` for
            32- and 64-bit outputs so they are within one ulp of the float64 formula.
    """

    shape: tuple[int, ...]
    deltas: tuple[bool, ...]
    masks: tuple[Mask, ...]
    scales: tuple[float, ...]
    weights: tuple[float, ...]
    consensus: str | None = None
    normalize: bool = False
    lam: float = 1.0
    result_dtype: str = "float32"
    work_dtype: str = "float64"

    def __call__(
        self, name: str, blocks: Sequence[np.ndarray], coefs: Sequence[float], r0: int, r1: int
    ) -> np.ndarray:
        base = blocks[0]
        rows, cols = base.shape
        out = np.empty((rows, cols), dtype=self.result_dtype)
        step = slab_rows(cols)
        for s0 in range(0, rows, step):
            s1 = min(rows, s0 + step)
            ctx = SlabContext(name, self.shape, r0 + s0, s1 - s0, cols)
            out[s0:s1] = self._slab([b[s0:s1] for b in blocks], ctx)
        return out

    def _slab(self, blocks: list[np.ndarray], ctx: SlabContext) -> np.ndarray:
        # In-place ufuncs throughout: each model costs one temporary of the work type per slab.
        b = blocks[0]
        wide = self.work_dtype == "float64"
        bw = b.astype(np.float64) if wide else b
        parts = []
        for i, mask in enumerate(self.masks):
            x = blocks[i + 1]
            if wide:
                tau32 = x if self.deltas[i] else x - b
                tau = x.astype(np.float64)
                if not self.deltas[i]:
                    tau -= bw
            else:
                tau = x.copy() if self.deltas[i] else x - b
                tau32 = tau  # the float32 task vector the masks rank
            keep = mask.keep(tau32, ctx)  # before tau is changed in place
            if keep is not None:
                np.multiply(tau, keep, out=tau)  # as mergekit: tau * mask
            c = self.scales[i] * self.weights[i]
            if c != 1.0:
                tau *= c
            parts.append(tau)
        total = parts[0].copy() if len(parts) > 1 or self.consensus else parts[0]
        for p in parts[1:]:
            total += p
        if self.consensus is None:
            merged = total
            if self.normalize:
                div = float(sum(self.weights))
                merged /= 1.0 if abs(div) < 1e-8 else div
        else:
            if self.consensus == "sum":
                positive = total >= 0
            else:
                votes = sum((p > 0).astype(np.int32) - (p < 0) for p in parts)
                positive = np.asarray(votes >= 0)
            merged = np.zeros_like(total)
            div_arr = np.zeros_like(total) if self.normalize else None
            for w, p in zip(self.weights, parts, strict=True):
                # agree: the entry's sign is the elected one (a zero agrees with neither)
                agree = np.where(positive, p > 0, p < 0)
                np.multiply(p, agree, out=p)
                merged += p
                if div_arr is not None:
                    div_arr += agree * np.asarray(w, dtype=div_arr.dtype)
            if div_arr is not None:
                div_arr[div_arr == 0] = 1.0
                merged /= div_arr
        if self.lam != 1.0:
            merged *= self.lam
        merged += bw
        return merged
