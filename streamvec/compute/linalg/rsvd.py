"""Streaming randomized SVD of a row-chunked matrix that does not fit in memory.

The matrix ``A`` (m x n) is a :class:`dask.array.Array` chunked along its rows only; every
chunk is produced by re-reading files, so each *pass* over ``A`` re-executes its graph.
The algorithm is randomized subspace iteration, Algorithm 4.4 of

    N. Halko, P.-G. Martinsson and J. A. Tropp, "Finding structure with randomness:
    Probabilistic algorithms for constructing approximate matrix decompositions",
    SIAM Review 53(2):217-288, 2011,

followed by their Algorithm 5.1 (direct SVD of the small projected matrix ``B = Q^T A``).
Each pass is one ``dask.compute`` call whose graph maps every row block to a small partial
result (``A_i @ Omega``, ``A_i^T Q_i``, ``Q_i^T A_i``); nothing but output-sized arrays
(m x l, n x l, l x n with l = rank + oversample) is ever held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from streamvec.compute.linalg.blas import limit_blas_threads
from streamvec.compute.linalg.defaults import DEFAULT_POWER_ITERS
from streamvec.errors import StreamvecError

__all__ = [
    "DEFAULT_POWER_ITERS",
    "SVDResult",
    "exact_svd",
    "randomized_svd",
    "randomized_svd_in_memory",
    "sketch_width",
]


@dataclass(frozen=True)
class SVDResult:
    """A truncated SVD ``A ~= U @ diag(S) @ Vh`` and how good it is.

    Attributes:
        U: (m, k) float32, orthonormal columns (left singular vectors).
        S: (k,) float64, singular values in descending order.
        Vh: (k, n) float32, orthonormal rows (right singular vectors).
        frob_norm: ``||A||_F`` in float64, accumulated during a pass over ``A``.
        residual: relative Frobenius residual ``||A - U S Vh||_F / ||A||_F`` (0 when A == 0).
        passes: number of passes over ``A`` (``dask.compute`` calls) the result cost.
        power_iters: subspace iterations used (chosen by :func:`converged` when not forced).
    """

    U: np.ndarray
    S: np.ndarray
    Vh: np.ndarray
    frob_norm: float
    residual: float
    passes: int
    power_iters: int = 0


# Automatic power iterations: stop when the next iteration is predicted to improve the
# residual by less than this fraction, and never run more than MAX_POWER_ITERS.
POWER_TOL = 0.005
MAX_POWER_ITERS = 6


def converged(previous: float, current: float, ritz: np.ndarray, rank: int) -> bool:
    """Whether another subspace iteration is not worth its two passes.

    Subspace iteration shrinks the excess residual geometrically, by about
    ``rho = (sigma_{l+1} / sigma_k)^2`` per iteration (HMT Sec. 4.5, Thm. 9.2), estimated from
    the Ritz values of the sketch (``ritz[l-1] / ritz[k-1]``). With ``d`` the improvement
    the last iteration brought, what is left is about ``rho / (1 - rho) * d``: stop when that
    is under :data:`POWER_TOL` of the residual (or the last step gained less than that).

    Args:
        previous: the relative residual before the last iteration.
        current: the relative residual after it.
        ritz: the singular values of ``B = Q^T A`` (``l`` of them, descending).
        rank: the kept rank ``k``.

    Returns:
        True to stop iterating.
    """
    if current <= 0.0:
        return True
    gain = max(previous - current, 0.0) / current
    if gain < POWER_TOL:
        return True
    top, tail = float(ritz[rank - 1]), float(ritz[-1])
    rho = (tail / top) ** 2 if top > 0 else 1.0
    return rho < 1.0 and rho / (1.0 - rho) * gain < POWER_TOL


def _relative_residual(sq_norm: float, s: np.ndarray) -> float:
    if sq_norm <= 0:
        return 0.0
    return float(np.sqrt(max(0.0, sq_norm - float(np.sum(s**2))) / sq_norm))


def sketch_width(rank: int, oversample: int, m: int, n: int) -> int:
    """Number of random probe vectors ``l``: ``min(rank + oversample, m, n)``.

    More than ``min(m, n)`` probes cannot span anything more, so the sketch is clipped.

    Args:
        rank: target rank ``k``.
        oversample: extra probes ``p`` (HMT Sec. 4.2 recommend 5-10).
        m: rows of ``A``.
        n: columns of ``A``.

    Returns:
        The sketch width ``l``.
    """
    return min(rank + oversample, m, n)


def randomized_svd(
    A: da.Array,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int | None = None,
    seed: int = 0,
    compute_kwargs: Mapping[str, Any] | None = None,
) -> SVDResult:
    """Rank-``rank`` SVD of a row-chunked dask array by randomized subspace iteration.

    Implements Halko, Martinsson & Tropp (2011), Algorithm 4.4 (randomized subspace
    iteration, i.e. power iteration with re-orthonormalisation after *every* product with
    ``A`` or ``A^T``) and Algorithm 5.1 (SVD of ``B = Q^T A``):

    1. ``Omega ~ N(0, 1)^(n x l)``; ``Y = A @ Omega`` and ``||A||_F^2``; ``Q = qr(Y)``. (1 pass)
    2. ``B^T = A^T Q`` (1 pass), which gives the residual of the current ``Q``; then, while
       iterating: ``Z = qr(B^T)``; ``Q = qr(A @ Z)`` (1 pass) and back to 2.
    3. ``B = Ub S Vh``; ``U = Q Ub``.

    so ``A`` is read exactly ``2 + 2 * q`` times for ``q`` iterations. Each pass is one
    ``dask.compute`` over per-row-block tasks, so only a few blocks are in memory at once.

    The large products run in float32 (float64 for a float64 ``A``), the precision the
    matrix is stored in; the test matrix, QR factors, ``B``'s SVD and norms are float64.
    That keeps the residual at the float64 algorithm's to ~6 digits at a fraction of the
    time (block products are bound by BLAS throughput, twice as high in float32).

    ``Omega`` is drawn from ``np.random.default_rng(seed)`` as one ``(n, l)`` float64 array,
    so the result does not depend on the chunking of ``A`` or on the scheduler. All small
    factors are float64 and every block is upcast to float64 inside its block product.
    Signs are fixed (the largest-magnitude entry of each column of ``U`` is positive), so
    the same input and seed give bit-identical output.

    Args:
        A: (m, n) dask array, chunked along axis 0 (column chunks are merged first).
        rank: target rank ``k``, ``1 <= k <= min(m, n)``.
        oversample: extra probe vectors ``p >= 0``; the sketch has ``min(k + p, m, n)``.
        power_iters: number of subspace iterations ``q >= 0``. Each sharpens the spectral
            decay seen by the sketch from ``sigma_j`` to ``sigma_j^(2q+1)`` at 2 passes.
            None: at least one, then until :func:`converged` says the next would not pay.
        seed: seed of the Gaussian test matrix.
        compute_kwargs: keyword arguments for every ``dask.compute`` call, e.g.
            ``{"scheduler": "threads", "num_workers": 4}``.

    Returns:
        An :class:`SVDResult` with ``k`` triplets; ``passes == 2 + 2 * q``.

    Raises:
        StreamvecError: ``A`` is not a 2-D real dask array, ``rank`` is out of range,
            ``oversample`` or ``power_iters`` is negative, or ``A`` has non-finite values.
    """
    if not isinstance(A, da.Array):
        raise StreamvecError(
            f"randomized_svd needs a dask.array.Array, got {type(A).__name__}; "
            "use exact_svd for an in-memory array"
        )
    m, n = _check_matrix_shape(A.shape, A.dtype)
    _check_rank(rank, m, n)
    _check_count(oversample, "oversample")
    if power_iters is not None:
        _check_count(power_iters, "power_iters")
    kwargs = dict(compute_kwargs or {})
    width = sketch_width(rank, oversample, m, n)

    if A.numblocks[1] != 1:
        # One task per row block; merging column chunks is a graph change, not a pass.
        A = A.rechunk({1: -1})
    blocks: list[Delayed] = list(A.to_delayed().ravel())

    passes = 0

    def run_pass(tasks: Sequence[Delayed]) -> tuple[Any, ...]:
        # One pass == one dask.compute: A's chunks are re-read once each and released as
        # soon as their (small) partial result exists.
        nonlocal passes
        passes += 1
        return tuple(dask.compute(*tasks, **kwargs))

    # The whole (n, l) test matrix from one generator: independent of chunks and scheduler.
    omega = np.random.default_rng(seed).standard_normal((n, width))  # (n, l)

    first = run_pass(_blockwise(_times_norm, blocks, dask.delayed(omega)))  # [(m_i, l), .]
    y_blocks = [y for y, _ in first]
    sq_norm = 0.0
    for _, sq in first:
        sq_norm += sq  # in block order: the same bits whatever the scheduler
    if not np.isfinite(sq_norm) or not all(np.isfinite(y).all() for y in y_blocks):
        raise StreamvecError("randomized_svd: A contains NaN or infinite values")
    q_blocks = _tsqr(y_blocks)  # [(m_i, l)]
    iters, previous = 0, np.inf
    while True:
        # B^T = A^T Q: the projection of A on the sketch (its SVD gives the factors) and the
        # next power iteration's first half, from one pass.
        (bt,) = run_pass([_tree_sum(_blockwise(_t_times, blocks, q_blocks), _add)])  # (n, l)
        ub, s, vh = np.linalg.svd(bt.T, full_matrices=False)  # (l, l), (l,), (l, n)
        current = _relative_residual(sq_norm, s[:rank])
        if power_iters is not None:
            if iters == power_iters:
                break
        elif iters >= MAX_POWER_ITERS or (iters > 0 and converged(previous, current, s, rank)):
            break
        # Re-orthonormalise after each product: the unprotected (A A^T)^q A Omega pushes
        # every direction below sigma_1 * eps^(1/(2q+1)) into rounding noise (HMT Sec. 4.5).
        z, _ = np.linalg.qr(bt)  # (n, l): output-sized like Vh, so a plain in-memory QR
        y_blocks = list(run_pass(_blockwise(_times, blocks, dask.delayed(z))))  # [(m_i, l)]
        q_blocks = _tsqr(y_blocks)
        iters, previous = iters + 1, current
    u = np.concatenate([q @ ub[:, :rank] for q in q_blocks], axis=0)  # (m, k)
    return _finish(u, s[:rank], vh[:rank], sq_norm, passes, iters)


def randomized_svd_in_memory(
    a: np.ndarray,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int | None = None,
    seed: int = 0,
) -> SVDResult:
    """:func:`randomized_svd` of a matrix already in memory: whole-matrix BLAS products.

    The same algorithm, test matrix, precisions and conventions as :func:`randomized_svd`,
    but each product is one BLAS call over the whole matrix (every BLAS thread) and each QR
    one LAPACK call, instead of a Dask pass of per-block tasks. Two things make it as fast as
    ``torch.svd_lowrank`` on the same matrix (docs/decompositions.md):

    * the small factorizations (QR of the ``(m, l)`` and ``(n, l)`` sketches, SVD of an
      ``(l, l)`` factor) run on one BLAS thread: they are memory-bound panel operations, and
      OpenBLAS's threads on a loaded machine made them 10-20x slower, not faster;
    * ``B = Q^T A`` is never factored as an ``(l, n)`` matrix: its transpose ``A^T Q`` is
      QR-factored (``Z R``) for the next iteration anyway, so ``B = R^T Z^T`` and the SVD of
      the ``(l, l)`` ``R^T`` gives ``B``'s (``Vh = Vr^T Z^T``), as LAPACK's gesdd would do
      internally, without a second factorization of the wide matrix per iteration.

    The factors agree with the streamed ones to float32 rounding (the sums are ordered
    differently), not bit for bit; the same input, seed and machine give the same output.

    Args:
        a: (m, n) real array (float32 unless it is float64; no float64 copy is made).
        rank: target rank ``k``, ``1 <= k <= min(m, n)``.
        oversample: extra probe vectors ``p >= 0``.
        power_iters: subspace iterations ``q >= 0``; None: chosen as in
            :func:`randomized_svd`.
        seed: seed of the Gaussian test matrix.

    Returns:
        An :class:`SVDResult`; ``passes == 2 + 2 * q`` (over the matrix in memory).

    Raises:
        StreamvecError: as :func:`randomized_svd`.

    Example:
        >>> a = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)
        >>> randomized_svd_in_memory(a, 5).U.shape
        (300, 5)
    """
    a = np.asarray(a)
    m, n = _check_matrix_shape(a.shape, a.dtype)
    _check_rank(rank, m, n)
    _check_count(oversample, "oversample")
    if power_iters is not None:
        _check_count(power_iters, "power_iters")
    aw = _work(a)  # (m, n)
    sq_norm = sum_of_squares(aw)
    if not np.isfinite(sq_norm):
        raise StreamvecError("randomized_svd: A contains NaN or infinite values")
    width = sketch_width(rank, oversample, m, n)
    omega = np.random.default_rng(seed).standard_normal((n, width))  # as randomized_svd
    q = _orthonormal(_product(aw, omega))  # (m, l)
    iters, previous = 0, np.inf
    while True:
        bt = _product(aw.T, q)  # (n, l) = B^T
        with limit_blas_threads(1):
            z, r = np.linalg.qr(bt)  # (n, l), (l, l): B = R^T Z^T
            ur, s, vrh = np.linalg.svd(r.T)  # (l, l) each: B = Ur S (Vr^T Z^T)
        current = _relative_residual(sq_norm, s[:rank])
        if power_iters is not None:
            if iters == power_iters:
                break
        elif iters >= MAX_POWER_ITERS or (iters > 0 and converged(previous, current, s, rank)):
            break
        # Re-orthonormalised after each product (HMT Sec. 4.5): Z is the next right sketch.
        q = _orthonormal(_product(aw, z))  # (m, l)
        iters, previous = iters + 1, current
    u = q @ ur[:, :rank]  # (m, k)
    vh = vrh[:rank] @ z.T  # (k, n)
    return _finish(u, s[:rank], vh, sq_norm, 2 + 2 * iters, iters)


# CholeskyQR2 is accepted when the first pass left Q within this of orthonormal (its Gram
# matrix's distance from I, Frobenius): the second pass then restores orthogonality to
# rounding (Yamamoto et al. 2015); a larger distance means Y was too ill-conditioned for it.
_CHOLESKY_QR_SLACK = 0.1


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of a tall-skinny ``y`` (m, l), on one BLAS thread.

    CholeskyQR2: ``R = chol(Y^T Y)``, ``Q = Y R^-1``, done twice. Its work is two products
    of BLAS level 3, which measured 3x faster than LAPACK's Householder QR (the panel
    factorization of ``np.linalg.qr`` is memory-bound) on sketches of 4096-32000 rows and
    74 columns, with the same orthogonality (docs/decompositions.md). A sketch too
    ill-conditioned for it (rank-deficient: a task vector of lower rank than the sketch, or
    zero) gets the Householder QR.
    """
    with limit_blas_threads(1):
        q = y
        for step in range(2):
            g = q.T @ q
            if step == 1 and not np.linalg.norm(g - np.eye(g.shape[0])) <= _CHOLESKY_QR_SLACK:
                break  # (a NaN or infinity fails the test too)
            try:
                r = np.linalg.cholesky(g).T  # upper, G = R^T R
            except np.linalg.LinAlgError:
                break
            q = q @ np.linalg.inv(r)
        else:
            return q
        householder, _ = np.linalg.qr(y)
    return householder


def exact_svd(a: np.ndarray, rank: int) -> SVDResult:
    """Truncated SVD of an in-memory matrix (float64 LAPACK): the fast path for small ``A``.

    Same conventions as :func:`randomized_svd` (float32 factors, float64 ``S``, sign
    convention, residual from ``||A||^2 - sum S^2``), so the two are interchangeable.

    Args:
        a: (m, n) real array.
        rank: number of triplets kept, ``1 <= rank <= min(m, n)``.

    Returns:
        An :class:`SVDResult` with ``passes == 1`` (the array is read once).

    Raises:
        StreamvecError: ``a`` is not 2-D real, ``rank`` is out of range, or ``a`` has
            non-finite values.
    """
    a = np.asarray(a)
    m, n = _check_matrix_shape(a.shape, a.dtype)
    _check_rank(rank, m, n)
    a64 = a.astype(np.float64, copy=False)  # (m, n)
    if not np.isfinite(a64).all():
        raise StreamvecError("exact_svd: a contains NaN or infinite values")
    u, s, vh = np.linalg.svd(a64, full_matrices=False)  # (m, r), (r,), (r, n)
    return _finish(u[:, :rank], s[:rank], vh[:rank], sum_of_squares(a64), 1)


# --------------------------------------------------------------------------- helpers


def sum_of_squares(a: np.ndarray, chunk_elements: int = 1 << 16) -> float:
    """``||a||_F^2`` in float64, the same bits whatever BLAS threading is in effect.

    ``np.vdot`` of a large array is a threaded BLAS ``ddot`` whose partial sums depend on
    the thread count, so the reported norm and residual changed between a process with
    BLAS limited to one thread and one without. numpy's own (pairwise) sums over fixed row
    chunks, added in order, do not. Chunks are small (512 KiB in float64) because each is
    upcast on its own: a float32 block never gets a whole float64 copy.
    """
    flat = np.asarray(a).reshape(-1)  # float64 chunk by chunk: no whole float64 copy
    total = 0.0
    for start in range(0, flat.size, chunk_elements):
        part = flat[start : start + chunk_elements].astype(np.float64)
        total += float(np.sum(part * part))
    return total


def _check_matrix_shape(shape: tuple[int, ...], dtype: Any) -> tuple[int, int]:
    if len(shape) != 2:
        raise StreamvecError(f"SVD needs a 2-D matrix, got shape {tuple(shape)}")
    if np.dtype(dtype).kind in "cOSUMm":
        raise StreamvecError(f"SVD needs a real numeric matrix, got dtype {np.dtype(dtype)}")
    return int(shape[0]), int(shape[1])


def _check_rank(rank: int, m: int, n: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise StreamvecError(f"rank must be an integer, got {rank!r}")
    if not 1 <= rank <= min(m, n):
        raise StreamvecError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")


def _check_count(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise StreamvecError(f"{name} must be a non-negative integer, got {value!r}")


def _blockwise(func: Callable[..., Any], blocks: Sequence[Delayed], other: Any) -> list[Delayed]:
    """One delayed ``func(A_i, other_i)`` per row block; ``other`` is shared or per-block."""
    if isinstance(other, list | tuple):
        return [dask.delayed(func)(blk, o) for blk, o in zip(blocks, other, strict=True)]
    return [dask.delayed(func)(blk, other) for blk in blocks]


def _tree_sum(parts: list[Delayed], combine: Callable[[Any, Any], Any]) -> Delayed:
    """Pairwise (binary tree) reduction of per-block partials, depth ``log2(#blocks)``.

    A tree instead of a left fold lets pairs combine as soon as both are done, so at most
    about one partial per worker is waiting, and the rounding error grows like log(#blocks).
    """
    level = parts
    while len(level) > 1:
        nxt = [dask.delayed(combine)(a, b) for a, b in zip(level[::2], level[1::2], strict=False)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _work(block: Any) -> np.ndarray:
    """A block in its working precision: float32, or float64 when stored as float64."""
    a = np.asarray(block)
    return a.astype(np.float64 if a.dtype == np.float64 else np.float32, copy=False)


def _product(a: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``a @ right`` in ``a``'s working precision, returned as float64 for the QR."""
    return (a @ right.astype(a.dtype, copy=False)).astype(np.float64)


def _times(block: Any, right: np.ndarray) -> np.ndarray:
    return _product(_work(block), right)  # (m_i, n) @ (n, l) -> (m_i, l)


def _times_norm(block: Any, right: np.ndarray) -> tuple[np.ndarray, float]:
    a_i = _work(block)  # (m_i, n)
    return _product(a_i, right), sum_of_squares(a_i)  # (m_i, l), ||A_i||_F^2


def _t_times(block: Any, q_i: np.ndarray) -> np.ndarray:
    return _product(_work(block).T, q_i)  # (n, m_i) @ (m_i, l) -> (n, l)


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def _tsqr(blocks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Orthonormalise a tall-skinny matrix given as row blocks (one-level TSQR).

    ``Y_i = Q_i R_i`` per block, then ``[R_1; ...; R_b] = Q_s R``, so
    ``Y = diag(Q_1..Q_b) Q_s R`` and the blocks of the orthonormal factor are
    ``Q_i @ Q_s[rows of R_i]``. This is Householder QR organised as a tree (Demmel et al.,
    "Communication-optimal parallel and sequential QR and LU factorizations", SISC 2012), so
    it is as stable as a QR of the whole ``Y`` -- unlike Cholesky-QR via ``Y^T Y``, which
    squares the condition number that power iteration already makes huge. It needs no
    (m, l) concatenation, and ``Q`` comes back split along ``A``'s row chunks, ready for the
    next pass. Householder QR returns orthonormal columns even when ``Y`` is rank-deficient
    (e.g. ``A`` of rank < l, or ``A == 0``).

    Args:
        blocks: row blocks ``Y_i`` of shape (m_i, l), with ``sum m_i >= l``.

    Returns:
        Row blocks (m_i, l) of ``Q`` with ``Q^T Q = I``.
    """
    factors = [np.linalg.qr(y) for y in blocks]  # Q_i (m_i, r_i), R_i (r_i, l), r_i=min(m_i,l)
    q_small, _ = np.linalg.qr(np.concatenate([f.R for f in factors], axis=0))  # (sum r_i, l)
    out: list[np.ndarray] = []
    start = 0
    for f in factors:
        r_i = f.Q.shape[1]
        out.append(f.Q @ q_small[start : start + r_i])  # (m_i, l)
        start += r_i
    return out


def _fix_signs(u: np.ndarray, vh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make the largest-|.| entry of each column of ``u`` positive; flip ``vh`` rows to match.

    Singular vectors are defined up to a joint sign; fixing it makes equal inputs give
    identical outputs whatever LAPACK or the sketch happened to choose.
    """
    if u.shape[0] == 0 or u.shape[1] == 0:
        return u, vh
    cols = np.arange(u.shape[1])
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), cols])  # (k,)
    signs[signs == 0] = 1.0
    return u * signs, vh * signs[:, None]


def _finish(
    u: np.ndarray,
    s: np.ndarray,
    vh: np.ndarray,
    sq_norm: float,
    passes: int,
    power_iters: int = 0,
) -> SVDResult:
    u, vh = _fix_signs(u, vh)
    # Why sqrt(||A||^2 - sum S^2) is the exact residual: U S Vh = Q B_k with B = Q^T A and
    # B_k its best rank-k part, so A - U S Vh = (I - Q Q^T) A + Q (B - B_k). The two terms
    # have columns in range(Q)^perp and range(Q), hence are Frobenius-orthogonal, and with
    # ||Q Q^T A|| = ||B||: ||A - U S Vh||^2 = ||A||^2 - ||B||^2 + ||B||^2 - sum S_k^2. (For
    # exact_svd, Q = I.) It holds for the float64 factors; casting U, Vh to float32 adds
    # ~1e-7 relative, and the subtraction cancels to ~1e-8 when the residual is tiny.
    residual = _relative_residual(sq_norm, s)
    return SVDResult(
        U=u.astype(np.float32),
        S=np.asarray(s, dtype=np.float64),
        Vh=vh.astype(np.float32),
        frob_norm=float(np.sqrt(sq_norm)),
        residual=residual,
        passes=passes,
        power_iters=power_iters,
    )
