"""Task-vector analytics: ``streamvec stats`` and ``sv.stats``.

Modules: :mod:`~streamvec.ops.stats.inputs` (terms lined up tensor by tensor),
:mod:`~streamvec.ops.stats.accumulate` (the block statistics), :mod:`~streamvec.ops.stats.grouping`
(layers and module kinds), :mod:`~streamvec.ops.stats.spectrum` (singular values and subspaces),
:mod:`~streamvec.ops.stats.result` (the figures), :mod:`~streamvec.ops.stats.report` (table, JSON),
:mod:`~streamvec.ops.stats.plots` (PNGs), :mod:`~streamvec.cli.stats` (the command).
"""

from streamvec.ops.stats.api import StatsOptions, stats
from streamvec.ops.stats.result import Figures, Stats

__all__ = ["Figures", "Stats", "StatsOptions", "stats"]
