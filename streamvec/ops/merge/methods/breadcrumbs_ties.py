"""Model Breadcrumbs sparsification with TIES sign election, as mergekit 0.1.5 runs it."""

from streamvec.ops.merge.gta import gta_method

METHOD = gta_method(
    name="breadcrumbs_ties",
    sparsification="magnitude_outliers",
    consensus=True,
    default_normalize=False,
    default_rescale=False,
    summary="Breadcrumbs masks per tensor, then TIES sign election and sum of agreeing entries",
    paper="Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with "
    "Sparse Masks, ECCV 2024 (arXiv:2312.06795); sign election from Yadav et al., NeurIPS 2023",
)
