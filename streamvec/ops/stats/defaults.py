"""Defaults of ``streamvec stats``, apart so the command's parser reads them without importing
the statistics (and the randomized SVD they bring)."""

DEFAULT_DENSITY = 0.2  # TIES' default top-k share
DEFAULT_RESIDUAL = 0.01  # residual energy share of the LoRA rank table
