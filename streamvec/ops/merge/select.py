"""Exact order statistics of task-vector magnitudes by streaming radix selection.

To keep the top k of a tensor (TIES), or drop both tails (Model Breadcrumbs), the magnitude
at a given rank must be known before the output is streamed. Loading the tensor (or the
model) to sort it is what streamvec avoids, so the rank is found in passes over row blocks,
each holding only a fixed-size histogram:

1. a histogram of the top 15 bits of ``|tau|`` as float32 bits (sign bit cleared: 8 exponent
   and 7 mantissa bits, 32768 bins, 256 KiB per model) finds the bin holding rank ``r``;
2. a histogram of the low 16 bits of the elements in that bin (65536 bins) gives the exact
   float32 value ``v`` at rank ``r``, and how many elements are below it;
3. only when several elements equal ``v`` and the rank falls among them: per-row counts of
   ``v`` find the row, and one row read finds the element, so the selection keeps exactly
   ``k`` elements, breaking ties by flat index. Pass 2 of a per-tensor rank keeps those
   counts itself for the values each block holds most often in its bin (:class:`LoRows`),
   which is where a rank falls among equal values; a third pass over the inputs (which
   every bf16 tensor needed before) counts the value per row only where some block held it
   among too many others.

Non-negative float32 bit patterns are ordered like the values, so the result is exact, not a
sketch: it equals ``np.sort(|tau|)[r]``. After pass 1 alone the value is known to within one
bin, a relative error below 2^-7 (0.8%): the TIES paper variant offers that as a one-pass
approximation (``exact_threshold: false``), keeping at most the bin's count of extra elements.
Memory: the histograms, whatever the tensor or model size, and for a per-tensor rank the
counts that break ties (at most 16 entries per row of that tensor, while its pass 2 lasts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamvec.engine.settings import Settings
from streamvec.io.blocks import BlockReader, matrix_shape
from streamvec.ops.merge.blockop import task_vector32
from streamvec.ops.merge.masks import Cut, Mask, SlabContext, magnitude_bits
from streamvec.ops.merge.passes import PassItem, run_pass

HI_BINS = 1 << 15  # |x| bits < 2^31: the top 15 of them
LO_BINS = 1 << 16
GLOBAL_GROUP = "\0model-wide"


# Statistics work in larger slabs than the block op: a histogram's fixed cost (zeroing and
# adding 256-512 KiB of counts) is amortised over 1M elements; temporaries stay ~10 MB.
_STAT_SLAB = 1 << 20


def _slabs(blocks: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    rows, cols = blocks[0].shape
    step = max(1, _STAT_SLAB // max(cols, 1))
    return [(s, min(rows, s + step)) for s in range(0, rows, step)]


@dataclass(frozen=True)
class HiHist:
    """Pass 1: per model, a histogram of the top 15 magnitude bits."""

    deltas: tuple[bool, ...]
    models: tuple[int, ...]

    def __call__(
        self, name: str, shape: tuple[int, ...], blocks: Sequence[np.ndarray], r0: int, r1: int
    ) -> np.ndarray:
        out = np.zeros((len(self.models), HI_BINS), np.int64)
        for s0, s1 in _slabs(blocks):
            b = blocks[0][s0:s1]
            for j, m in enumerate(self.models):
                x = blocks[m + 1][s0:s1]
                tau32 = x.copy() if self.deltas[m] else x - b
                bits = np.abs(tau32, out=tau32).view(np.uint32)
                np.right_shift(bits, np.uint32(16), out=bits)
                out[j] += np.bincount(bits.reshape(-1), minlength=HI_BINS)
        return out


@dataclass(frozen=True)
class LoHist:
    """Pass 2: per target ``(model, hi bin)``, a histogram of the low 16 bits in that bin."""

    deltas: tuple[bool, ...]
    targets: tuple[tuple[int, int], ...]

    def __call__(
        self, name: str, shape: tuple[int, ...], blocks: Sequence[np.ndarray], r0: int, r1: int
    ) -> np.ndarray:
        out = np.zeros((len(self.targets), LO_BINS), np.int64)
        for s0, s1 in _slabs(blocks):
            b = blocks[0][s0:s1]
            split: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # model -> (hi, bits)
            for j, (m, h) in enumerate(self.targets):
                if m not in split:
                    tau32 = task_vector32(blocks[m + 1][s0:s1], b, self.deltas[m])
                    bits = magnitude_bits(tau32).reshape(-1)
                    split[m] = (bits >> np.uint32(16), bits)
                hi, bits = split[m]
                out[j] += np.bincount(bits[hi == h] & np.uint32(0xFFFF), minlength=LO_BINS)
        return out


# Pass 2 of a per-tensor rank keeps per-row counts of this many of a block's values in its
# bin, the most frequent (memory: rows x this many counts, at most).
ROW_COUNT_VALUES = 16


@dataclass(frozen=True)
class LoRows:
    """Pass 2 with the counts that break ties: ``(target, row, low bits, count)`` entries.

    For each target ``(model, hi bin)`` the block's elements in that bin are counted per
    (row, low 16 bits) for the :data:`ROW_COUNT_VALUES` values the block holds most often,
    and per block (row -1) for the others: if the rank falls among equal values of which a
    block kept no per-row counts, they come from a third pass (:class:`TieRows`).

    Returns an ``(entries, 4)`` int32 array. Rows are absolute; within a target the per-row
    entries ascend (block results concatenate in row order), with each slab's totals (row
    -1) among them. Size: at most one entry per (row, tracked value) present, and one per
    other value per slab.
    """

    deltas: tuple[bool, ...]
    targets: tuple[tuple[int, int], ...]

    def __call__(
        self, name: str, shape: tuple[int, ...], blocks: Sequence[np.ndarray], r0: int, r1: int
    ) -> np.ndarray:
        parts: list[np.ndarray] = []
        for s0, s1 in _slabs(blocks):
            b = blocks[0][s0:s1]
            bits_of: dict[int, np.ndarray] = {}
            for j, (m, h) in enumerate(self.targets):
                if m not in bits_of:
                    tau32 = task_vector32(blocks[m + 1][s0:s1], b, self.deltas[m])
                    bits_of[m] = magnitude_bits(tau32)
                parts.append(_row_counts(j, bits_of[m], h, r0 + s0))
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, 4), np.int32)


def _row_counts(target: int, bits: np.ndarray, h: int, row0: int) -> np.ndarray:
    """``(target, row, low bits, count)`` for the elements of rows ``bits`` in bin ``h``.

    Per row for the :data:`ROW_COUNT_VALUES` values the rows hold most often (the values
    a rank can fall among); per block, with row -1, for the others.
    """
    rows = bits.shape[0]
    in_bin = (bits >> np.uint32(16)) == np.uint32(h)
    lo = (bits[in_bin] & np.uint32(0xFFFF)).astype(np.intp)
    if lo.size == 0:
        return np.zeros((0, 4), np.int32)
    hist = np.bincount(lo, minlength=LO_BINS)
    values = np.flatnonzero(hist)
    tracked = values
    if values.size > ROW_COUNT_VALUES:
        skipped = values.size - ROW_COUNT_VALUES  # the least frequent, partitioned first
        tracked = np.sort(values[np.argpartition(hist[values], skipped - 1)[skipped:]])
    slot = np.full(LO_BINS, -1, np.intp)
    slot[tracked] = np.arange(tracked.size)
    element_slot = slot[lo]
    element_row = np.repeat(np.arange(rows, dtype=np.intp), in_bin.sum(axis=1))
    mine = element_slot >= 0
    cells = element_row[mine] * tracked.size + element_slot[mine]  # (row, value) of each
    if rows * tracked.size <= 4 * cells.size + LO_BINS:
        grid = np.bincount(cells, minlength=rows * tracked.size)  # a grid no larger than that
        where = np.flatnonzero(grid)
        counts = grid[where]
    else:
        # Tall narrow slabs (a bias-like tensor of 1M rows): a rows x 16 grid would dwarf the
        # elements in the bin, so the few (row, value) cells present are sorted instead.
        where, counts = np.unique(cells, return_counts=True)
    rest = values[slot[values] < 0]
    out = np.empty((where.size + rest.size, 4), np.int32)  # rows and counts fit 31 bits
    out[:, 0] = target
    out[: where.size, 1] = row0 + where // max(tracked.size, 1)
    out[: where.size, 2] = tracked[where % max(tracked.size, 1)]
    out[: where.size, 3] = counts
    out[where.size :, 1] = -1
    out[where.size :, 2] = rest
    out[where.size :, 3] = hist[rest]
    return out


@dataclass(frozen=True)
class TieRows:
    """Pass 3: per target ``(model, value bits)``, how many elements of each row equal it."""

    deltas: tuple[bool, ...]
    targets: tuple[tuple[int, int], ...]

    def __call__(
        self, name: str, shape: tuple[int, ...], blocks: Sequence[np.ndarray], r0: int, r1: int
    ) -> np.ndarray:
        rows = blocks[0].shape[0]
        out = np.zeros((rows, len(self.targets)), np.int64)
        for s0, s1 in _slabs(blocks):
            b = blocks[0][s0:s1]
            for j, (m, v) in enumerate(self.targets):
                tau32 = task_vector32(blocks[m + 1][s0:s1], b, self.deltas[m])
                out[s0:s1, j] = (magnitude_bits(tau32) == np.uint32(v)).sum(axis=1)
        return out


@dataclass(frozen=True)
class L1Rows:
    """Per row and model: ``sum |tau|`` and ``sum |mask * tau|`` (mergekit's L1 rescale)."""

    deltas: tuple[bool, ...]
    models: tuple[int, ...]
    masks: tuple[Mask, ...]

    def __call__(
        self, name: str, shape: tuple[int, ...], blocks: Sequence[np.ndarray], r0: int, r1: int
    ) -> np.ndarray:
        rows, cols = blocks[0].shape
        out = np.zeros((rows, len(self.models), 2), np.float64)
        for s0, s1 in _slabs(blocks):
            b = blocks[0][s0:s1]
            ctx = SlabContext(name, shape, r0 + s0, s1 - s0, cols)
            for j, (m, mask) in enumerate(zip(self.models, self.masks, strict=True)):
                tau32 = task_vector32(blocks[m + 1][s0:s1], b, self.deltas[m])
                mag = np.abs(tau32).astype(np.float64)
                out[s0:s1, j, 0] = mag.sum(axis=1)
                keep = mask.keep(tau32, ctx)
                out[s0:s1, j, 1] = (mag if keep is None else np.where(keep, mag, 0.0)).sum(axis=1)
        return out


@dataclass(frozen=True)
class LocateHi:
    """Finish of pass 1: for each model slot and rank, ``(bin, elements below the bin)``."""

    ranks: tuple[tuple[int, ...], ...]

    def __call__(self, hist: np.ndarray) -> tuple[tuple[tuple[int, int], ...], ...]:
        out = []
        for j, rs in enumerate(self.ranks):
            cum = np.cumsum(hist[j])
            row = []
            for r in rs:
                h = int(np.searchsorted(cum, r, side="right"))
                row.append((h, int(cum[h - 1]) if h else 0))
            out.append(tuple(row))
        return tuple(out)


@dataclass(frozen=True)
class LocateLo:
    """Finish of pass 2: per target, ``(value bits, elements below it, elements equal)``."""

    his: tuple[int, ...]
    ranks: tuple[int, ...]
    belows: tuple[int, ...]

    def __call__(self, hist: np.ndarray) -> tuple[tuple[int, int, int], ...]:
        targets = zip(self.his, self.ranks, self.belows, strict=True)
        return tuple(_locate_lo(hist[j], h, r, below) for j, (h, r, below) in enumerate(targets))


def _locate_lo(hist: np.ndarray, h: int, r: int, below: int) -> tuple[int, int, int]:
    """``(value bits, elements below it, elements equal)`` at rank ``r`` from bin ``h``'s
    histogram of low bits, ``below`` elements lying in lower bins."""
    cum = np.cumsum(hist)
    lo = int(np.searchsorted(cum, r - below, side="right"))
    lt = below + (int(cum[lo - 1]) if lo else 0)
    return (h << 16) | lo, lt, int(hist[lo])


@dataclass(frozen=True)
class LocateLoRows:
    """Finish of pass 2 with :class:`LoRows`: per target, :class:`LocateLo`'s triple, then the
    row holding the element at the rank and how many equal elements precede that row
    (``(-1, 0)`` when the rank is not among ties or the counts were not kept)."""

    his: tuple[int, ...]
    ranks: tuple[int, ...]
    belows: tuple[int, ...]

    def __call__(self, entries: np.ndarray) -> tuple[tuple[int, int, int, int, int], ...]:
        out = []
        for j, (h, r, below) in enumerate(zip(self.his, self.ranks, self.belows, strict=True)):
            mine = entries[entries[:, 0] == j]
            hist = np.bincount(mine[:, 2], weights=mine[:, 3], minlength=LO_BINS).astype(np.int64)
            v, lt, equals = _locate_lo(hist, h, r, below)
            row, before = -1, 0
            equal = mine[mine[:, 2] == (v & 0xFFFF)]  # one entry per row, ascending
            if r != lt and not (equal[:, 1] < 0).any():
                run = np.cumsum(equal[:, 3], dtype=np.int64)
                k = int(np.searchsorted(run, r - lt, side="right"))
                row, before = int(equal[k, 1]), int(run[k - 1]) if k else 0
            out.append((v, lt, equals, row, before))
        return tuple(out)


@dataclass(frozen=True)
class L1Total:
    """Finish of the L1 pass: per model ``(sum |tau|, sum |kept tau|)``, in a fixed order."""

    def __call__(self, per_row: np.ndarray) -> tuple[tuple[float, float], ...]:
        total = per_row.sum(axis=0)
        return tuple((float(a), float(b)) for a, b in total)


@dataclass(frozen=True)
class TensorInput:
    """What a pass needs of one tensor: its geometry, readers and which terms are deltas."""

    name: str
    shape: tuple[int, ...]
    terms: tuple[tuple[float, BlockReader], ...]
    deltas: tuple[bool, ...]


def rank_cuts(
    requests: dict[str, tuple[TensorInput, list[tuple[int, int]]]], options: Settings
) -> dict[tuple[str, int, int], Cut]:
    """Exact cuts at the given ascending ranks of per-tensor magnitude orders.

    Args:
        requests: per tensor name, its input and the ``(model, rank)`` pairs wanted
            (``0 <= rank < numel``).
        options: how to run the passes.

    Returns:
        ``{(tensor, model, rank): (value bits, flat index)}``: the element at that rank.
    """
    if not requests:
        return {}
    p1_items, p1_finish, slots = [], {}, {}
    for name, (inp, wanted) in requests.items():
        models = tuple(sorted({m for m, _ in wanted}))
        slots[name] = models
        ranks = tuple(tuple(r for m2, r in wanted if m2 == m) for m in models)
        p1_items.append(PassItem(name, inp.shape, inp.terms, HiHist(inp.deltas, models), name))
        p1_finish[name] = LocateHi(ranks)
    hi = run_pass(p1_items, options, p1_finish, desc="ranks (1/2)")
    p2_items, p2_finish, order = [], {}, {}
    for name, (inp, _) in requests.items():
        targets, his, rks, belows, keys = [], [], [], [], []
        for slot, m in enumerate(slots[name]):
            rs = [r for m2, r in requests[name][1] if m2 == m]
            for r, (h, below) in zip(rs, hi[name][slot], strict=True):
                targets.append((m, h))
                his.append(h)
                rks.append(r)
                belows.append(below)
                keys.append((m, r))
        order[name] = keys
        p2_items.append(
            PassItem(name, inp.shape, inp.terms, LoRows(inp.deltas, tuple(targets)), name, True)
        )
        p2_finish[name] = LocateLoRows(tuple(his), tuple(rks), tuple(belows))
    lo = run_pass(p2_items, options, p2_finish, desc="ranks (2/2)")
    cuts: dict[tuple[str, int, int], Cut] = {}
    ties: dict[str, list[tuple[int, int, int, int]]] = {}
    for name, keys in order.items():
        inp = requests[name][0]
        for (m, r), (v, lt, _, row, before) in zip(keys, lo[name], strict=True):
            if r == lt:
                cuts[(name, m, r)] = (v, 0)
            elif row >= 0:
                cuts[(name, m, r)] = (v, _index_in_row(inp, m, v, row, r - lt - before))
            else:
                ties.setdefault(name, []).append((m, r, v, r - lt))
    if ties:
        cuts.update(_tie_cuts(requests, ties, options))
    return cuts


def _tie_cuts(
    requests: dict[str, tuple[TensorInput, list[tuple[int, int]]]],
    ties: dict[str, list[tuple[int, int, int, int]]],
    options: Settings,
) -> dict[tuple[str, int, int], Cut]:
    items = []
    for name, wanted in ties.items():
        inp = requests[name][0]
        targets = tuple((m, v) for m, _, v, _ in wanted)
        items.append(PassItem(name, inp.shape, inp.terms, TieRows(inp.deltas, targets), name, True))
    per_rows = run_pass(items, options, desc="ranks (ties)")
    cuts: dict[tuple[str, int, int], Cut] = {}
    for name, wanted in ties.items():
        inp = requests[name][0]
        counts = per_rows[name]
        for j, (m, r, v, skip) in enumerate(wanted):
            cum = np.cumsum(counts[:, j])
            row = int(np.searchsorted(cum, skip, side="right"))
            before = int(cum[row - 1]) if row else 0
            cuts[(name, m, r)] = (v, _index_in_row(inp, m, v, row, skip - before))
    return cuts


def _index_in_row(inp: TensorInput, m: int, v: int, row: int, skip: int) -> int:
    """Flat index of the element after ``skip`` others equal to ``v`` in ``row`` of model m."""
    _, cols = matrix_shape(inp.shape)
    base = inp.terms[0][1].read(row, row + 1).astype(np.float32)
    x = inp.terms[m + 1][1].read(row, row + 1).astype(np.float32)
    tau32 = task_vector32(x, base, inp.deltas[m])
    cols_eq = np.flatnonzero(magnitude_bits(tau32).ravel() == np.uint32(v))
    return row * cols + int(cols_eq[skip])


def model_wide_floors(
    tensors: Sequence[TensorInput],
    ranks: dict[int, int],
    options: Settings,
    exact: bool = True,
) -> dict[int, int]:
    """Per model, the magnitude bits at an ascending rank of *all* its listed tensors at once.

    Args:
        tensors: the tensors that make up each model's (flattened) task vector.
        ranks: ``{model: rank}`` with ``0 <= rank < total elements``.
        options: how to run the passes.
        exact: two passes for the exact value; False: one pass, the lower edge of its bin
            (relative error below 2^-7; keeps at most that bin's elements more).

    Returns:
        ``{model: value bits}``; keeping ``|tau| >= value`` keeps every element at or above
        the rank (ties at the value included).
    """
    if not ranks or not tensors:
        return {}
    models = tuple(sorted(ranks))
    rank_of = tuple((ranks[m],) for m in models)
    items = [
        PassItem(t.name, t.shape, t.terms, HiHist(t.deltas, models), GLOBAL_GROUP) for t in tensors
    ]
    hi = run_pass(items, options, {GLOBAL_GROUP: LocateHi(rank_of)}, desc="model-wide ranks (1/2)")[
        GLOBAL_GROUP
    ]
    if not exact:
        return {m: hi[j][0][0] << 16 for j, m in enumerate(models)}
    targets = tuple((m, hi[j][0][0]) for j, m in enumerate(models))
    finish = LocateLo(
        tuple(h for _, h in targets),
        tuple(ranks[m] for m in models),
        tuple(hi[j][0][1] for j in range(len(models))),
    )
    items = [
        PassItem(t.name, t.shape, t.terms, LoHist(t.deltas, targets), GLOBAL_GROUP) for t in tensors
    ]
    lo = run_pass(items, options, {GLOBAL_GROUP: finish}, desc="model-wide ranks (2/2)")[
        GLOBAL_GROUP
    ]
    return {m: lo[j][0] for j, m in enumerate(models)}


def l1_factors(
    requests: dict[str, tuple[TensorInput, list[tuple[int, Mask]]]],
    options: Settings,
    eps: float = 1e-7,
) -> dict[tuple[str, int], float]:
    """mergekit's L1 rescale: ``sum |tau| / sum |kept tau|`` per tensor and model.

    Both sums are reduced row by row and then in row order, so the factor (and therefore the
    output) does not depend on the block partition. As in mergekit, either sum below ``eps``
    means no rescale (factor 1).
    """
    items, finish, models_of = [], {}, {}
    for name, (inp, wanted) in requests.items():
        models = tuple(m for m, _ in wanted)
        masks = tuple(mask for _, mask in wanted)
        models_of[name] = models
        items.append(
            PassItem(name, inp.shape, inp.terms, L1Rows(inp.deltas, models, masks), name, True)
        )
        finish[name] = L1Total()
    sums = run_pass(items, options, finish, desc="L1 norms")
    out: dict[tuple[str, int], float] = {}
    for name, models in models_of.items():
        for m, (before, after) in zip(models, sums[name], strict=True):
            out[(name, m)] = 1.0 if before < eps or after < eps else before / after
    return out
