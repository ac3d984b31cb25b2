"""In-memory math on SVD factors of several task vectors of one weight matrix.

Everything here works on thin factors: (m, k) bases, (k,) spectra and small k x k
matrices. No (m, m) projector is ever formed; projections are two thin products
``C @ (C^T @ x)``.

Task vectors ``tau_i = theta_i - theta_0`` (Ilharco et al., "Editing Models with Task
Arithmetic", ICLR 2023) of one (m, n) matrix are assumed to come with their truncated SVDs
``tau_i ~= U_i diag(S_i) Vh_i`` (see :mod:`streamvec.compute.linalg.rsvd`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from streamvec.errors import StreamvecError

__all__ = [
    "common_subspace",
    "iso_c_merge",
    "split_shared_unique",
    "stacked_lowrank_svd",
    "tsv_merge",
]

# How far U^T U may be from I before a "basis" is rejected. Loose on purpose: float32
# factors from randomized_svd are orthonormal to ~1e-6; this only catches a non-basis
# (e.g. U @ diag(S) passed by mistake).
_ORTHO_TOL = 1e-3


def common_subspace(us: Sequence[np.ndarray], *, threshold: float = 0.85) -> np.ndarray:
    """Orthonormal basis of the directions shared by every task's left singular subspace.

    Operator: restricted to ``span(U_1)``, use the symmetric chain

        M = U_1^T P_2 P_3 ... P_T ... P_3 P_2 U_1,   P_j = U_j U_j^T,

    whose quadratic form is ``w^T M w = ||P_T ... P_2 U_1 w||^2``: the fraction of the energy
    of ``U_1 w`` that survives projecting successively onto every other task's subspace.
    It is 1 exactly when ``U_1 w`` lies in all the subspaces, at most
    ``cos^2(angle(U_1 w, span U_2))``, and so a cos^2-like overlap in [0, 1]. With the
    Gram matrices ``G_ij = U_i^T U_j`` the chain telescopes to

        M = L L^T,   L = G_12 G_23 ... G_(T-1)T   (k_1 x k_T),

    so only (k x k_j) products are needed beyond the thin Grams, and the eigenpairs of
    ``M`` are read off the SVD ``L = W diag(sigma) Z^T`` (eigenvalues ``sigma^2``) without
    squaring the condition number. We use this one symmetric ordering (tasks as given) rather
    than averaging over the T! orderings: it is cheap, symmetric PSD by construction, and
    exactly-common directions get eigenvalue 1 under any ordering. For approximately-common
    directions the eigenvalue does depend on the order (through cross terms between the
    tasks' misalignments), so tasks should be passed in a fixed order for reproducibility.

    Args:
        us: T >= 1 bases ``U_i`` of shape (m, k_i) with orthonormal columns (float, any
            precision), e.g. each task's top-k left singular vectors.
        threshold: keep eigenvectors with eigenvalue (cos^2 overlap) ``>= threshold``,
            ``0 < threshold <= 1``.

    Returns:
        ``C = U_1 @ W_kept``, float64 of shape (m, s) with orthonormal columns, ordered by
        decreasing overlap; ``s`` may be 0 (shape (m, 0)).

    Raises:
        StreamvecError: no bases, shapes disagree, a basis is not orthonormal, or the
            threshold is outside (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise StreamvecError(f"threshold must be in (0, 1], got {threshold}")
    bases = [_check_basis(u, i) for i, u in enumerate(us)]
    if not bases:
        raise StreamvecError("common_subspace needs at least one basis")
    m = bases[0].shape[0]
    for i, u in enumerate(bases):
        if u.shape[0] != m:
            raise StreamvecError(f"basis {i} has {u.shape[0]} rows, basis 0 has {m}")
    u1 = bases[0]  # (m, k_1)
    if any(u.shape[1] == 0 for u in bases):
        return np.zeros((m, 0))

    chain = np.eye(u1.shape[1])  # (k_1, k_1); L for T == 1
    for prev, nxt in itertools.pairwise(bases):
        chain = chain @ (prev.T @ nxt)  # (k_1, k_j) @ (k_j, k_(j+1)) -> (k_1, k_(j+1))
    w, sigma, _ = np.linalg.svd(chain, full_matrices=False)  # (k_1, r), (r,)
    eig = np.clip(sigma**2, 0.0, 1.0)  # eigenvalues of M = L L^T, descending
    keep = eig >= threshold
    c = u1 @ w[:, keep]  # (m, s)
    return _fix_column_signs(c)


def split_shared_unique(tau: np.ndarray, shared_basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a task vector into its part in a shared subspace and the rest.

    ``shared = C (C^T tau)`` is evaluated as two thin products in float64 (never the
    (m, m) projector ``C C^T``) and rounded to float32. ``unique`` is *defined* as
    ``tau - shared`` computed in float32 from the float32 ``tau`` and ``shared``, so
    ``shared + unique`` reproduces ``tau`` to within float32 rounding (one rounding in the
    subtraction and one in the re-addition; exact equality is not guaranteed by IEEE
    arithmetic), and recomputing ``tau - shared`` gives ``unique`` bit for bit.

    Args:
        tau: (m, n) or (m,) task vector; taken as float32.
        shared_basis: (m, s) orthonormal basis ``C`` (e.g. from :func:`common_subspace`),
            ``s`` may be 0.

    Returns:
        ``(shared, unique)``, both float32 with the shape of ``tau``.

    Raises:
        StreamvecError: shapes disagree.
    """
    tau32 = np.asarray(tau, dtype=np.float32)
    c = np.asarray(shared_basis, dtype=np.float64)
    if c.ndim != 2:
        raise StreamvecError(f"shared_basis must be 2-D (m, s), got shape {c.shape}")
    if tau32.ndim not in (1, 2) or tau32.shape[0] != c.shape[0]:
        raise StreamvecError(
            f"tau of shape {tau32.shape} does not match shared_basis of shape {c.shape}"
        )
    coeffs = c.T @ tau32.astype(np.float64)  # (s, n) or (s,)
    shared = (c @ coeffs).astype(np.float32)  # (m, n) or (m,)
    unique = tau32 - shared  # float32: the definition of `unique`
    return shared, unique


def tsv_merge(
    factors: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], rank: int | None = None
) -> np.ndarray:
    """Task Singular Vectors merge (TSV-M) of one matrix.

    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
    CVPR 2025. Each of the T tasks keeps its top ``k = floor(r / T)`` singular triplets; the
    concatenated bases ``U = [U_1 .. U_T]`` (m x Tk) and ``V = [V_1 .. V_T]`` (n x Tk) are
    decorrelated by replacing each with its orthogonal polar factor (the closest matrix with
    orthonormal columns, Procrustes): ``U = P Sigma Q^T -> U_perp = P Q^T``, likewise
    ``V_perp``. The merged update is ``U_perp diag([S_1 .. S_T]) V_perp^T``. The paper's
    global scaling coefficient alpha is left to the caller.

    Args:
        factors: per task ``(U_i, S_i, Vh_i)`` with shapes (m, k_i), (k_i,), (k_i, n) and
            ``S_i`` in descending order (the truncated SVD of ``tau_i``). A task with fewer
            than ``k`` triplets contributes all it has.
        rank: total rank budget ``r``; ``None`` means ``min(m, n)``. Must be ``>= T``.

    Returns:
        The merged (m, n) update, float32 (computed in float64).

    Raises:
        StreamvecError: no factors, inconsistent shapes, or ``rank`` < number of tasks.
    """
    if not factors:
        raise StreamvecError("tsv_merge needs at least one task's factors")
    checked = [_check_factors(f, i) for i, f in enumerate(factors)]
    m, n = checked[0][0].shape[0], checked[0][2].shape[1]
    for i, (u, _, vh) in enumerate(checked):
        if u.shape[0] != m or vh.shape[1] != n:
            raise StreamvecError(
                f"task {i} factors are for a {u.shape[0]} x {vh.shape[1]} matrix, "
                f"task 0 for {m} x {n}"
            )
    n_tasks = len(checked)
    budget = min(m, n) if rank is None else rank
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer):
        raise StreamvecError(f"rank must be an integer or None, got {rank!r}")
    if budget < n_tasks:
        raise StreamvecError(
            f"rank {budget} leaves no singular triplet per task for {n_tasks} tasks "
            f"(need rank >= {n_tasks})"
        )
    k = int(budget) // n_tasks
    u_cat = np.concatenate([u[:, :k] for u, _, _ in checked], axis=1)  # (m, K)
    s_cat = np.concatenate([s[:k] for _, s, _ in checked])  # (K,)
    v_cat = np.concatenate([vh[:k].T for _, _, vh in checked], axis=1)  # (n, K)
    u_perp = _polar(u_cat)  # (m, K)
    v_perp = _polar(v_cat)  # (n, K)
    return ((u_perp * s_cat) @ v_perp.T).astype(np.float32)  # (m, n)


def iso_c_merge(tau_sum_svd: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Iso-C merge: the task-arithmetic sum with an isotropic (flattened) spectrum.

    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025. Given ``sum_i tau_i = U diag(S) Vh``, every
    singular value is replaced by their mean: ``merged = mean(S) * U @ Vh``, so no task's
    dominant directions drown the others'. The paper's scaling coefficient alpha is left to
    the caller.

    What the caller passes defines the result: with the full thin SVD (``min(m, n)``
    triplets) this is the paper's Iso-C, ``mean(S) = ||sum tau||_* / min(m, n)`` (for a
    rank-deficient sum, null-space directions with ``S == 0`` also get weight ``mean(S)``,
    as in the paper's formula). With a rank-r truncation (e.g. from ``randomized_svd``) the
    spectrum is flattened only on the top-r subspace, the mean is over those r values
    (hence larger), and the result has rank r.

    Args:
        tau_sum_svd: ``(U, S, Vh)`` of the summed task vector, shapes (m, k), (k,), (k, n),
            ``k >= 1``.

    Returns:
        The merged (m, n) update, float32 (computed in float64).

    Raises:
        StreamvecError: inconsistent shapes or no singular triplet.
    """
    u, s, vh = _check_factors(tau_sum_svd, 0)
    if s.shape[0] == 0:
        raise StreamvecError("iso_c_merge needs at least one singular triplet")
    return ((u * float(np.mean(s))) @ vh).astype(np.float32)  # (m, n)


# --------------------------------------------------------------------------- helpers


def stacked_lowrank_svd(
    parts: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Exact SVD of ``sum_i L_i @ R_i`` from the factors, never forming the (m, n) matrix.

    With ``L = [L_1 | L_2 | ...]`` (m, K) and ``R = [R_1; R_2; ...]`` (K, n), ``K = sum k_i``:
    ``L = Q_l T_l`` and ``R^T = Q_r T_r`` (thin QR), so ``L R = Q_l (T_l T_r^T) Q_r^T`` and
    the SVD of the K x K core ``T_l T_r^T = U_c S V_c^T`` gives ``L R = (Q_l U_c) S
    (Q_r V_c)^T``: exact, in O((m + n) K^2) time and (m + n) K memory. This is how several
    LoRA updates ``w_i s_i B_i A_i`` of one layer merge into one (rank <= K).

    Args:
        parts: ``(L_i (m, k_i), R_i (k_i, n))`` pairs, weights and scalings folded into L_i.

    Returns:
        ``(U (m, K'), S (K',), Vh (K', n), frob_norm)`` in float64, ``K' = min(K, m, n)``,
        singular values descending, and ``||sum L_i R_i||_F``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> a, b = rng.normal(size=(6, 2)), rng.normal(size=(2, 5))
        >>> u, s, vh, norm = stacked_lowrank_svd([(a, b), (-a, b)])
        >>> bool(np.allclose(s, 0.0))
        True
    """
    left = np.concatenate([np.asarray(p[0], np.float64) for p in parts], axis=1)  # (m, K)
    right = np.concatenate([np.asarray(p[1], np.float64) for p in parts], axis=0)  # (K, n)
    q_l, t_l = np.linalg.qr(left)  # (m, K'), (K', K)
    q_r, t_r = np.linalg.qr(right.T)  # (n, K''), (K'', K)
    core = t_l @ t_r.T  # (K', K'')
    u_c, s, vh_c = np.linalg.svd(core, full_matrices=False)
    u = q_l @ u_c  # (m, k)
    vh = vh_c @ q_r.T  # (k, n)
    return u, s, vh, float(np.linalg.norm(core))


def _check_basis(u: np.ndarray, index: int) -> np.ndarray:
    u64 = np.asarray(u, dtype=np.float64)
    if u64.ndim != 2:
        raise StreamvecError(f"basis {index} must be 2-D (m, k), got shape {u64.shape}")
    if u64.shape[1] > u64.shape[0]:
        raise StreamvecError(f"basis {index} has more columns than rows: {u64.shape}")
    gram_err = np.abs(u64.T @ u64 - np.eye(u64.shape[1]))  # (k, k)
    if gram_err.size and float(gram_err.max()) > _ORTHO_TOL:
        raise StreamvecError(
            f"basis {index} does not have orthonormal columns (max |U^T U - I| = "
            f"{float(gram_err.max()):.2e})"
        )
    return u64


def _check_factors(
    f: tuple[np.ndarray, np.ndarray, np.ndarray], index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        u, s, vh = (np.asarray(x, dtype=np.float64) for x in f)
    except (TypeError, ValueError):
        raise StreamvecError(f"factors {index} must be a (U, S, Vh) triple") from None
    if u.ndim != 2 or s.ndim != 1 or vh.ndim != 2 or not u.shape[1] == s.shape[0] == vh.shape[0]:
        raise StreamvecError(
            f"factors {index}: expected U (m, k), S (k,), Vh (k, n), got "
            f"{u.shape}, {s.shape}, {vh.shape}"
        )
    return u, s, vh


def _polar(x: np.ndarray) -> np.ndarray:
    """Orthogonal polar factor ``P Q^T`` of ``x = P Sigma Q^T`` (thin SVD, float64)."""
    p, _, qh = np.linalg.svd(x, full_matrices=False)  # (rows, K), (K, K) for rows >= K
    return p @ qh


def _fix_column_signs(c: np.ndarray) -> np.ndarray:
    # A basis is defined up to the sign of each column; fix it for reproducible outputs.
    if c.shape[0] == 0 or c.shape[1] == 0:
        return c
    signs = np.sign(c[np.argmax(np.abs(c), axis=0), np.arange(c.shape[1])])  # (s,)
    signs[signs == 0] = 1.0
    return c * signs
