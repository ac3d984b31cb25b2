"""Model Breadcrumbs as mergekit 0.1.5 runs it: drop outliers and small entries per tensor."""

from streamvec.ops.merge.gta import gta_method

METHOD = gta_method(
    name="breadcrumbs",
    sparsification="magnitude_outliers",
    consensus=False,
    default_normalize=False,
    default_rescale=False,
    summary="per tensor, drop the largest gamma fraction of each task vector and enough of the "
    "smallest to keep density; weighted sum",
    paper="Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with "
    "Sparse Masks, ECCV 2024 (arXiv:2312.06795)",
    notes="mergekit's parametrisation (density kept, gamma dropped on top; density 1 keeps "
    "everything); the paper's percentiles: see breadcrumbs_paper",
)
