"""First passes over the inputs: per-block statistics reduced to a few numbers per tensor.

Merges that rank or rescale whole task vectors (TIES top-k per tensor, the TIES paper's
model-wide top-k, Breadcrumbs, the L1 rescale of DARE/DELLA) need numbers computed over whole
tensors before the output can be streamed. A pass is one Dask graph with one task per
(tensor, row block), like the engine's output pass, so it runs under the same memory budget
and scheduler; each task returns a small array (a histogram, per-row sums) and the graph
reduces them:

* ``sum`` items: block results are added in a tree (fan-in 8) per *group* (a tensor, or one
  group over many tensors for model-wide statistics); a ``finish`` function, run inside the
  graph, turns the total into the few numbers the client needs, so the client never holds
  per-tensor histograms;
* ``rows`` items: block results are per-row arrays, concatenated in row order (``rows x k``
  numbers per tensor). Floating-point sums are reduced this way, row by row and then in one
  fixed order, so the result is bit-identical whatever the block partition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from streamvec.compute.kernel import upcast32
from streamvec.engine.execute import plan_blocks, run_read_buffers
from streamvec.engine.schedule import execute_graph
from streamvec.engine.settings import Settings
from streamvec.io.blocks import BlockReader, matrix_shape, read_block
from streamvec.io.read_buffers import ReadBuffers, lease_from
from streamvec.memory import anon_bytes
from streamvec.model.tensor import LazyTensor, row_ranges

_FAN_IN = 8


class BlockStat(Protocol):
    """Computes a statistic of rows ``[r0, r1)`` from every term's float32 rows."""

    def __call__(
        self, name: str, shape: tuple[int, ...], blocks: Sequence[np.ndarray], r0: int, r1: int
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class PassItem:
    """One tensor's part in a pass.

    Attributes:
        name: tensor name.
        shape: tensor shape.
        terms: its readers (base first, then the models), as in the lazy tensor.
        stat: the per-block statistic.
        group: reduction group (``sum`` items with the same group are added together).
        rows: per-row results, concatenated (group must be unique to the item).
    """

    name: str
    shape: tuple[int, ...]
    terms: tuple[tuple[float, BlockReader], ...]
    stat: BlockStat
    group: str
    rows: bool = False


@dataclass(frozen=True)
class _Job:
    # Opaque to dask (a dataclass, not a tuple), so its contents are never taken for keys.
    item: PassItem
    # The pass's read buffers, reused from block to block (streamvec.io.read_buffers); None
    # (other processes): each block task reads into maps of its own, freed when it ends.
    buffers: ReadBuffers | None = field(default=None, compare=False, repr=False)

    def run(self, r0: int, r1: int) -> np.ndarray:
        # The reads and their float32 copies both go into maps reused from block to block (a
        # fresh copy's pages were faulted in on every block); the statistic is small and new.
        with lease_from(self.buffers) as lease:
            blocks = []
            for _, r in self.item.terms:
                x = read_block(r, r0, r1, lease)
                blocks.append(upcast32(x, lease.array(x.shape, np.float32)))
            return self.item.stat(self.item.name, self.item.shape, blocks, r0, r1)


def _block(job: _Job, r0: int, r1: int) -> np.ndarray:
    return job.run(r0, r1)


def _add(parts: list[np.ndarray]) -> np.ndarray:
    total = parts[0].copy()
    for p in parts[1:]:
        total += p
    return total


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts, axis=0)


def _apply(finish: Callable[[np.ndarray], Any] | None, value: np.ndarray) -> Any:
    return value if finish is None else finish(value)


def run_pass(
    items: Sequence[PassItem],
    options: Settings,
    finish: Mapping[str, Callable[[np.ndarray], Any]] | None = None,
    desc: str = "first pass",
) -> dict[str, Any]:
    """Run one pass; return each group's reduced (and finished) result.

    Args:
        items: what to compute for each tensor.
        options: scheduler, workers, memory budget, progress.
        finish: per group, a picklable function applied to the reduced array in the graph.
        desc: progress-bar label.

    Returns:
        ``{group: result}``.
    """
    if not items:
        return {}
    finish = finish or {}
    workers = options.resolved_workers()
    stand_ins = [
        LazyTensor(it.name, it.shape, np.dtype(np.float32), it.terms, op=_Marker()) for it in items
    ]
    block_bytes = options.block_bytes()
    plan = plan_blocks(
        stand_ins, options.resolved_limit(), workers, baseline=anon_bytes(), block_bytes=block_bytes
    )
    graph: dict[Any, Any] = {}
    sum_groups: dict[str, list[Any]] = {}
    finals: dict[str, Any] = {}
    token = id(graph)  # distinct key names for concurrent passes in one distributed cluster
    nblocks = 0
    buffers = run_read_buffers(options.scheduler)
    for idx, (it, p) in enumerate(zip(items, plan, strict=True)):
        job = _Job(it, buffers)
        rows, _ = matrix_shape(it.shape)
        keys: list[Any] = []
        for r0, r1 in row_ranges(rows, p.block_rows):
            key = ("sv-merge-stat", token, idx, r0)
            graph[key] = (_block, job, r0, r1)
            keys.append(key)
            nblocks += 1
        if it.rows:
            gkey = ("sv-merge-rows", token, idx)
            graph[gkey] = (_concat, keys)
            fkey = ("sv-merge-final", token, it.group)
            graph[fkey] = (_apply, finish.get(it.group), gkey)
            finals[it.group] = fkey
        else:
            sum_groups.setdefault(it.group, []).extend(keys)
    for group, leaves in sum_groups.items():
        level_keys: list[Any] = leaves
        level = 0
        while len(level_keys) > 1:
            nxt: list[Any] = []
            for j in range(0, len(level_keys), _FAN_IN):
                k = ("sv-merge-sum", token, group, level, j)
                graph[k] = (_add, level_keys[j : j + _FAN_IN])
                nxt.append(k)
            level_keys = nxt
            level += 1
        fkey = ("sv-merge-final", token, group)
        graph[fkey] = (_apply, finish.get(group), level_keys[0])
        finals[group] = fkey
    order = list(finals)
    results = _execute(graph, [finals[g] for g in order], options, workers, nblocks, desc)
    return dict(zip(order, results, strict=True))


@dataclass(frozen=True)
class _Marker:
    """Stands for a block op when sizing blocks: a pass holds every term upcast, like an op."""

    def __call__(
        self, name: str, blocks: Sequence[np.ndarray], coefs: Sequence[float], r0: int, r1: int
    ) -> np.ndarray:  # pragma: no cover - never called
        raise NotImplementedError


def _execute(
    graph: dict[Any, Any],
    keys: list[Any],
    options: Settings,
    workers: int,
    nblocks: int,
    desc: str,
) -> list[Any]:
    # The engine's executor; progress counts the per-block statistics tasks.
    sizes = {k: 1 for k in graph if isinstance(k, tuple) and k and k[0] == "sv-merge-stat"}
    return execute_graph(
        graph,
        keys,
        sizes,
        scheduler=options.scheduler,
        workers=workers,
        progress=options.progress,
        total=nblocks,
        desc=desc,
        unit="block",
    )
