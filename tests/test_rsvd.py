"""Tests for the streaming randomized SVD (streamvec.compute.linalg.rsvd)."""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
from dask.callbacks import Callback

from streamvec.compute.linalg import SVDResult, exact_svd, randomized_svd, sketch_width
from streamvec.compute.linalg.rsvd import randomized_svd_in_memory
from streamvec.errors import StreamvecError

M, N = 300, 200


def planted(s: np.ndarray, m: int = M, n: int = N, seed: int = 0) -> np.ndarray:
    """(m, n) float64 matrix with singular values ``s`` and random singular vectors."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))  # (m, r)
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))  # (n, r)
    return (u * s) @ v.T


def spectra() -> dict[str, np.ndarray]:
    i = np.arange(min(M, N))
    noise = np.random.default_rng(5).standard_normal((M, N))
    signal = np.r_[np.linspace(10.0, 3.0, 10), np.zeros(N - 10)]
    return {
        "geometric": planted(0.9**i).astype(np.float32),
        "polynomial": planted(1.0 / (1.0 + i)).astype(np.float32),
        # Rank-10 signal on a flat noise floor (noise sigma ~ 0.05 * (sqrt(m) + sqrt(n)) ~ 1.6):
        # for rank 20 the last 10 triplets are pure noise, the hard case for sketching.
        "lowrank+noise": (planted(signal) + 0.05 * noise).astype(np.float32),
    }


SPECTRA = spectra()


@functools.cache
def reference(name: str, rank: int) -> SVDResult:
    """Optimal rank-``rank`` SVD (float64 LAPACK) of ``SPECTRA[name]``, computed once."""
    return exact_svd(SPECTRA[name], rank)


def chunked(a: np.ndarray, rows: int = 64) -> da.Array:
    return da.from_array(a, chunks=(rows, a.shape[1]))


def direct_residual(a: np.ndarray, r: SVDResult) -> float:
    a64 = a.astype(np.float64)
    approx = (r.U.astype(np.float64) * r.S) @ r.Vh.astype(np.float64)
    return float(np.linalg.norm(a64 - approx) / np.linalg.norm(a64))


def assert_orthonormal(r: SVDResult) -> None:
    k = r.S.shape[0]
    assert r.U.dtype == np.float32 and r.Vh.dtype == np.float32 and r.S.dtype == np.float64
    np.testing.assert_allclose(r.U.T @ r.U, np.eye(k), atol=1e-5)
    np.testing.assert_allclose(r.Vh @ r.Vh.T, np.eye(k), atol=1e-5)


# Tolerance: with q = 2 power iterations the sketch sees sigma_j^5 instead of sigma_j
# (HMT Sec. 4.5 and Cor. 10.10: the error factor over optimal shrinks like
# (...)^(1/(2q+1))). Measured worst ratios over 5 seeds for these matrices are <= 1.002, and
# 1.008 for the noise-floor case at rank 20, where triplets 11-20 sit in a flat spectrum;
# 1.05 leaves margin for BLAS/seed variation while still failing without power iteration
# (q = 0 measures 1.15-1.36 here) or with a broken orthonormalisation.
RESIDUAL_TOL = 1.05


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("rank", [10, 20])
def test_near_optimal_residual_and_spectrum(name: str, rank: int) -> None:
    a = SPECTRA[name]
    ref = reference(name, rank)
    r = randomized_svd(chunked(a), rank, power_iters=2, seed=rank)
    assert r.passes == 2 + 2 * 2
    assert r.residual <= RESIDUAL_TOL * ref.residual
    assert_orthonormal(r)
    assert np.all(np.diff(r.S) <= 0)
    top = rank // 2
    np.testing.assert_allclose(r.S[:top], ref.S[:top], rtol=1e-3)
    # The reported residual is the one the factors actually achieve.
    assert abs(r.residual - direct_residual(a, r)) <= 1e-4
    assert r.frob_norm == pytest.approx(np.linalg.norm(a.astype(np.float64)), rel=1e-10)


def test_without_power_iteration_is_measurably_worse() -> None:
    # Guards the tolerance above: it must be tight enough to see the missing power iteration.
    a = SPECTRA["polynomial"]
    ref = reference("polynomial", 20)
    r = randomized_svd(chunked(a), 20, power_iters=0)
    assert r.passes == 2
    assert r.residual > RESIDUAL_TOL * ref.residual


def test_same_seed_is_bit_identical_and_seed_matters() -> None:
    a = SPECTRA["geometric"]
    r1 = randomized_svd(chunked(a), 15, seed=3)
    r2 = randomized_svd(chunked(a), 15, seed=3)
    for x, y in [(r1.U, r2.U), (r1.S, r2.S), (r1.Vh, r2.Vh)]:
        assert np.array_equal(x, y)
    assert r1.residual == r2.residual
    r3 = randomized_svd(chunked(a), 15, seed=4)
    assert not np.array_equal(r1.U, r3.U)


def test_chunking_does_not_change_the_result() -> None:
    # Omega is drawn whole, so only float64 summation order differs between chunkings.
    a = SPECTRA["geometric"]
    base = randomized_svd(chunked(a, rows=M), 15, seed=1)
    variants = [
        chunked(a, rows=37),
        chunked(a, rows=1000),
        da.from_array(a, chunks=(50, 64)),  # column chunks are merged, not a different sketch
    ]
    for A in variants:
        r = randomized_svd(A, 15, seed=1)
        np.testing.assert_allclose(r.U, base.U, atol=1e-5)
        np.testing.assert_allclose(r.S, base.S, rtol=1e-5)
        np.testing.assert_allclose(r.Vh, base.Vh, atol=1e-5)


def test_scheduler_does_not_change_the_result() -> None:
    a = SPECTRA["geometric"]
    r1 = randomized_svd(chunked(a, rows=37), 12, compute_kwargs={"scheduler": "threads"})
    r2 = randomized_svd(chunked(a, rows=37), 12, compute_kwargs={"scheduler": "synchronous"})
    np.testing.assert_allclose(r1.U, r2.U, atol=1e-6)
    np.testing.assert_allclose(r1.S, r2.S, rtol=1e-10)


def test_distributed_scheduler() -> None:
    distributed = pytest.importorskip("distributed")
    a = SPECTRA["geometric"]
    ref = randomized_svd(chunked(a, rows=37), 12)
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None
    ) as client:
        r = randomized_svd(chunked(a, rows=37), 12, compute_kwargs={"scheduler": client})
    np.testing.assert_allclose(r.U, ref.U, atol=1e-6)
    np.testing.assert_allclose(r.S, ref.S, rtol=1e-10)


def test_exactly_low_rank_matrix() -> None:
    a = planted(np.array([5.0, 4.0, 3.0, 2.0, 1.0])).astype(np.float32)  # rank 5 < K = 12
    r = randomized_svd(chunked(a, rows=40), 12)
    assert r.residual < 1e-5
    assert direct_residual(a, r) < 1e-5
    np.testing.assert_allclose(r.S[:5], [5.0, 4.0, 3.0, 2.0, 1.0], rtol=1e-5)
    assert np.all(r.S[5:] < 1e-5)
    assert_orthonormal(r)  # Householder QR keeps Q orthonormal for a rank-deficient sketch


def test_zero_matrix() -> None:
    a = np.zeros((60, 40), dtype=np.float32)
    r = randomized_svd(chunked(a, rows=16), 5)
    assert r.frob_norm == 0.0 and r.residual == 0.0
    assert np.array_equal(r.S, np.zeros(5))
    assert np.isfinite(r.U).all() and np.isfinite(r.Vh).all()
    assert_orthonormal(r)
    e = exact_svd(a, 5)
    assert e.residual == 0.0 and e.frob_norm == 0.0


def _unprotected_power_iteration(a: np.ndarray, rank: int, width: int, q: int) -> np.ndarray:
    """Textbook (A A^T)^q A Omega without re-orthonormalisation (HMT Alg. 4.3), float64."""
    a64 = a.astype(np.float64)
    y = a64 @ np.random.default_rng(0).standard_normal((a.shape[1], width))
    for _ in range(q):
        y = a64 @ (a64.T @ y)
    qm, _ = np.linalg.qr(y)
    return np.linalg.svd(qm.T @ a64, compute_uv=False)[:rank]


def test_float32_with_four_power_iterations_keeps_accuracy() -> None:
    # sigma_j = 10^(-j/4): sigma_20 / sigma_1 ~ 1e-5 (still well above float32 storage
    # noise). After 4 unprotected iterations the sketch columns are scaled by sigma^9, so
    # everything past the first few directions falls below float64 rounding; the
    # re-orthonormalised iteration must not notice.
    a = planted(10.0 ** (-np.arange(N) / 4.0)).astype(np.float32)
    ref = exact_svd(a, 20)
    r = randomized_svd(chunked(a, rows=48), 20, power_iters=4)
    assert r.passes == 10
    assert r.residual <= RESIDUAL_TOL * ref.residual
    np.testing.assert_allclose(r.S, ref.S, rtol=1e-3)
    assert_orthonormal(r)
    # The matrix really exercises the failure mode: the naive iteration loses the tail.
    naive = _unprotected_power_iteration(a, 20, 30, 4)
    assert np.max(np.abs(naive - ref.S) / ref.S) > 0.1


class _ComputeCounter(Callback):
    """Counts scheduler runs (one per ``dask.compute`` call with a local scheduler)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def _start(self, dsk: Any) -> None:
        self.count += 1


@pytest.mark.parametrize("power_iters", [0, 1, 3])
def test_each_chunk_is_read_once_per_pass(power_iters: int) -> None:
    a = SPECTRA["geometric"]
    calls: Counter[int] = Counter()
    bounds = [*range(0, M, 45), M]

    def read_block(i: int) -> np.ndarray:
        calls[i] += 1
        return a[bounds[i] : bounds[i + 1]]

    A = da.concatenate(
        [
            da.from_delayed(
                dask.delayed(read_block)(i), shape=(hi - lo, N), dtype=a.dtype, name=f"blk-{i}"
            )
            for i, (lo, hi) in enumerate(itertools.pairwise(bounds))
        ],
        axis=0,
    )
    with _ComputeCounter() as counter:
        r = randomized_svd(A, 10, power_iters=power_iters)
    assert r.passes == 2 + 2 * power_iters
    assert counter.count == r.passes
    assert dict(calls) == {i: r.passes for i in range(len(bounds) - 1)}
    ref = randomized_svd(chunked(a), 10, power_iters=power_iters)
    np.testing.assert_allclose(r.S, ref.S, rtol=1e-6)


def test_exact_svd_matches_lapack() -> None:
    a = SPECTRA["polynomial"]
    r = exact_svd(a, 7)
    u, s, vh = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(r.S, s[:7], rtol=1e-12)
    signs = np.sign(np.sum(r.U * u[:, :7], axis=0))  # same vectors up to sign
    np.testing.assert_allclose(r.U, u[:, :7] * signs, atol=1e-6)
    np.testing.assert_allclose(r.Vh, vh[:7] * signs[:, None], atol=1e-6)
    idx = np.argmax(np.abs(r.U), axis=0)
    assert np.all(r.U[idx, np.arange(7)] > 0)  # sign convention
    assert r.passes == 1
    expected = np.sqrt(np.sum(s[7:] ** 2)) / np.linalg.norm(s)
    assert r.residual == pytest.approx(expected, rel=1e-8)
    assert abs(r.residual - direct_residual(a, r)) <= 1e-5


def test_sign_convention_randomized() -> None:
    r = randomized_svd(chunked(SPECTRA["geometric"]), 10)
    idx = np.argmax(np.abs(r.U), axis=0)
    assert np.all(r.U[idx, np.arange(10)] > 0)


def test_sketch_width() -> None:
    assert sketch_width(10, 5, 300, 200) == 15
    assert sketch_width(10, 50, 300, 40) == 40
    assert sketch_width(10, 50, 30, 400) == 30


def test_sketch_clipped_to_matrix_size() -> None:
    a = planted(np.linspace(3.0, 1.0, 12), m=40, n=12).astype(np.float32)
    r = randomized_svd(chunked(a, rows=7), 12, oversample=10)  # l = min(22, 40, 12) = 12
    assert r.residual < 1e-5
    assert_orthonormal(r)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": -3}, "rank"),
        ({"rank": N + 1}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": 5, "oversample": -1}, "oversample"),
        ({"rank": 5, "power_iters": -1}, "power_iters"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    A = chunked(SPECTRA["geometric"])
    with pytest.raises(StreamvecError, match=match):
        randomized_svd(A, **kwargs)


def test_bad_matrices() -> None:
    with pytest.raises(StreamvecError, match="2-D"):
        randomized_svd(da.zeros((10,), chunks=5), 1)
    with pytest.raises(StreamvecError, match="2-D"):
        randomized_svd(da.zeros((4, 4, 4), chunks=2), 1)
    with pytest.raises(StreamvecError, match="dask"):
        randomized_svd(np.zeros((4, 4)), 1)  # type: ignore[arg-type]
    with pytest.raises(StreamvecError, match="real"):
        randomized_svd(da.zeros((4, 4), dtype=np.complex64, chunks=2), 1)
    bad = np.ones((20, 10), dtype=np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(StreamvecError, match="NaN"):
        randomized_svd(chunked(bad, rows=5), 2)
    with pytest.raises(StreamvecError, match="NaN"):
        exact_svd(bad, 2)
    with pytest.raises(StreamvecError, match="rank"):
        exact_svd(bad, 11)
    with pytest.raises(StreamvecError, match="2-D"):
        exact_svd(np.zeros(5), 1)


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_in_memory_variant_matches_the_streamed_one(name: str) -> None:
    """Whole-matrix products: the streamed algorithm's result to float32 rounding (both run
    their large products in float32, summed in another order)."""
    a = SPECTRA[name]
    streamed = randomized_svd(chunked(a), 20, power_iters=2, seed=3)
    held = randomized_svd_in_memory(a, 20, power_iters=2, seed=3)
    assert held.passes == streamed.passes == 6
    np.testing.assert_allclose(held.S, streamed.S, rtol=1e-6)
    # Same sign convention: the vectors agree entry by entry (float32 storage).
    np.testing.assert_allclose(held.U, streamed.U, atol=1e-5)
    np.testing.assert_allclose(held.Vh, streamed.Vh, atol=1e-5)
    assert held.residual <= RESIDUAL_TOL * reference(name, 20).residual
    assert abs(held.residual - direct_residual(a, held)) <= 1e-4
    assert_orthonormal(held)
    again = randomized_svd_in_memory(a, 20, power_iters=2, seed=3)
    assert np.array_equal(again.U, held.U) and np.array_equal(again.S, held.S)


def test_in_memory_variant_refuses_non_finite_values() -> None:
    a = SPECTRA["geometric"].copy()
    a[3, 4] = np.nan
    with pytest.raises(StreamvecError, match="NaN or infinite"):
        randomized_svd_in_memory(a, 5)


def test_sum_of_squares_does_not_depend_on_blas_threads() -> None:
    """Norms (and so residual attrs) must be the same bits in every process."""
    import math

    from streamvec.compute.linalg.blas import limit_blas_threads
    from streamvec.compute.linalg.rsvd import sum_of_squares

    a = np.random.default_rng(0).standard_normal((1500, 2001))
    with limit_blas_threads(1):
        one = sum_of_squares(a)
    with limit_blas_threads(2):
        two = sum_of_squares(a)
    assert one == two
    assert one == pytest.approx(math.fsum((a * a).ravel()), rel=1e-13)


@pytest.mark.parametrize("case", ["well-conditioned", "graded", "rank-deficient", "zero"])
def test_orthonormal_basis_spans_the_sketch(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CholeskyQR2 (or Householder where it cannot) gives an orthonormal Q with Y's span."""
    from streamvec.compute.linalg.rsvd import _orthonormal

    householder_calls: list[int] = []
    real_qr = np.linalg.qr

    def counted_qr(a: np.ndarray) -> Any:
        householder_calls.append(1)
        return real_qr(a)

    monkeypatch.setattr(np.linalg, "qr", counted_qr)

    rng = np.random.default_rng(11)
    y = rng.standard_normal((3000, 30))
    if case == "graded":
        y *= 0.6 ** np.arange(30)  # condition number ~ 4e6: CholeskyQR2 still applies
    elif case == "rank-deficient":
        y = y[:, :5] @ rng.standard_normal((5, 30))  # rank 5 < 30 columns
    elif case == "zero":
        y = np.zeros_like(y)
    q = _orthonormal(y)
    assert q.shape == y.shape
    assert bool(householder_calls) == (case in ("rank-deficient", "zero"))
    np.testing.assert_allclose(q.T @ q, np.eye(30), atol=1e-12)
    # Y lies in Q's span: the projection leaves it unchanged (Householder's Q as reference).
    np.testing.assert_allclose(q @ (q.T @ y), y, atol=1e-10 * max(1.0, np.abs(y).max()))
    if case in ("well-conditioned", "graded"):
        householder, _ = real_qr(y)
        np.testing.assert_allclose(np.abs(q.T @ householder), np.eye(30), atol=1e-10)


def test_in_memory_variant_on_a_matrix_of_lower_rank_than_its_sketch() -> None:
    """An exact rank-3 task vector (sketch of 15 columns): the Householder fallback, exact."""
    rng = np.random.default_rng(12)
    a = (rng.standard_normal((400, 3)) @ rng.standard_normal((3, 300))).astype(np.float32)
    r = randomized_svd_in_memory(a, 5, oversample=10, power_iters=1)
    exact = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(r.S[:3], exact[:3], rtol=1e-5)
    assert np.all(r.S[3:] <= 1e-4 * exact[0])
    assert direct_residual(a, r) <= 1e-5
