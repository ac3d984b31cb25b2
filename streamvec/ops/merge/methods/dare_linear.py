"""DARE with a plain weighted sum, as mergekit 0.1.5 runs it (L1 rescale, not 1/density)."""

from streamvec.ops.merge.gta import gta_method

METHOD = gta_method(
    name="dare_linear",
    sparsification="random",
    consensus=False,
    default_normalize=False,
    default_rescale=True,
    summary="drop task-vector entries at random (keep probability density), rescale to the "
    "tensor's L1 norm, weighted sum",
    paper="Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous "
    "Models as a Free Lunch, ICML 2024 (arXiv:2311.03099)",
    notes="rescale restores the L1 norm per tensor (mergekit); the paper multiplies by "
    "1/density: see dare_paper",
)
