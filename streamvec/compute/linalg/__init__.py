"""Decompositions of large matrices: streaming randomized SVD and math on SVD factors."""

from streamvec.compute.linalg.factors import (
    common_subspace,
    iso_c_merge,
    split_shared_unique,
    tsv_merge,
)
from streamvec.compute.linalg.rsvd import (
    DEFAULT_POWER_ITERS,
    SVDResult,
    exact_svd,
    randomized_svd,
    sketch_width,
)

__all__ = [
    "DEFAULT_POWER_ITERS",
    "SVDResult",
    "common_subspace",
    "exact_svd",
    "iso_c_merge",
    "randomized_svd",
    "sketch_width",
    "split_shared_unique",
    "tsv_merge",
]
