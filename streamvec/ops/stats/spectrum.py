"""Spectra of task-vector matrices: top-K singular values, effective ranks, shared subspaces.

Per matrix (a tensor with >= 2 axes, seen as ``shape[0] x prod(shape[1:])``, as SVD stores
factor it) and task vector, the top ``K`` singular triplets come either

* from an SVD store term (``streamvec svd`` output): its stored ``S`` and ``U`` are read, no
  factorization runs, and the original's Frobenius norm recorded by ``svd`` measures what
  the stored rank leaves out; or
* with ``--spectrum K``: from :class:`streamvec.ops.svd.Factorizer` (randomized SVD of
  Halko et al. under the memory budget, or exact for small matrices), the same code
  ``streamvec svd`` runs.

From them: the rank a LoRA needs for a given residual energy (the smallest ``r`` with
``1 - sum_{k<=r} s_k^2 / ||tau||_F^2 <= e``; ``||tau||_F`` is exact, from the main pass), the
stable rank ``||tau||_F^2 / s_1^2``, the entropy effective rank of the top K
(``exp(-sum p_k log p_k)``, ``p = s / sum s``; Roy and Vetterli 2007) and the subspace overlap
``||U_i^T U_j||_F^2 / K`` of two task vectors' top-K left singular vectors (1: the same
subspace; about ``K / m`` for unrelated random ones).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamvec.compute.linalg.defaults import DEFAULT_POWER_ITERS
from streamvec.io.zarr.lowrank import LowRankReader, is_factored_shape
from streamvec.ops.stats.inputs import TensorTerms


@dataclass(frozen=True)
class Spectrum:
    """The top singular values of one task vector's matrix.

    Attributes:
        s: singular values, descending (float64).
        energy: ``||tau||_F^2`` the residuals are measured against (for an SVD store term:
            the original's, as recorded by ``streamvec svd``; else the exact main-pass figure).
        source: ``svd-store``, ``randomized`` or ``exact``.
    """

    s: np.ndarray
    energy: float
    source: str

    def residual(self) -> np.ndarray:
        """Residual energy share after each rank ``r = 1..k``: ``1 - cumsum(s^2) / energy``."""
        if self.energy <= 0:
            return np.zeros(self.s.shape)
        return np.clip(1.0 - np.cumsum(self.s**2) / self.energy, 0.0, 1.0)

    def rank_for(self, residual: float) -> int | None:
        """Smallest rank whose residual energy share is ``<= residual``; None if above K."""
        if self.energy <= 0:
            return 0
        res = self.residual()
        hit = np.flatnonzero(res <= residual + 1e-12)
        return int(hit[0]) + 1 if hit.size else None

    def stable_rank(self) -> float:
        """``||tau||_F^2 / s_1^2`` (exact up to ``s_1``'s accuracy); 0 for a zero matrix."""
        return self.energy / float(self.s[0]) ** 2 if self.s.size and self.s[0] > 0 else 0.0

    def entropy_rank(self) -> float:
        """``exp(entropy of s / sum s)`` over the top K values (at most K)."""
        total = float(self.s.sum())
        if total <= 0:
            return 0.0
        p = self.s[self.s > 0] / total
        return float(math.exp(-(p * np.log(p)).sum()))


def subspace_overlap(u_i: np.ndarray, u_j: np.ndarray) -> float:
    """``||U_i^T U_j||_F^2 / k`` with ``k`` the smaller of the two ranks (0..1)."""
    k = min(u_i.shape[1], u_j.shape[1])
    if k == 0:
        return float("nan")
    m = u_i[:, :k].astype(np.float64).T @ u_j[:, :k].astype(np.float64)  # (k, k)
    return float((m * m).sum() / k)


def store_factors(t: TensorTerms, i: int) -> LowRankReader | None:
    """The SVD-store reader task vector ``i`` of ``t`` is, when it is exactly one."""
    lazy = t.vectors[i]
    if len(lazy.terms) == 1 and lazy.terms[0][0] == 1.0:
        reader = lazy.terms[0][1]
        if isinstance(reader, LowRankReader):
            return reader
    return None


def _stored(reader: LowRankReader, energy: float) -> tuple[Spectrum, np.ndarray]:
    import zarr

    from streamvec.io.blocks import matrix_shape

    # through the reader: chunks are checked against their recorded checksums
    u, s, _ = reader.factors(0, matrix_shape(reader.shape)[0])  # (m, k), (k,), (k, n)
    svd = zarr.open_group(reader.store, path=reader.group_path, mode="r").attrs.get("svd")
    recorded = svd.get("frob_norm") if isinstance(svd, dict) else None
    if isinstance(recorded, int | float) and recorded > 0:
        energy = float(recorded) ** 2
    return Spectrum(np.asarray(s, np.float64).reshape(-1), energy, "svd-store"), u


@dataclass(frozen=True)
class SpectrumOptions:
    """How to factor matrices for ``--spectrum K``."""

    rank: int = 0
    oversample: int = 10
    power_iters: int | None = DEFAULT_POWER_ITERS
    seed: int = 0


def spectra(
    tensors: tuple[TensorTerms, ...],
    energies: dict[str, np.ndarray],
    options: SpectrumOptions,
    run: Any,
) -> Iterator[tuple[str, list[Spectrum | None], np.ndarray]]:
    """Per matrix: each vector's spectrum (None: none available) and the subspace overlaps.

    Args:
        tensors: the lined-up tensors.
        energies: per tensor, ``(N,)`` exact ``||tau_i||_F^2`` from the main pass.
        options: ``rank`` 0 reads SVD store terms only.
        run: the :class:`~streamvec.engine.settings.Settings` of the SVD (workers, memory
            budget, scheduler).

    Yields:
        ``(name, spectra, overlaps)`` with ``overlaps`` ``(N, N)`` (NaN where a vector has no
        factors).
    """
    wanted = [
        t
        for t in tensors
        if is_factored_shape(t.shape)
        and (
            options.rank > 0 or any(store_factors(t, i) is not None for i in range(len(t.vectors)))
        )
    ]
    if not wanted:
        return  # without importing the SVD (dask.array: most of a stats start-up)
    from streamvec.ops.svd import Factorizer, SVDOptions, dask_compute_kwargs, tensor_seed

    workers = run.resolved_workers()
    svd_options = SVDOptions(
        rank=max(options.rank, 1),
        oversample=options.oversample,
        power_iters=options.power_iters,
        seed=options.seed,
    )
    with dask_compute_kwargs(run.scheduler, workers) as kw:
        factorizer = Factorizer(svd_options, run, kw)
        for t in wanted:
            n = len(t.vectors)
            found: list[Spectrum | None] = []
            us: list[np.ndarray | None] = []
            for i in range(n):
                energy = float(energies[t.name][i])
                reader = store_factors(t, i)
                if reader is not None:
                    spec, u = _stored(reader, energy)
                elif options.rank > 0:
                    seed = tensor_seed(options.seed, t.name, str(i))
                    result, plan = factorizer.factor(t.vectors[i], options.rank, seed)
                    spec = Spectrum(result.S.astype(np.float64), energy, plan.method)
                    u = result.U
                else:
                    found.append(None)
                    us.append(None)
                    continue
                found.append(spec)
                # a zero matrix has no singular directions: its U is arbitrary
                us.append(u if spec.s.size and spec.s[0] > 0 else None)
            overlaps = np.full((n, n), np.nan)
            for i in range(n):
                for j in range(i, n):
                    ui, uj = us[i], us[j]
                    if ui is not None and uj is not None:
                        overlaps[i, j] = overlaps[j, i] = subspace_overlap(ui, uj)
            if any(f is not None for f in found):
                yield t.name, found, overlaps
