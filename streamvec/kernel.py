"""The block kernel: a weighted sum of row blocks, upcast first, rounded once.

``out = round_to(out_dtype, sum_i c_i * upcast(x_i))``. Operands are upcast *before* any
arithmetic (subtracting bf16 arrays directly rounds to bf16). The accumulation type is float32
when the output is 16-bit, which keeps the result within one unit in the last place of the
float64 formula, and float64 when the output is 32- or 64-bit and the combination is more than
one exact subtraction, where float32 accumulation could drift past one ulp of the output.

Work is done in slabs of about :data:`SLAB_ELEMENTS` elements so the accumulator stays in the
CPU cache across terms: on the development machine that ran 2.5x faster than whole 16 MB blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

SLAB_ELEMENTS = 1 << 17  # 512 KiB of float32: fits L2 with room for the operands


def accumulation_dtype(out_dtype: np.dtype, coefficients: Sequence[float]) -> np.dtype:
    """float32, or float64 where float32 could cost more than one ulp of the output.

    A single term times +-1, or the difference/sum of two terms with unit weights, is one
    correctly rounded float32 operation, so it is exact to float32 rounding; anything else
    accumulates several roundings.
    """
    out = np.dtype(out_dtype)
    if out.itemsize < 4:
        return np.dtype(np.float32)
    if out == np.float32 and len(coefficients) <= 2 and all(abs(c) == 1.0 for c in coefficients):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


class Kernel(Protocol):
    """Evaluates a weighted sum of operand rows, like :func:`combine_blocks`, elsewhere."""

    def __call__(
        self, operands: Sequence[tuple[float, np.ndarray]], out_dtype: np.dtype
    ) -> np.ndarray: ...


class BlockOp(Protocol):
    """A non-linear per-block operation (TIES, DARE, ...): picklable, deterministic.

    Called with the tensor name, the row range and every term's rows upcast to float32 (in
    term order, with the term coefficients); returns the float32 (or float64) result rows,
    which the kernel rounds once to the output dtype. It must give the same rows whatever the
    block partition, so that results do not depend on the memory budget or the scheduler.
    """

    def __call__(
        self, name: str, blocks: Sequence[np.ndarray], coefs: Sequence[float], r0: int, r1: int
    ) -> np.ndarray: ...


def apply_op(
    op: BlockOp,
    name: str,
    operands: Sequence[tuple[float, np.ndarray]],
    r0: int,
    r1: int,
    out_dtype: np.dtype,
) -> np.ndarray:
    """A non-linear operation over operand rows already read, rounded once."""
    blocks = [np.asarray(x).astype(np.float32) for _, x in operands]  # upcast first
    result = op(name, blocks, [float(c) for c, _ in operands], r0, r1)
    return np.asarray(result).astype(out_dtype)


def combine_blocks(operands: Sequence[tuple[float, np.ndarray]], out_dtype: np.dtype) -> np.ndarray:
    """``sum(c * x for c, x in operands)`` over row blocks already read, rounded once.

    Args:
        operands: (coefficient, rows) pairs of one geometry ``(rows, cols)``.
        out_dtype: dtype of the result; integer/bool outputs require a single operand of
            weight 1 and the same dtype (a pass-through copy).

    Returns:
        A ``(rows, cols)`` array of ``out_dtype``.
    """
    out_dtype = np.dtype(out_dtype)
    blocks = [(float(c), x) for c, x in operands]
    if len(blocks) == 1 and blocks[0][0] == 1.0 and blocks[0][1].dtype == out_dtype:
        return np.array(blocks[0][1])  # pass-through: a plain copy, bit for bit
    if not blocks:
        raise ValueError("combine_blocks needs at least one operand")
    rows, cols = blocks[0][1].shape
    acc_dtype = accumulation_dtype(out_dtype, [c for c, _ in blocks])
    out = np.empty((rows, cols), out_dtype)
    flat_out = out.reshape(-1)
    slab = max(SLAB_ELEMENTS // max(cols, 1), 1) * max(cols, 1)
    # Accumulate in place when the output is the accumulation type; otherwise in one
    # slab-sized buffer that stays in cache (a block-sized accumulator doubled the memory
    # traffic: the block kernel is bound by memory bandwidth, not arithmetic).
    rounding = out_dtype != acc_dtype
    acc_slab = np.empty(min(slab, rows * cols), acc_dtype) if rounding else flat_out
    scratch: np.ndarray | None = None
    for s0 in range(0, rows * cols, slab):
        s1 = min(s0 + slab, rows * cols)
        a = acc_slab[: s1 - s0] if rounding else flat_out[s0:s1]
        for i, (c, block) in enumerate(blocks):
            # Casting inside the ufunc (rather than astype first) upcasts in the ufunc's small
            # buffers: no temporary array, and it measured ~20% faster.
            x = block.reshape(-1)[s0:s1]
            if i == 0 and c == 1.0:
                np.copyto(a, x, casting="unsafe")
            elif i == 0:
                np.multiply(x, c, out=a, dtype=acc_dtype, casting="unsafe")
            elif c == 1.0:
                np.add(a, x, out=a, dtype=acc_dtype, casting="unsafe")
            elif c == -1.0:
                np.subtract(a, x, out=a, dtype=acc_dtype, casting="unsafe")
            else:
                if scratch is None:
                    scratch = np.empty(slab, acc_dtype)
                t = scratch[: s1 - s0]
                np.multiply(x, c, out=t, dtype=acc_dtype, casting="unsafe")
                np.add(a, t, out=a)
        if rounding:
            # The one rounding to the output type (round-to-nearest-even).
            np.copyto(flat_out[s0:s1], a, casting="unsafe")
    return out
