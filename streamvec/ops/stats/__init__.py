"""Task-vector analytics: ``streamvec stats`` and ``sv.stats``.

Modules: :mod:`~streamvec.ops.stats.inputs` (terms lined up tensor by tensor),
:mod:`~streamvec.ops.stats.accumulate` (the block statistics), :mod:`~streamvec.ops.stats.grouping`
(layers and module kinds), :mod:`~streamvec.ops.stats.spectrum` (singular values and subspaces),
:mod:`~streamvec.ops.stats.result` (the figures), :mod:`~streamvec.ops.stats.report` (table, JSON),
:mod:`~streamvec.ops.stats.plots` (PNGs), :mod:`~streamvec.cli.stats` (the command).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamvec.ops.stats.api import StatsOptions, stats
    from streamvec.ops.stats.result import Figures, Stats

# Imported on first use: the package is reached by every command's parser (the defaults in
# ops/stats/api.py), and its figures bring the randomized SVD (dask.array, scipy).
_WHERE = {"StatsOptions": "api", "stats": "api", "Figures": "result", "Stats": "result"}


def __getattr__(name: str) -> object:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"streamvec.ops.stats.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'streamvec.ops.stats' has no attribute {name!r}")


__all__ = ["Figures", "Stats", "StatsOptions", "stats"]
