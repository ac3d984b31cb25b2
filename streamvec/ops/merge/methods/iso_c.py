"""Isotropic merging (Iso-C), run by :mod:`streamvec.ops.merge_svd`."""

from __future__ import annotations

import os
from typing import Any

from streamvec.ops.merge.method import MergeMethod, RunSettings
from streamvec.ops.merge.recipe import MergeRequest
from streamvec.ops.merge.svd_bridge import SVD_PARAMS, run_svd_merge


def run(request: MergeRequest, output: str | os.PathLike[str], settings: RunSettings) -> Any:
    return run_svd_merge("iso-c", request, output, settings)


METHOD = MergeMethod(
    name="iso_c",
    summary="Iso-C: SVD of sum_i tau_i with a flat spectrum, base + lambda * mean(S) U V^T "
    "per matrix (non-matrices averaged)",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces, ICML 2025",
    params=SVD_PARAMS,
    run=run,
    notes="no per-model weights; see docs/decompositions.md",
)
