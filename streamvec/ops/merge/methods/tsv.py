"""Task Singular Vectors merging (TSV-M), run by :mod:`streamvec.ops.merge_svd`."""

from __future__ import annotations

import os
from typing import Any

from streamvec.ops.merge.method import MergeMethod, RunSettings
from streamvec.ops.merge.recipe import MergeRequest
from streamvec.ops.merge.svd_bridge import SVD_PARAMS, run_svd_merge


def run(request: MergeRequest, output: str | os.PathLike[str], settings: RunSettings) -> Any:
    return run_svd_merge("tsv", request, output, settings)


METHOD = MergeMethod(
    name="tsv",
    summary="TSV-M: per-task top singular triplets, orthogonalised bases, base + lambda * "
    "U_perp diag(S) V_perp^T per matrix (non-matrices averaged)",
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model "
    "Merging, CVPR 2025",
    params=SVD_PARAMS,
    run=run,
    notes="no per-model weights; see docs/decompositions.md",
)
