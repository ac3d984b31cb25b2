"""Task-vector analytics: ``streamvec stats`` and ``sv.stats``.

Modules: :mod:`~streamvec.stats.inputs` (terms lined up tensor by tensor),
:mod:`~streamvec.stats.accumulate` (the block statistics), :mod:`~streamvec.stats.grouping`
(layers and module kinds), :mod:`~streamvec.stats.spectrum` (singular values and subspaces),
:mod:`~streamvec.stats.result` (the figures), :mod:`~streamvec.stats.report` (table, JSON),
:mod:`~streamvec.stats.plots` (PNGs), :mod:`~streamvec.stats.cli` (the command).
"""

from streamvec.stats.api import StatsOptions, stats
from streamvec.stats.result import Figures, Stats

__all__ = ["Figures", "Stats", "StatsOptions", "stats"]
