"""The pass of ``stats``: one Dask graph, one task per (tensor, row block), sums added in a tree.

Like :func:`streamvec.ops.merge.passes.run_pass` (the engine's block planning under the memory
budget, its schedulers and progress bar), with one addition: a tensor's block tasks may
depend on a small task of that tensor that samples its top-set thresholds
(:mod:`streamvec.ops.stats.sample`), so every figure, top-k overlaps included, comes out of one
pass over the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamvec.engine.execute import plan_blocks
from streamvec.engine.schedule import execute_graph
from streamvec.engine.settings import Settings
from streamvec.io.blocks import matrix_shape
from streamvec.memory import anon_bytes
from streamvec.model.tensor import DEFAULT_BLOCK_BYTES, LazyTensor, row_ranges
from streamvec.ops.stats.accumulate import BlockSums, FinishMoments, TensorMoments
from streamvec.ops.stats.fused import FusedStat
from streamvec.ops.stats.inputs import TensorTerms
from streamvec.ops.stats.sample import thresholds
from streamvec.units import parse_size

_FAN_IN = 8


@dataclass(frozen=True)
class TopSets:
    """How each tensor's top-set thresholds are known in a pass.

    Attributes:
        density: the share of entries in each top set.
        sample: elements sampled per tensor (sampled mode).
        given: per tensor, thresholds found before the pass (the exact mode's second
            pass); None: sample them in this pass.
    """

    density: float
    sample: int
    given: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class _Sampler:
    t: TensorTerms
    top: TopSets

    def __call__(self) -> np.ndarray:
        t, top = self.t, self.top
        return thresholds(t.shape, t.readers, t.coefs, top.density, top.sample, t.name)


def _block(stat: FusedStat, r0: int, r1: int, thr: np.ndarray | None) -> BlockSums:
    return stat(r0, r1, thr)


def _add(parts: list[BlockSums]) -> BlockSums:
    total = parts[0].copy()
    for p in parts[1:]:
        total += p
    return total


def _finish(f: FinishMoments, sums: BlockSums, thr: np.ndarray | None) -> TensorMoments:
    return f(sums, thr)


def _const(x: Any) -> Any:
    return x


@dataclass(frozen=True)
class _Marker:
    """Stands for a block op when sizing blocks (never called): operands upcast, like an op."""

    def __call__(self, *args: Any) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


def run_stats_pass(
    tensors: Sequence[TensorTerms],
    options: Settings,
    *,
    moments: bool = True,
    histogram: bool = False,
    top: TopSets | None = None,
    density: float = 0.0,
    desc: str = "stats",
) -> dict[str, TensorMoments]:
    """One pass over every tensor's inputs.

    Args:
        tensors: the lined-up tensors.
        options: scheduler, workers, memory budget, block size, progress.
        moments: compute norms, Gram matrices, maxima and zeros.
        histogram: histogram the magnitudes (the exact top-k mode's first pass).
        top: count top-set overlaps with these thresholds (None: no counts).
        density: the top-set share whose thresholds the histogram gives.
        desc: progress-bar label.

    Returns:
        ``{tensor name: figures}``.
    """
    if not tensors:
        return {}
    workers = options.resolved_workers()
    # Sized like an op's blocks (every operand upcast): what non-pread readers hold.
    stand_ins = [
        LazyTensor(
            t.name,
            t.shape,
            np.dtype(np.float32),
            tuple((1.0, r) for r in t.readers),
            op=_Marker(),  # type: ignore[arg-type]
        )
        for t in tensors
    ]
    block_bytes = parse_size(options.block_size) if options.block_size else DEFAULT_BLOCK_BYTES
    plan = plan_blocks(
        stand_ins, options.resolved_limit(), workers, baseline=anon_bytes(), block_bytes=block_bytes
    )
    graph: dict[Any, Any] = {}
    token = id(graph)  # distinct key names for concurrent passes in one distributed cluster
    finals: list[Any] = []
    nblocks = 0
    for idx, (t, p) in enumerate(zip(tensors, plan, strict=True)):
        stat = FusedStat(t.shape, t.readers, t.coefs, t.base, moments, histogram)
        thr_key: Any = None
        if top is not None:
            thr_key = ("sv-stats-thr", token, idx)
            if top.given is not None:
                graph[thr_key] = (_const, top.given[t.name])
            else:
                graph[thr_key] = (_Sampler(t, top),)
        rows, _ = matrix_shape(t.shape)
        level: list[Any] = []
        for r0, r1 in row_ranges(rows, p.block_rows):
            key = ("sv-stats-block", token, idx, r0)
            graph[key] = (_block, stat, r0, r1, thr_key)
            level.append(key)
            nblocks += 1
        depth = 0
        while len(level) > 1:
            nxt = []
            for j in range(0, len(level), _FAN_IN):
                k = ("sv-stats-sum", token, idx, depth, j)
                graph[k] = (_add, level[j : j + _FAN_IN])
                nxt.append(k)
            level = nxt
            depth += 1
        fkey = ("sv-stats-final", token, idx)
        finish = FinishMoments(t.numel, top.density if top else density)
        graph[fkey] = (_finish, finish, level[0], thr_key)
        finals.append(fkey)
    sizes = {k: 1 for k in graph if k[0] == "sv-stats-block"}
    results = execute_graph(
        graph,
        finals,
        sizes,
        scheduler=options.scheduler,
        workers=workers,
        progress=options.progress,
        total=nblocks,
        desc=desc,
        unit="block",
    )
    return {t.name: r for t, r in zip(tensors, results, strict=True)}
