"""DELLA's MagPrune with a plain weighted sum, as mergekit 0.1.5 runs it."""

from streamvec.ops.merge.gta import gta_method

METHOD = gta_method(
    name="della_linear",
    sparsification="della_magprune",
    consensus=False,
    default_normalize=False,
    default_rescale=True,
    summary="DELLA MagPrune sparsification, L1 rescale, weighted sum",
    paper="Deep et al., DELLA-Merging: Reducing Interference in Model Merging through "
    "Magnitude-Based Sampling, arXiv:2406.11617, 2024",
)
