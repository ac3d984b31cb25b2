"""Tests for the math on SVD factors (streamvec.compute.linalg.factors)."""

from __future__ import annotations

import numpy as np
import pytest

from streamvec.compute.linalg import common_subspace, iso_c_merge, split_shared_unique, tsv_merge
from streamvec.errors import StreamvecError

M, N, K = 300, 200, 8
EPS32 = float(np.finfo(np.float32).eps)


def orth(x: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(x)
    return q


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def projector(c: np.ndarray) -> np.ndarray:
    """(m, m) projector: fine as a test reference at m = 300."""
    return c @ c.T


def assert_shared_plus_unique_is_tau(
    tau: np.ndarray, shared: np.ndarray, unique: np.ndarray
) -> None:
    tau32 = tau.astype(np.float32)
    assert shared.dtype == np.float32 and unique.dtype == np.float32
    # unique is defined as the float32 difference...
    assert np.array_equal(unique, tau32 - shared)
    # ...so adding it back is off by at most one rounding of each operation.
    scale = np.maximum(np.abs(tau32), np.maximum(np.abs(shared), np.abs(unique)))
    assert np.all(np.abs((shared + unique) - tau32) <= 2 * EPS32 * scale)


# --------------------------------------------------------------------------- common_subspace


def test_identical_bases_share_everything() -> None:
    u = orth(rng().standard_normal((M, K)))  # (m, k)
    rot = orth(rng(1).standard_normal((K, K)))  # same span, different basis
    c = common_subspace([u, u @ rot, u.astype(np.float32)])
    assert c.shape == (M, K)
    np.testing.assert_allclose(c.T @ c, np.eye(K), atol=1e-10)
    np.testing.assert_allclose(projector(c), projector(u), atol=1e-6)
    # Identical task vectors living in that span are entirely shared.
    tau = (u @ rng(2).standard_normal((K, N))).astype(np.float32)  # (m, n), rank k
    shared, unique = split_shared_unique(tau, c)
    np.testing.assert_allclose(shared, tau, atol=1e-5)
    assert np.max(np.abs(unique)) < 1e-5
    assert_shared_plus_unique_is_tau(tau, shared, unique)


def test_orthogonal_subspaces_share_nothing() -> None:
    q = orth(rng().standard_normal((M, 3 * K)))
    us = [q[:, :K], q[:, K : 2 * K], q[:, 2 * K :]]
    c = common_subspace(us)
    assert c.shape == (M, 0)
    tau = rng(1).standard_normal((M, N)).astype(np.float32)
    shared, unique = split_shared_unique(tau, c)
    assert np.array_equal(shared, np.zeros_like(tau))
    assert np.array_equal(unique, tau)


def test_single_basis_is_its_own_common_subspace() -> None:
    u = orth(rng().standard_normal((M, K)))
    c = common_subspace([u])
    np.testing.assert_allclose(projector(c), projector(u), atol=1e-10)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_planted_shared_direction_is_recovered(noise: float) -> None:
    g = rng(7)
    shared_dir = orth(g.standard_normal((M, 1)))[:, 0]  # (m,)
    us = []
    for _ in range(4):
        d = shared_dir + noise * g.standard_normal(M) / np.sqrt(M)  # slightly tilted copy
        us.append(orth(np.column_stack([d, g.standard_normal((M, K - 1))])))
    c = common_subspace(us)
    assert c.shape == (M, 1)
    assert abs(float(c[:, 0] @ shared_dir)) > 0.99
    # A task vector = shared part along that direction + task-specific rest.
    specific = us[1][:, 1:] @ g.standard_normal((K - 1, N))  # (m, n)
    tau = (np.outer(shared_dir, g.standard_normal(N)) * 3.0 + specific).astype(np.float32)
    shared, unique = split_shared_unique(tau, c)
    ref = c @ (c.T @ tau.astype(np.float64))
    np.testing.assert_allclose(shared, ref, atol=1e-5)
    assert np.abs(c.T @ unique.astype(np.float64)).max() < 1e-4  # unique is orthogonal to C
    assert_shared_plus_unique_is_tau(tau, shared, unique)


def test_eigenvalue_is_the_cos2_overlap_and_threshold_applies() -> None:
    # Two 2-D subspaces sharing e0 exactly and e1 at angle theta (cos^2 = 0.8).
    e = np.eye(M)
    cos = np.sqrt(0.8)
    u1 = e[:, [0, 1]]
    u2 = np.column_stack([e[:, 0], cos * e[:, 1] + np.sqrt(1 - cos**2) * e[:, 2]])
    assert common_subspace([u1, u2], threshold=0.85).shape == (M, 1)
    assert common_subspace([u1, u2], threshold=0.79).shape == (M, 2)
    assert common_subspace([u1, u2], threshold=1.0).shape == (M, 1)  # exact overlap 1 kept
    c = common_subspace([u1, u2])
    np.testing.assert_allclose(np.abs(c[:, 0]), e[:, 0], atol=1e-12)
    assert c[0, 0] > 0  # sign convention


def test_shared_plus_unique_on_random_data() -> None:
    g = rng(3)
    c = orth(g.standard_normal((M, 5)))
    for scale in (1e-3, 1.0, 1e4):
        tau = (scale * g.standard_normal((M, N))).astype(np.float32)
        assert_shared_plus_unique_is_tau(tau, *split_shared_unique(tau, c))
    vec = g.standard_normal(M).astype(np.float32)  # 1-D (bias) task vectors work too
    shared, unique = split_shared_unique(vec, c)
    assert shared.shape == (M,)
    assert_shared_plus_unique_is_tau(vec, shared, unique)


def test_common_subspace_errors() -> None:
    u = orth(rng().standard_normal((M, K)))
    with pytest.raises(StreamvecError, match="at least one"):
        common_subspace([])
    with pytest.raises(StreamvecError, match="rows"):
        common_subspace([u, orth(rng(1).standard_normal((M - 1, K)))])
    with pytest.raises(StreamvecError, match="orthonormal"):
        common_subspace([u, 2.0 * u])
    with pytest.raises(StreamvecError, match="threshold"):
        common_subspace([u], threshold=0.0)
    with pytest.raises(StreamvecError, match="threshold"):
        common_subspace([u], threshold=1.5)
    with pytest.raises(StreamvecError, match="2-D"):
        common_subspace([u[:, 0]])
    with pytest.raises(StreamvecError, match="match"):
        split_shared_unique(np.zeros((M + 1, 3)), u)


# --------------------------------------------------------------------------- merges


def task_vectors(t: int = 3, m: int = 60, n: int = 40) -> list[np.ndarray]:
    g = rng(11)
    # Each with a decaying spectrum so the truncation is meaningful.
    return [
        (g.standard_normal((m, n)) * (0.8 ** np.arange(n))) @ orth(g.standard_normal((n, n)))
        for _ in range(t)
    ]


def naive_polar(x: np.ndarray) -> np.ndarray:
    """Polar factor from the *full* SVD: x = P diag(s) Qh, polar = P[:, :K] @ Qh."""
    p, _, qh = np.linalg.svd(x, full_matrices=True)  # (m, m), (K,), (K, K)
    return p[:, : x.shape[1]] @ qh


def naive_tsv(taus: list[np.ndarray], rank: int) -> np.ndarray:
    k = rank // len(taus)
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = np.linalg.svd(tau.astype(np.float64), full_matrices=True)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_perp = naive_polar(np.hstack(us))
    v_perp = naive_polar(np.hstack(vs))
    return u_perp @ np.diag(np.concatenate(ss)) @ v_perp.T


def thin_svd(x: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    return (u, s, vh) if k is None else (u[:, :k], s[:k], vh[:k])


@pytest.mark.parametrize("rank", [3, 30, 40])
def test_tsv_merge_matches_naive_formula(rank: int) -> None:
    taus = task_vectors()
    merged = tsv_merge([thin_svd(t) for t in taus], rank=rank)
    expected = naive_tsv(taus, rank)
    assert merged.dtype == np.float32 and merged.shape == (60, 40)
    np.testing.assert_allclose(merged, expected, atol=1e-5 * np.abs(expected).max())


def test_tsv_merge_default_rank_and_short_factors() -> None:
    taus = task_vectors()
    full = tsv_merge([thin_svd(t) for t in taus])  # r = min(m, n) = 40 -> 13 per task
    np.testing.assert_allclose(full, naive_tsv(taus, 39), atol=1e-5 * np.abs(full).max())
    # Truncated factors with fewer than r/T triplets contribute all they have.
    short = tsv_merge([thin_svd(t, 5) for t in taus])
    np.testing.assert_allclose(short, naive_tsv(taus, 15), atol=1e-5 * np.abs(short).max())


def test_tsv_polar_factor_is_orthonormal_procrustes() -> None:
    # Independent check of the polar factor: U (U^T U)^(-1/2) via eigh.
    x = rng(4).standard_normal((50, 12))
    w, v = np.linalg.eigh(x.T @ x)
    ref = x @ (v / np.sqrt(w)) @ v.T
    np.testing.assert_allclose(naive_polar(x), ref, atol=1e-10)
    # A single task with orthonormal factors is returned unchanged (polar of an
    # orthonormal matrix is itself): TSV-M of one task = its truncated SVD.
    tau = task_vectors(1)[0]
    u, s, vh = thin_svd(tau, 10)
    np.testing.assert_allclose(tsv_merge([(u, s, vh)], rank=10), (u * s) @ vh, atol=1e-5)


def test_iso_c_merge_matches_naive_formula() -> None:
    tau_sum = np.sum(task_vectors(), axis=0)  # (60, 40)
    u, s, vh = np.linalg.svd(tau_sum, full_matrices=True)  # (60, 60), (40,), (40, 40)
    r = s.shape[0]
    expected = u[:, :r] @ (np.mean(s) * np.eye(r)) @ vh
    merged = iso_c_merge(thin_svd(tau_sum))
    assert merged.dtype == np.float32
    np.testing.assert_allclose(merged, expected, atol=1e-5 * np.abs(expected).max())
    # Isotropic: every singular value equals the mean of the original spectrum.
    np.testing.assert_allclose(np.linalg.svd(merged, compute_uv=False), np.mean(s), rtol=1e-5)
    # Truncated input: rank-r result, spectrum flattened to the mean of the top r.
    trunc = iso_c_merge(thin_svd(tau_sum, 10))
    sv = np.linalg.svd(trunc, compute_uv=False)
    np.testing.assert_allclose(sv[:10], np.mean(s[:10]), rtol=1e-5)
    assert np.all(sv[10:] < 1e-4)


def test_merge_errors() -> None:
    taus = task_vectors()
    factors = [thin_svd(t) for t in taus]
    with pytest.raises(StreamvecError, match="rank"):
        tsv_merge(factors, rank=2)  # fewer than one triplet per task
    with pytest.raises(StreamvecError, match="at least one"):
        tsv_merge([])
    u, s, vh = factors[1]
    with pytest.raises(StreamvecError, match="matrix"):
        tsv_merge([factors[0], (u[:-1], s, vh)])
    with pytest.raises(StreamvecError, match="expected"):
        tsv_merge([(u, s[:-1], vh)])
    with pytest.raises(StreamvecError, match="expected"):
        iso_c_merge((u, s, vh[:, :, None]))
    with pytest.raises(StreamvecError, match="at least one"):
        iso_c_merge((u[:, :0], s[:0], vh[:0]))


@pytest.mark.parametrize(
    ("m", "n", "ranks"), [(40, 30, (2, 3)), (8, 50, (4, 4, 4)), (6, 5, (3, 4))]
)
def test_stacked_lowrank_svd_is_the_exact_svd_of_the_sum(
    m: int, n: int, ranks: tuple[int, ...]
) -> None:
    from streamvec.compute.linalg.factors import stacked_lowrank_svd

    rng = np.random.default_rng(7)
    parts = [(rng.normal(size=(m, r)), rng.normal(size=(r, n))) for r in ranks]
    dense = sum(a @ b for a, b in parts)
    u, s, vh, norm = stacked_lowrank_svd(parts)
    want = np.linalg.svd(dense, compute_uv=False)
    k = min(sum(ranks), m, n)
    np.testing.assert_allclose(s[:k], want[:k], rtol=1e-10, atol=1e-12 * want[0])
    np.testing.assert_allclose((u * s) @ vh, dense, atol=1e-10 * np.abs(dense).max())
    assert abs(norm - np.linalg.norm(dense)) <= 1e-12 * norm
    np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-12)
