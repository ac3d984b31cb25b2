"""Defaults of the randomized SVD, for the option objects that name them (``stats``, the SVD
merges) without importing the SVD itself (``dask.array``: about 0.7 s of a start-up)."""

from __future__ import annotations

# The power iterations every command uses unless told otherwise (svd, lora, decompose, the
# SVD merges, stats --spectrum): None chooses them per matrix from the measured residual
# (:func:`streamvec.compute.linalg.rsvd.converged`). Measured on realistic task-vector spectra
# (docs/decompositions.md): rank 16 stops after 2 iterations at 1.001-1.002x the exact
# residual, rank 64 after 2-3 at 1.007-1.010x, where a fixed 1 left rank 64 at 1.011-1.016x.
DEFAULT_POWER_ITERS: int | None = None
