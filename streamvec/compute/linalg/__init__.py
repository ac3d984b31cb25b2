"""Decompositions of large matrices: streaming randomized SVD and math on SVD factors.

The names below are imported on first use: the SVD brings ``dask.array`` (about 0.7 s), and
its submodules (``blas``, ``defaults``) are imported by commands that never factor.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "common_subspace": "factors",
    "iso_c_merge": "factors",
    "split_shared_unique": "factors",
    "tsv_merge": "factors",
    "DEFAULT_POWER_ITERS": "defaults",
    "SVDResult": "rsvd",
    "exact_svd": "rsvd",
    "randomized_svd": "rsvd",
    "sketch_width": "rsvd",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
