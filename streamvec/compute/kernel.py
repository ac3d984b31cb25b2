"""The block kernel: a weighted sum of row blocks, upcast first, rounded once.

``out = round_to(out_dtype, sum_i c_i * upcast(x_i))``. Operands are upcast *before* any
arithmetic (subtracting bf16 arrays directly rounds to bf16).

**Delta form.** When some operands are checkpoints (*points*), the sum is evaluated relative
to the first of them, the *pivot* ``b``: ``s * b + sum_j c_j (x_j - b) + sum_k c_k v_k`` with
``s`` the sum of the point weights (1 for a model, 0 for a task vector). Each ``x_j - b`` of
16-bit inputs is exact in float32, so an element that a fine-tune left unchanged contributes
exactly 0 and one it set to zero cancels the base exactly: ``b + 1.0 * (0 - b)`` is 0, where
the expanded form ``0.2 b + 1.0 * 0 - 0.5 b + 0.3 b`` left +-1e-11.

**Accumulation.** The products and the sum are float64, except for a single exact operation
(one term times +-1, or ``a +- b``), which is float32. The float64 result is then rounded
*once* to the output dtype: to 16 bits through float32 with the one case where that double
rounding differs (a float32 value that lands exactly on a 16-bit tie) done directly, so the
output is the correctly rounded value of the float64 sum. The torch kernel reaches the same
bits by rounding to odd (:mod:`streamvec.compute.torch_kernel`).

**One bf16 fine-tune.** ``b + c (f - b)`` of bf16 inputs into bf16 with ``c`` in
:data:`streamvec.compute.delta_bf16.FAST_COEFFICIENTS` (the edited model ``--scale 1`` or
``FT:0.5``) gives the same bits from float32 alone, checked on every pair of bf16 values;
it runs there at about 2x the float64 path's speed (:mod:`streamvec.compute.delta_bf16`).

Work is done in slabs of about :data:`SLAB_ELEMENTS` elements so the accumulator stays in the
CPU cache across terms: on the development machine that ran 2.5x faster than whole 16 MB blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from streamvec.compute import delta_bf16
from streamvec.dtypes import BFLOAT16, round_once

if TYPE_CHECKING:
    from streamvec.io.read_buffers import BufferLease

# 1 MiB of float64 per slab buffer. 2^16 kept the accumulator in the 1 MiB L2 but paid the
# ~27 numpy calls of a slab twice as often: with two workers, 2^17 ran the kernel at 1.2-1.36x
# the throughput, and `combine`, a three-fine-tune `combine` and a TIES merge took 0.77-0.97x
# the engine's compute seconds (2^15 was slower, 2^18 slower for three fine-tunes;
# docs/benchmarks.md, "Kernel slabs of 2^17 elements").
SLAB_ELEMENTS = 1 << 17
_EPS = 1e-9  # point weights within this of 1 (0) are a model (a task vector), as in algebra

# 16-bit output -> (mask of the float32 bits below its last place, the tie pattern, and the
# float32 exponent field under which it is subnormal, where the mask does not apply).
_TIES: dict[np.dtype, tuple[int, int, int]] = {
    BFLOAT16: (0xFFFF, 0x8000, 0),
    np.dtype(np.float16): (0x1FFF, 0x1000, (127 - 14) << 23),
}


def accumulation_dtype(out_dtype: np.dtype, coefficients: Sequence[float]) -> np.dtype:
    """float32 for one exact operation, float64 otherwise.

    A single term times +-1, or the difference/sum of two terms with unit weights, is one
    correctly rounded float32 operation; anything else accumulates several roundings, which
    float64 keeps far below one ulp of any output dtype before the one final rounding.
    """
    out = np.dtype(out_dtype)
    if out == np.float64:
        return out
    if len(coefficients) <= 2 and all(abs(c) == 1.0 for c in coefficients):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


@dataclass(frozen=True)
class Plan:
    """How a weighted sum is evaluated: the pivot, and each other term's role.

    Attributes:
        pivot: index of the operand the points are differenced against (None: no points).
        pivot_coef: its weight in the delta form, the sum of the point weights.
        terms: (index, coefficient, differenced) for every other operand, in order.
        acc_dtype: the accumulation dtype.
        diff_dtype: the dtype of the exact differences ``x_j - b``.
    """

    pivot: int | None
    pivot_coef: float
    terms: tuple[tuple[int, float, bool], ...]
    acc_dtype: np.dtype
    diff_dtype: np.dtype


def plan(
    coefs: Sequence[float],
    dtypes: Sequence[np.dtype],
    out_dtype: np.dtype,
    points: Sequence[bool] = (),
) -> Plan:
    """The evaluation :class:`Plan` of ``sum c_i x_i`` (shared by the numpy and torch kernels).

    Args:
        coefs: the weights, one per operand.
        dtypes: the operands' dtypes.
        out_dtype: the result dtype.
        points: per operand, whether it is a checkpoint (empty: none are).

    Returns:
        The plan: the first point is the pivot when there are points.
    """
    coefs = [float(c) for c in coefs]
    acc = accumulation_dtype(out_dtype, coefs)
    flags = list(points) or [False] * len(coefs)
    pivot = next((i for i, p in enumerate(flags) if p), None)
    if pivot is None:
        terms = tuple((i, c, False) for i, c in enumerate(coefs))
        return Plan(None, 0.0, terms, acc, acc)
    s = math.fsum(c for c, p in zip(coefs, flags, strict=True) if p)
    # A model's point weights sum to 1 and a task vector's to 0 up to the rounding of how
    # they were formed (1 - lambda * sum w): the delta form uses the intended value.
    s = 1.0 if abs(s - 1.0) < _EPS else 0.0 if abs(s) < _EPS else s
    terms = tuple((i, c, flags[i]) for i, c in enumerate(coefs) if i != pivot)
    point_dtypes = {np.dtype(dtypes[i]) for i, p in enumerate(flags) if p}
    # 16-bit floats differ exactly in float32 (bf16 always, f16 near each other); wider
    # inputs differ in float64.
    exact32 = point_dtypes <= {BFLOAT16, np.dtype(np.float16)}
    diff = np.dtype(np.float32) if exact32 else np.dtype(np.float64)
    return Plan(pivot, s, terms, acc, diff if acc == np.float64 else acc)


class Kernel(Protocol):
    """Evaluates a weighted sum of operand rows, like :func:`combine_blocks`, elsewhere."""

    def __call__(
        self,
        operands: Sequence[tuple[float, np.ndarray]],
        out_dtype: np.dtype,
        points: Sequence[bool] = (),
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


def upcast32(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` as a new float32 array; bf16 by shifting its bits (2x faster than ml_dtypes).

    Args:
        x: rows as read (any float dtype).
        out: a C-contiguous float32 array of ``x``'s shape to write into (a block task's
            reused buffer: a fresh array's pages are faulted in on every block); None: a new
            one.

    Returns:
        A float32 copy (bf16 and float16 upcast exactly): ``out`` when given.
    """
    x = np.asarray(x)
    if out is None:
        out = np.empty(x.shape, np.float32)
    if x.dtype == BFLOAT16 and x.flags.c_contiguous:
        np.left_shift(x.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, x, casting="unsafe")
    return out


def apply_op(
    op: BlockOp,
    name: str,
    operands: Sequence[tuple[float, np.ndarray]],
    r0: int,
    r1: int,
    out_dtype: np.dtype,
    lease: BufferLease | None = None,
) -> np.ndarray:
    """A non-linear operation over operand rows already read, rounded once.

    ``lease``: the block task's read buffers; the float32 copies of the operands go into maps
    borrowed from it (valid until it is closed) instead of fresh memory.
    """
    blocks = [  # upcast first
        upcast32(x, None if lease is None else lease.array(np.shape(x), np.float32))
        for _, x in operands
    ]
    result = op(name, blocks, [float(c) for c, _ in operands], r0, r1)
    return round_once(np.asarray(result), out_dtype)


def combine_blocks(
    operands: Sequence[tuple[float, np.ndarray]],
    out_dtype: np.dtype,
    points: Sequence[bool] = (),
) -> np.ndarray:
    """``sum(c * x for c, x in operands)`` over row blocks already read, rounded once.

    Args:
        operands: (coefficient, rows) pairs of one geometry ``(rows, cols)``.
        out_dtype: dtype of the result; integer/bool outputs require a single operand of
            weight 1 and the same dtype (a pass-through copy).
        points: per operand, whether it is a checkpoint; with any, the sum is evaluated in
            the delta form relative to the first (see the module docstring).

    Returns:
        A ``(rows, cols)`` array of ``out_dtype``.

    Example:
        >>> b = np.array([[1.0, 2.0]], np.float32); f = np.array([[0.0, 2.5]], np.float32)
        >>> combine_blocks([(0.5, b), (0.5, f)], np.float32, points=(True, True))
        array([[0.5 , 2.25]], dtype=float32)
    """
    out_dtype = np.dtype(out_dtype)
    blocks = [(float(c), x) for c, x in operands]
    if len(blocks) == 1 and blocks[0][0] == 1.0 and blocks[0][1].dtype == out_dtype:
        return np.array(blocks[0][1])  # pass-through: a plain copy, bit for bit
    if not blocks:
        raise ValueError("combine_blocks needs at least one operand")
    rows, cols = blocks[0][1].shape
    p = plan([c for c, _ in blocks], [x.dtype for _, x in blocks], out_dtype, points)
    out = np.empty((rows, cols), out_dtype)
    flat_out = out.reshape(-1)
    n = rows * cols
    slab = max(SLAB_ELEMENTS // max(cols, 1), 1) * max(cols, 1)
    width = min(slab, n)
    flats = [x.reshape(-1) for _, x in blocks]
    general = _GeneralSlabs(p, out_dtype, width)
    fast = delta_bf16.applies(
        p.pivot_coef, p.terms, [x.dtype for _, x in blocks], p.pivot, out_dtype
    )
    if fast:
        # one bf16 fine-tune of a bf16 base with a power-of-two weight: the same bits from
        # float32 alone (see streamvec.compute.delta_bf16)
        assert p.pivot is not None
        (index, coef, _), base = p.terms[0], flats[p.pivot]
        b32, r32 = np.empty(width, np.float32), np.empty(width, np.float32)
        bits = np.empty(width, np.uint32)
    for s0 in range(0, n, slab):
        s1 = min(s0 + slab, n)
        if fast and delta_bf16.combine_slab(
            base[s0:s1], flats[index][s0:s1], coef, p.pivot_coef, flat_out[s0:s1], b32, r32, bits
        ):
            continue
        general(flats, s0, s1, flat_out)
    return out


class _GeneralSlabs:
    """The delta form of any plan over one slab: float64 (or one exact float32 operation)
    accumulation, then the one rounding; its buffers are made on first use."""

    def __init__(self, p: Plan, out_dtype: np.dtype, width: int) -> None:
        self.p, self.out_dtype, self.width = p, out_dtype, width
        self.rounding = out_dtype != p.acc_dtype
        self.ready = False

    def _buffers(self) -> None:
        # Slab-sized buffers that stay in cache (a block-sized accumulator doubled the memory
        # traffic: the block kernel is bound by memory bandwidth, not arithmetic).
        p, width = self.p, self.width
        self.acc_slab = np.empty(width, p.acc_dtype) if self.rounding else None
        self.pivot_slab = np.empty(width, p.diff_dtype) if p.pivot is not None else None
        self.diff_slab = np.empty(width, p.diff_dtype) if p.pivot is not None else None
        self.scratch = np.empty(width, p.acc_dtype)
        self.finish = _Rounder(self.out_dtype, width) if self.rounding else None
        self.ready = True

    def __call__(self, flats: list[np.ndarray], s0: int, s1: int, flat_out: np.ndarray) -> None:
        if not self.ready:
            self._buffers()
        p, k = self.p, s1 - s0
        a = self.acc_slab[:k] if self.acc_slab is not None else flat_out[s0:s1]
        scratch = self.scratch[:k]
        base = None
        if p.pivot is not None:
            assert self.pivot_slab is not None
            base = _upcast(flats[p.pivot][s0:s1], self.pivot_slab[:k])
        first = True
        for i, c, differenced in p.terms:
            x: np.ndarray = flats[i][s0:s1]
            if differenced:
                assert self.diff_slab is not None and base is not None
                x = _upcast(x, self.diff_slab[:k])
                np.subtract(x, base, out=x)  # exact for 16-bit inputs
            _accumulate(a, x, c, first, scratch)
            first = False
        if base is not None and (p.pivot_coef != 0.0 or first):
            # The base last: the small differences are summed first, then added to it.
            _accumulate(a, base, p.pivot_coef, first, scratch)
        if self.finish is not None:
            self.finish(a, flat_out[s0:s1])


def _upcast(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``x`` as ``out.dtype`` in ``out``; bf16 -> float32 by shifting its bits (3x faster)."""
    if x.dtype == BFLOAT16 and out.dtype == np.float32:
        np.left_shift(x.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, x, casting="unsafe")
    return out


def _accumulate(a: np.ndarray, x: np.ndarray, c: float, first: bool, t: np.ndarray) -> None:
    """``a = c * x`` (first) or ``a += c * x``: a multiply then an add, never fused."""
    if x.dtype != a.dtype:
        # An explicit upcast then in-place arithmetic measured 1.7x faster than letting the
        # ufunc cast in its buffers.
        np.copyto(t, x, casting="unsafe")
        x = t
    if first:
        if c == 1.0:
            np.copyto(a, x)
        else:
            np.multiply(x, c, out=a)
    elif c == 1.0:
        np.add(a, x, out=a)
    elif c == -1.0:
        np.subtract(a, x, out=a)
    else:
        np.multiply(x, c, out=t)
        np.add(a, t, out=a)


class _Rounder:
    """The one rounding of an accumulator slab to the output dtype (round-to-nearest-even).

    float64 -> 16 bits goes through float32 (ml_dtypes' direct conversion is 5x slower, and
    float32 -> bf16 is done on the bits, 2x faster than ml_dtypes). That double rounding
    differs from the direct one only where the float32 value is inexact and exactly a 16-bit
    tie (or, for float16, in its subnormal range); those few elements, and NaNs, are
    converted directly (:func:`streamvec.dtypes.round_once`: ml_dtypes before 0.7.0 rounds
    float64 -> bf16 twice as well).

    Exact ties are common (``0.5 * (b + f)`` of two bf16 values is a bf16 tie about half the
    time, exactly), so which ties are inexact is found for the whole slab at once, by
    comparing the float32 value back with the float64 one: gathering every tie to check it
    one by one took most of the kernel's time.
    """

    def __init__(self, out_dtype: np.dtype, width: int) -> None:
        self.out_dtype = out_dtype
        self.ties = _TIES.get(out_dtype)
        self.r32 = np.empty(width, np.float32)
        self.back = np.empty(width, np.float64)
        self.bits = np.empty(width, np.uint32)
        self.hit = np.empty(width, np.bool_)
        self.inexact = np.empty(width, np.bool_)

    def __call__(self, acc: np.ndarray, out: np.ndarray) -> None:
        if self.ties is None or acc.dtype != np.float64:
            np.copyto(out, acc, casting="unsafe")  # the one rounding (or exact)
            return
        n = acc.shape[0]
        r32, bits, hit = self.r32[:n], self.bits[:n], self.hit[:n]
        np.copyto(r32, acc, casting="unsafe")
        u = r32.view(np.uint32)
        mask, tie, subnormal = self.ties
        if self.out_dtype == BFLOAT16:
            delta_bf16.round_bf16_bits(r32, bits, out)  # NaNs are redone below
        else:
            np.copyto(out, r32, casting="unsafe")
        np.bitwise_and(u, mask, out=bits)
        np.equal(bits, tie, out=hit)
        if subnormal:
            np.bitwise_and(u, 0x7F800000, out=bits)
            hit |= bits < subnormal
        # the bit rounding is not for NaN payloads: a reduction finds whether there are any
        nan = bool(np.isnan(r32.max()))
        if nan:
            hit |= np.isnan(r32)
        ties = int(np.count_nonzero(hit))
        if ties == 0:
            return
        if ties > n >> 6:
            # many ties: find the inexact ones (which round differently twice) in one pass
            back, inexact = self.back[:n], self.inexact[:n]
            np.copyto(back, r32)
            np.not_equal(back, acc, out=inexact)  # NaN != NaN: kept
            np.logical_and(hit, inexact, out=hit)
        where = np.flatnonzero(hit)
        if ties <= n >> 6:
            # an exact tie is rounded right already; NaNs are converted directly
            where = where[(acc[where] != r32[where]) | np.isnan(r32[where])]
        if where.size:
            out[where] = round_once(acc[where], self.out_dtype)
