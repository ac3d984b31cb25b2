"""Every figure of one slab in one compiled loop (numba): the inner loop of ``stats``.

A pass of ``stats`` does little arithmetic per element, so separate numpy calls (widen,
subtract, mask, maximum, count, float64 copy, dot, ...) each sweep the slab again, and the
sweeps, not the arithmetic, were its time: the numpy slab loop this replaced took 2.3-2.5x
the CPU and wall time of this loop over a 1B pair (docs/benchmarks.md). Here a slab's raw
elements are taken :data:`CHUNK` at a time (every operand's chunk and the chunk's task
vectors stay in L1), widened to float32, combined into each task vector with numpy's
float32 operations, and summed into the figures of
:class:`~streamvec.ops.stats.accumulate.BlockSums`.

Exactness. A task vector is formed with the same float32 steps as numpy's ``c * x`` and
``a + b`` (multiply, then add, never contracted into a fused multiply-add; ``ft - base`` one
subtraction, the float32 task vector ``diff`` stores), so its bits, and so maxima, zeros,
top-set counts and histograms, equal the numpy reference's. A product of two float32 values is exact
in float64; only the order of the float64 additions of the Gram sums is left to the compiler
(``reassoc``, so that they vectorise), which moves them by a few ulps.

Each helper loops over 1-D arrays indexed from 0: indexing ``a[c0 + k]`` inside the chunk
loop kept LLVM from vectorising (2.4 ns per element against 0.07 for the same widening).

The functions are compiled on first use (5-6 s, once per machine) and cached next to this
file or, where that is read-only, in numba's user cache (with neither writable, compiled in
each process). ``import numba`` takes about 0.3 s and loading the cached code 0.5-0.7 s,
which is why this module is imported only when a pass runs (``FusedStat``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np

CHUNK = 4096  # elements per operand per step: a chunk of every operand and vector in L1
_ABS = np.uint32(0x7FFFFFFF)
_REASSOC = {"reassoc", "contract"}  # float64 sums of exact products: order only


def _jit(fastmath: set[str] | bool = False) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit``, cached on disk where a cache location is writable, without the GIL."""

    def wrap(fn: Callable[..., Any]) -> Any:
        try:
            return numba.njit(fn, cache=True, nogil=True, fastmath=fastmath)
        except RuntimeError:  # no writable cache location: compile in each process
            return numba.njit(fn, nogil=True, fastmath=fastmath)

    return wrap


@_jit(_REASSOC)
def _widen(src: np.ndarray, dst: np.ndarray, shift: np.uint32, m: int) -> None:
    # bf16 bits (uint16, shift 16) or float32 bits (uint32, shift 0) to float32 bits
    for k in range(m):
        dst[k] = np.uint32(src[k]) << shift


@_jit()
def _term(x: np.ndarray, c: np.float32, out: np.ndarray, m: int, first: bool) -> None:
    # float32 steps as numpy's c * x then a + b (no contraction: the same rounding)
    if first:
        if c == 1.0:
            for k in range(m):
                out[k] = x[k]
        else:
            for k in range(m):
                out[k] = x[k] * c
    elif c == 1.0:
        for k in range(m):
            out[k] = out[k] + x[k]
    elif c == -1.0:
        for k in range(m):
            out[k] = out[k] - x[k]
    else:
        for k in range(m):
            out[k] = out[k] + x[k] * c


@_jit()
def _sub(a: np.ndarray, b: np.ndarray, out: np.ndarray, m: int) -> None:
    for k in range(m):
        out[k] = a[k] - b[k]


@_jit(_REASSOC)
def _dot(a: np.ndarray, b: np.ndarray, m: int) -> float:
    s = 0.0
    for k in range(m):
        s += np.float64(a[k]) * np.float64(b[k])
    return s


@_jit(_REASSOC)
def _absdot(a: np.ndarray, b: np.ndarray, m: int) -> float:
    s = 0.0
    for k in range(m):
        s += abs(np.float64(a[k]) * np.float64(b[k]))
    return s


@_jit(_REASSOC)
def _max_nonzero(bits: np.ndarray, m: int) -> tuple[np.uint32, int]:
    mx = np.uint32(0)
    nz = 0
    for k in range(m):
        v = bits[k] & _ABS
        mx = max(mx, v)
        nz += v != 0
    return mx, nz


@_jit(_REASSOC)
def _count1(a: np.ndarray, fa: np.uint32, m: int) -> int:
    c = 0
    for k in range(m):
        c += (a[k] & _ABS) >= fa
    return c


@_jit(_REASSOC)
def _count2(a: np.ndarray, fa: np.uint32, b: np.ndarray, fb: np.uint32, m: int) -> int:
    c = 0
    for k in range(m):
        c += ((a[k] & _ABS) >= fa) & ((b[k] & _ABS) >= fb)
    return c


@_jit()
def _histogram(bits: np.ndarray, hist: np.ndarray, m: int) -> None:
    for k in range(m):
        hist[(bits[k] & _ABS) >> np.uint32(16)] += 1


@_jit()
def _vectors(
    fw: np.ndarray, m: int, idx: np.ndarray, coef: np.ndarray, nterms: np.ndarray,
    sub: np.ndarray, t32: np.ndarray,
) -> None:  # fmt: skip
    # each task vector of one chunk (the first m columns of fw) into t32
    for i in range(idx.shape[0]):
        if sub[i]:
            _sub(fw[idx[i, 0], :m], fw[idx[i, 1], :m], t32[i, :m], m)
        else:
            t32[i, :m] = 0.0
            for q in range(nterms[i]):
                _term(fw[idx[i, q], :m], coef[i, q], t32[i, :m], m, q == 0)


@_jit()
def slab_sums(
    raw: np.ndarray, shift: np.uint32, w: int, idx: np.ndarray, coef: np.ndarray,
    nterms: np.ndarray, sub: np.ndarray, base: int, moments: bool, floor: np.ndarray,
    hist: np.ndarray, gram: np.ndarray, absgram: np.ndarray, maxbits: np.ndarray,
    nonzero: np.ndarray, both: np.ndarray, base_sq: np.ndarray,
) -> None:  # fmt: skip
    """Add the figures of the first ``w`` elements of every operand's slab.

    Args:
        raw: ``(R, >= w)`` operand bits, C-contiguous: bf16 as uint16 (``shift`` 16) or
            float32 as uint32 (``shift`` 0).
        shift: ``np.uint32``, 16 or 0.
        w: elements of the slab.
        idx: ``(N, R)`` int64, each task vector's operands, in order.
        coef: ``(N, R)`` float32, their coefficients.
        nterms: ``(N,)`` int64, terms per vector.
        sub: ``(N,)`` bool, the vector is ``op[idx[i, 0]] - op[idx[i, 1]]``.
        base: the base operand, or -1.
        moments: add the Gram sums, maxima, zeros and ``||base||^2``.
        floor: ``(N,)`` uint32 top-set thresholds (float32 bits, >= 1), or empty: no
            top-set counts.
        hist: ``(N, 2^15)`` int64 histograms of the top 15 bits of ``|t|``, or ``(0, 0)``.
        gram, absgram: ``(N, N)`` float64, upper triangles added to.
        maxbits: ``(N,)`` uint32, float32 bits of ``max |t|``.
        nonzero: ``(N,)`` int64.
        both: ``(N, N)`` int64, upper triangle added to.
        base_sq: ``(1,)`` float64.
    """
    n = idx.shape[0]
    r_all = raw.shape[0]
    top = floor.shape[0] > 0
    histogram = hist.shape[0] > 0
    wide = np.empty((r_all, CHUNK), np.uint32)
    fw = wide.view(np.float32)
    t32 = np.empty((n, CHUNK), np.float32)
    tb = t32.view(np.uint32)
    for c0 in range(0, w, CHUNK):
        m = min(w, c0 + CHUNK) - c0
        for r in range(r_all):
            _widen(raw[r, c0 : c0 + m], wide[r, :m], shift, m)
        _vectors(fw, m, idx, coef, nterms, sub, t32)
        for i in range(n):
            if moments:
                mx, nz = _max_nonzero(tb[i, :m], m)
                maxbits[i] = max(maxbits[i], mx)
                nonzero[i] += nz
                for j in range(i, n):
                    gram[i, j] += _dot(t32[i, :m], t32[j, :m], m)
                    if j > i:
                        absgram[i, j] += _absdot(t32[i, :m], t32[j, :m], m)
            if histogram:
                _histogram(tb[i, :m], hist[i], m)
            if top:
                both[i, i] += _count1(tb[i, :m], floor[i], m)
                for j in range(i + 1, n):
                    both[i, j] += _count2(tb[i, :m], floor[i], tb[j, :m], floor[j], m)
        if moments and base >= 0:
            base_sq[0] += _dot(fw[base, :m], fw[base, :m], m)


@_jit()
def magnitude_bits(
    raw: np.ndarray, shift: np.uint32, w: int, idx: np.ndarray, coef: np.ndarray,
    nterms: np.ndarray, sub: np.ndarray, out: np.ndarray,
) -> None:  # fmt: skip
    """The float32 bits of ``|t_i|`` of the first ``w`` elements into ``out`` (``(N, >= w)``
    uint32), formed as :func:`slab_sums` forms them (the top-set thresholds' sample: its
    thresholds are then compared with the very bits the pass counts). Arguments as there."""
    n = idx.shape[0]
    wide = np.empty((raw.shape[0], CHUNK), np.uint32)
    fw = wide.view(np.float32)
    t32 = np.empty((n, CHUNK), np.float32)
    tb = t32.view(np.uint32)
    for c0 in range(0, w, CHUNK):
        m = min(w, c0 + CHUNK) - c0
        for r in range(raw.shape[0]):
            _widen(raw[r, c0 : c0 + m], wide[r, :m], shift, m)
        _vectors(fw, m, idx, coef, nterms, sub, t32)
        for i in range(n):
            for k in range(m):
                out[i, c0 + k] = tb[i, k] & _ABS
