"""TIES-Merging as mergekit 0.1.5 runs it: per-tensor top-k, sign election, disjoint mean."""

from streamvec.ops.merge.gta import gta_method

METHOD = gta_method(
    name="ties",
    sparsification="magnitude",
    consensus=True,
    default_normalize=True,
    default_rescale=False,
    summary="trim each task vector to its top-density magnitudes per tensor, elect signs by "
    "summed mass, average the agreeing entries",
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 "
    "(arXiv:2306.01708)",
    notes="top-k per tensor (the paper trims over the whole model: see ties_paper); ties in "
    "magnitude broken by position",
)
