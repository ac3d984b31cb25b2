"""DELLA-Merging (MagPrune + sign election) as mergekit 0.1.5 runs it."""

from streamvec.ops.merge.gta import gta_method

METHOD = gta_method(
    name="della",
    sparsification="della_magprune",
    consensus=True,
    default_normalize=True,
    default_rescale=True,
    summary="drop entries at random with keep probability rising with magnitude rank per row "
    "(density +- epsilon), L1 rescale, elect signs, average the agreeing entries",
    paper="Deep et al., DELLA-Merging: Reducing Interference in Model Merging through "
    "Magnitude-Based Sampling, arXiv:2406.11617, 2024",
    notes="rescale restores the L1 norm per tensor (mergekit); the paper divides each kept "
    "entry by its keep probability",
)
