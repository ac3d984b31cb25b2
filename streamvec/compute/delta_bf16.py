"""The delta form of one bf16 fine-tune, in float32: ``b + c (f - b)`` for a few ``c``.

The most common edit, the model ``base + lambda * (ft - base)`` of one bf16 fine-tune into
bf16 (``combine --base B FT:0.5``, ``--scale 1``), is evaluated by the general kernel with
float64 products and sums and a float64 -> float32 -> bf16 rounding with a tie check
(:func:`streamvec.compute.kernel.combine_blocks`). For the coefficients in
:data:`FAST_COEFFICIENTS` the same bits come from float32 alone:

* ``d = f - b`` is the same float32 subtraction in both;
* ``c * d`` is exact in float32 (``c`` is +-1 or 1/2, and bf16 differences are multiples of
  2^-133, far above float32's 2^-149);
* ``r = b + c * d`` is rounded once to float32, then to bf16 on its bits (round to nearest
  even). That double rounding can differ from the float64 path's only where ``r`` is
  inexact *and* lands exactly on a bf16 tie. For these coefficients it never does: every pair
  of a finite bf16 base and a bf16 fine-tune value that is not a NaN (infinities included;
  4.26e9 pairs) gives the general kernel's bits
  (``bench/verify_delta_bf16.py``, run for each coefficient and for ``s`` = 0 and 1; a
  sample of it runs in ``tests/test_kernel_fast.py``). Other powers of two do not hold:
  ``-1/2`` and ``1/4`` differ on about 0.1% of the pairs (``1.5 b`` and ``0.75 b`` need one
  more bit than ``b``; with a bf16 subnormal fine-tune value the float32 sum lands on a
  tie), so they stay on the general path.

A slab whose result holds a NaN goes through the general kernel, which converts NaN payloads
directly (the bit rounding is not for NaNs). Anything else (other coefficients, several
fine-tunes, float16 or float32 inputs, other outputs) stays on the general path.
"""

from __future__ import annotations

import numpy as np

from streamvec.dtypes import BFLOAT16

# The coefficients whose float32 evaluation was checked equal to the float64 kernel on every
# pair of bf16 inputs (for a model, s = 1, and a task vector, s = 0).
FAST_COEFFICIENTS = frozenset({1.0, -1.0, 0.5})


def applies(
    pivot_coef: float,
    terms: tuple[tuple[int, float, bool], ...],
    dtypes: list[np.dtype],
    pivot: int | None,
    out_dtype: np.dtype,
) -> bool:
    """Whether a plan is one bf16 fine-tune differenced against a bf16 base, into bf16.

    Args:
        pivot_coef: the plan's weight of the base (1 for a model, 0 for a task vector).
        terms: the plan's other terms, (index, coefficient, differenced).
        dtypes: every operand's dtype.
        pivot: the plan's pivot index.
        out_dtype: the result dtype.

    Returns:
        True when :func:`combine_slab` computes the general kernel's bits.
    """
    if pivot is None or np.dtype(out_dtype) != BFLOAT16 or len(terms) != 1:
        return False
    index, coef, differenced = terms[0]
    return (
        differenced
        and coef in FAST_COEFFICIENTS
        and pivot_coef in (0.0, 1.0)
        and np.dtype(dtypes[pivot]) == BFLOAT16
        and np.dtype(dtypes[index]) == BFLOAT16
    )


def combine_slab(
    base: np.ndarray,
    ft: np.ndarray,
    coef: float,
    pivot_coef: float,
    out: np.ndarray,
    b32: np.ndarray,
    r32: np.ndarray,
    bits: np.ndarray,
) -> bool:
    """``out = bf16(b + coef * (f - b))`` (``pivot_coef`` 1) or ``bf16(coef * (f - b))`` (0).

    Args:
        base: the base's bf16 elements (1-d).
        ft: the fine-tune's bf16 elements, as many.
        coef: one of :data:`FAST_COEFFICIENTS`.
        pivot_coef: 1.0 or 0.0.
        out: bf16 result elements, as many.
        b32, r32: float32 scratch, at least as many.
        bits: uint32 scratch, at least as many.

    Returns:
        False, with ``out`` unspecified, when the slab holds a NaN: the caller evaluates it
        on the general path.
    """
    n = base.shape[0]
    b, r, u = b32[:n], r32[:n], bits[:n]
    _upcast(base, b)
    _upcast(ft, r)
    np.subtract(r, b, out=r)  # d = f - b, the general kernel's float32 difference
    if coef != 1.0:
        np.multiply(r, np.float32(coef), out=r)  # exact: a power of two
    if pivot_coef == 1.0:
        np.add(r, b, out=r)  # the one float32 rounding
    if np.isnan(r.max()):  # one reduction finds any NaN
        return False
    round_bf16_bits(r, u, out)
    return True


def round_bf16_bits(r: np.ndarray, bits: np.ndarray, out: np.ndarray) -> None:
    """``out = bf16(r)``, round to nearest even, on the bits (NaN payloads excluded).

    Args:
        r: float32 values (no NaN).
        bits: uint32 scratch of the same length.
        out: bf16 (or uint16) result of the same length.
    """
    u = r.view(np.uint32)
    # add 0x7FFF plus the kept lowest bit, then drop the low 16 bits
    np.right_shift(u, 16, out=bits)
    np.bitwise_and(bits, 1, out=bits)
    np.add(bits, 0x7FFF, out=bits)
    np.add(bits, u, out=bits)
    np.right_shift(bits, 16, out=out.view(np.uint16), casting="unsafe")


def _upcast(x: np.ndarray, out: np.ndarray) -> None:
    """bf16 -> float32 (exact) by shifting the bits."""
    x = np.ascontiguousarray(x)
    np.left_shift(x.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
