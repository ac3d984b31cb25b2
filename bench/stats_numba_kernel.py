"""An experiment, not part of streamvec: every ``stats`` figure of a slab in one numba loop.

``bench/bench_stats_kernels.py`` measures it against the numpy slab loop of
:mod:`streamvec.ops.stats.fused`. numba is not a dependency of streamvec; install it in a
separate environment to run this (``python3.11 -m venv /tmp/nb && /tmp/nb/bin/pip install
numba numpy==<streamvec's numpy>``, then run with the project's site-packages after numba's
on ``PYTHONPATH``).

The kernel takes the raw bf16 bits of every operand of a slab (``(R, w)`` uint16, as
``pread`` leaves them) and, a chunk of :data:`CHUNK` elements at a time (the chunk's float32
operands and task vectors stay in L1), widens them, forms each task vector with the same
float32 operations as :func:`streamvec.ops.stats.fused.task_vectors`, and adds the figures
of :class:`streamvec.ops.stats.accumulate.BlockSums`. Sums of float64 products are
reassociated (``fastmath={'reassoc', 'contract'}``) so that they vectorise: the products are
exact, only the order of the float64 additions differs from numpy's.

Each helper loops over 1-D arrays indexed from 0: indexing ``a[c0 + k]`` inside the chunk
loop kept LLVM from vectorising (2.4 ns per element against 0.07 for the same widening).
"""

from __future__ import annotations

import numba as nb
import numpy as np

CHUNK = 4096
_FM = {"reassoc", "contract"}
_ABS = np.uint32(0x7FFFFFFF)


@nb.njit(fastmath=_FM, cache=True)
def _widen(src, dst, m):  # type: ignore[no-untyped-def]
    for k in range(m):
        dst[k] = np.uint32(src[k]) << np.uint32(16)


@nb.njit(fastmath=_FM, cache=True)
def _sub(a, b, out, m):  # type: ignore[no-untyped-def]
    for k in range(m):
        out[k] = a[k] - b[k]


@nb.njit(cache=True)
def _term(x, c, out, m, first):  # type: ignore[no-untyped-def]
    # float32 steps in the order of fused.task_vectors (no contraction: same rounding)
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


@nb.njit(fastmath=_FM, cache=True)
def _dot(a, b, m):  # type: ignore[no-untyped-def]
    s = 0.0
    for k in range(m):
        s += np.float64(a[k]) * np.float64(b[k])
    return s


@nb.njit(fastmath=_FM, cache=True)
def _absdot(a, b, m):  # type: ignore[no-untyped-def]
    s = 0.0
    for k in range(m):
        s += abs(np.float64(a[k]) * np.float64(b[k]))
    return s


@nb.njit(fastmath=_FM, cache=True)
def _max_nonzero(bits, m):  # type: ignore[no-untyped-def]
    mx = np.uint32(0)
    nz = 0
    for k in range(m):
        v = bits[k] & _ABS
        mx = max(mx, v)
        nz += v != 0
    return mx, nz


@nb.njit(fastmath=_FM, cache=True)
def _count1(a, fa, m):  # type: ignore[no-untyped-def]
    c = 0
    for k in range(m):
        c += (a[k] & _ABS) >= fa
    return c


@nb.njit(fastmath=_FM, cache=True)
def _count2(a, fa, b, fb, m):  # type: ignore[no-untyped-def]
    c = 0
    for k in range(m):
        c += ((a[k] & _ABS) >= fa) & ((b[k] & _ABS) >= fb)
    return c


@nb.njit(fastmath=_FM, cache=True, nogil=True)
def slab_sums(  # type: ignore[no-untyped-def]
    ops, w, idx, coef, nterms, sub, base, floor, top, moments,
    gram, absgram, maxbits, nonzero, both, base_sq,
):  # fmt: skip
    """Add the figures of the first ``w`` elements of ``ops`` (``(R, >=w)`` bf16 bits).

    ``idx``/``coef``/``nterms`` (``(N, R)``, ``(N, R)``, ``(N,)``) are each task vector's
    terms, ``sub[i]`` marks a plain ``ops[idx[i, 0]] - ops[idx[i, 1]]``; ``base`` is the
    base operand or -1; ``floor`` the top-set thresholds (float32 bits, >= 1). The upper
    triangles of ``gram``, ``absgram`` and ``both`` are added to; ``base_sq`` is ``(1,)``.
    """
    n = idx.shape[0]
    r_all = ops.shape[0]
    wide = np.empty((r_all, CHUNK), np.uint32)
    fw = wide.view(np.float32)
    t32 = np.empty((n, CHUNK), np.float32)
    tb = t32.view(np.uint32)
    for c0 in range(0, w, CHUNK):
        m = min(w, c0 + CHUNK) - c0
        for r in range(r_all):
            _widen(ops[r, c0 : c0 + m], wide[r, :m], m)
        for i in range(n):
            if sub[i]:
                _sub(fw[idx[i, 0], :m], fw[idx[i, 1], :m], t32[i, :m], m)
            else:
                t32[i, :m] = 0.0
                for q in range(nterms[i]):
                    _term(fw[idx[i, q], :m], coef[i, q], t32[i, :m], m, q == 0)
        for i in range(n):
            if moments:
                mx, nz = _max_nonzero(tb[i, :m], m)
                maxbits[i] = max(maxbits[i], mx)
                nonzero[i] += nz
                for j in range(i, n):
                    gram[i, j] += _dot(t32[i, :m], t32[j, :m], m)
                    if j > i:
                        absgram[i, j] += _absdot(t32[i, :m], t32[j, :m], m)
            if top:
                both[i, i] += _count1(tb[i, :m], floor[i], m)
                for j in range(i + 1, n):
                    both[i, j] += _count2(tb[i, :m], floor[i], tb[j, :m], floor[j], m)
        if moments and base >= 0:
            base_sq[0] += _dot(fw[base, :m], fw[base, :m], m)
