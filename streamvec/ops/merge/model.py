"""The lazy merged model: a :class:`~streamvec.model.algebra.Model` whose tensors carry a block op.

A merge method supplies a *planner*: for each tensor and its parameter values it returns a
:class:`TensorPlan` (per fine-tuned model: how to sparsify its task vector, its weight, its
rescale; then sign consensus, normalisation and lambda). :class:`MergeModel` checks the inputs
(a :class:`~streamvec.model.algebra.Combination` of the sources resolves names, shapes and dtypes
and
gives the readers), runs the first passes the plans need (rank cuts, model-wide thresholds, L1
norms; :mod:`streamvec.ops.merge.select`) and then exposes one
:class:`~streamvec.model.tensor.LazyTensor`
per output tensor, with a :class:`~streamvec.ops.merge.blockop.SparseMergeOp`, for the engine to
stream. Plans that are plain weighted sums become ordinary linear lazy tensors (the engine's
fast kernel).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from streamvec.dtypes import is_float
from streamvec.engine.settings import Settings
from streamvec.errors import StreamvecError
from streamvec.io.blocks import BlockReader
from streamvec.model.algebra import Combination, Model, Resolved, Source, Term, tensor_of
from streamvec.model.tensor import LazyTensor
from streamvec.model.ties import TieRules
from streamvec.model.vocab import PaddedReader
from streamvec.ops.merge.blockop import SparseMergeOp, task_vector32
from streamvec.ops.merge.masks import (
    Bernoulli,
    DellaMagprune,
    KeepAll,
    KeepNone,
    MagnitudeFloor,
    Mask,
    RankWindow,
    ranks_1d,
)
from streamvec.ops.merge.recipe import MergeRequest, TensorParams
from streamvec.ops.merge.rng import keep_threshold
from streamvec.ops.merge.select import TensorInput, l1_factors, model_wide_floors, rank_cuts

# -- what a planner asks for, per tensor and model ---------------------------------------------


@dataclass(frozen=True)
class Dense:
    """Keep the whole task vector."""


@dataclass(frozen=True)
class Empty:
    """Drop the whole task vector."""


@dataclass(frozen=True)
class RankRange:
    """Keep ascending magnitude ranks ``[lo, hi)`` of the tensor (None: open end)."""

    lo: int | None
    hi: int | None


@dataclass(frozen=True)
class ModelWideTopK:
    """Keep ``|tau| >=`` the model-wide magnitude at the TIES paper's rank for ``density``."""

    density: float
    exact: bool = True


@dataclass(frozen=True)
class RandomKeep:
    """Keep each element with probability ``density`` (seeded, per element)."""

    density: float


@dataclass(frozen=True)
class DellaKeep:
    """DELLA MagPrune: keep with probability ``density +- epsilon`` by magnitude rank."""

    density: float
    epsilon: float


Sparsify = Dense | Empty | RankRange | ModelWideTopK | RandomKeep | DellaKeep


@dataclass(frozen=True)
class ModelTerm:
    """One fine-tuned model's part in a tensor's merge.

    Attributes:
        sparsify: which elements of its task vector are kept.
        weight: ``w_i``.
        rescale: ``"l1"`` (mergekit: restore the L1 norm of the whole tensor), a constant
            factor (DARE paper: ``1 / density``), or None.
    """

    sparsify: Sparsify
    weight: float
    rescale: Literal["l1"] | float | None = None


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is merged (see :mod:`streamvec.ops.merge.blockop` for the formula)."""

    terms: tuple[ModelTerm, ...]
    consensus: str | None = None
    normalize: bool = False
    lam: float = 1.0
    linear: bool = False  # every term Dense, no consensus: a weighted sum


Planner = Callable[[str, tuple[int, ...], TensorParams], TensorPlan]


@dataclass
class _Pending:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    readers: tuple[BlockReader, ...]
    plan: TensorPlan
    masks: list[Mask | None] = field(default_factory=list)


class MergeModel(Model):
    """A merge method applied to a base and fine-tuned models, as a lazy model.

    ``resolved()`` runs the first passes the method needs (once; with :attr:`options`), then
    returns the output tensors; ``save(path)`` streams them like any model.

    Example:
        >>> from streamvec.ops.merge import build_model, load_recipe  # doctest: +SKIP
        >>> model = build_model(load_recipe("ties.yaml"))  # doctest: +SKIP
        >>> model.save("merged")  # doctest: +SKIP
    """

    def __init__(
        self, request: MergeRequest, planner: Planner, options: Settings | None = None
    ) -> None:
        self.request = request
        self.planner = planner
        self.options = options or Settings(progress=False)
        self._resolved: Resolved | None = None
        self.stats: dict[str, Any] = {}

    # -- Model interface ------------------------------------------------------------------
    def combination(self) -> Combination:
        raise StreamvecError(
            f"a {self.request.method.name} merge is not a weighted sum of its inputs; it "
            "cannot be combined with other models by + - * (save it first, then open it)"
        )

    def anchor(self) -> Source | None:
        return self.request.base

    def sources(self) -> list[Source]:
        return [self.request.base, *self.request.models]

    def describe(self) -> str:
        return self.request.describe()

    def resolved(self) -> Resolved:
        if self._resolved is None:
            self._resolved = self._build()
        return self._resolved

    # -- building -------------------------------------------------------------------------
    def _check(self) -> Resolved:
        """Names, shapes and dtypes across inputs; the readers of every tensor."""
        req = self.request
        n = len(req.models)
        c = 1.0 / (n + 1)
        points = sum(1 for s in req.models if s.is_point)
        # Weights summing to 1 make it a "model" (non-float buffers pass through from the base);
        # they are never used as weights.
        terms = (Term(1.0 - points * c, req.base), *(Term(c, s) for s in req.models))
        return Combination(terms, vocab=req.vocab).resolved()

    def _build(self) -> Resolved:
        req = self.request
        check = self._check()
        n = len(req.models)
        deltas = tuple(not s.is_point for s in req.models)
        out: dict[str, LazyTensor] = {}
        pending: list[_Pending] = []
        sources = (req.base, *req.models)
        rules = [s.ties for s in sources if s.ties is not None]
        for name, lt in check.tensors.items():
            if not is_float(lt.dtype):
                out[name] = lt  # int/bool buffers: copied from the base
                continue
            readers = _input_readers(name, lt, sources, rules)
            if readers is None:
                out[name] = lt  # every input reads the base's bytes: the base as stored
                continue
            dtype = np.dtype(req.out_dtype or lt.dtype)
            base_reader = readers[0]
            if req.name_filter is not None and not req.name_filter(name):
                out[name] = LazyTensor(name, lt.shape, dtype, ((1.0, base_reader),))
                continue
            plan = self.planner(name, lt.shape, req.values(name))
            if len(plan.terms) != n:
                raise RuntimeError(f"internal error: plan of {name} has the wrong model count")
            if plan.linear:
                out[name] = _linear(name, lt.shape, dtype, readers, plan, deltas)
            else:
                pending.append(_Pending(name, lt.shape, dtype, readers, plan))
        self._masks(pending, deltas)
        self._rescale(pending, deltas, out)
        # Keep the checked order (file order of the base), whatever was deferred.
        ordered = {name: out[name] for name in check.tensors if name in out}
        if req.out_dtype is None:
            # FP8 base weights computed in float32 are stored re-quantized, like the base.
            for name, lt in check.tensors.items():
                if lt.requantize is not None and ordered[name].requantize is None:
                    ordered[name] = replace(ordered[name], requantize=lt.requantize)
        return Resolved("model", ordered, check.skipped_nonfloat, check.kept_base, check.vocab)

    def _input(self, p: _Pending, deltas: tuple[bool, ...]) -> TensorInput:
        return TensorInput(p.name, p.shape, tuple((1.0, r) for r in p.readers), deltas)

    def _masks(self, pending: list[_Pending], deltas: tuple[bool, ...]) -> None:
        seed = self.request.seed
        ranks: dict[str, tuple[TensorInput, list[tuple[int, int]]]] = {}
        wide: dict[int, list[tuple[_Pending, ModelWideTopK]]] = {}
        for p in pending:
            numel = math.prod(p.shape)
            for i, term in enumerate(p.plan.terms):
                sp = term.sparsify
                if isinstance(sp, RankRange):
                    for r in (sp.lo, sp.hi):
                        if r is not None and 0 < r < numel:
                            ranks.setdefault(p.name, (self._input(p, deltas), []))[1].append((i, r))
                elif isinstance(sp, ModelWideTopK) and 0 < sp.density < 1:
                    wide.setdefault(i, []).append((p, sp))
        cuts = rank_cuts(ranks, self.options)
        floors = self._model_wide(wide, deltas)
        self.stats["rank_cuts"] = cuts
        self.stats["model_wide_floors"] = floors
        for p in pending:
            numel = math.prod(p.shape)
            for i, term in enumerate(p.plan.terms):
                p.masks.append(self._mask(p, i, term.sparsify, numel, cuts, floors, seed))

    def _model_wide(
        self, wide: dict[int, list[tuple[_Pending, ModelWideTopK]]], deltas: tuple[bool, ...]
    ) -> dict[int, int]:
        if not wide:
            return {}
        tensors: dict[str, TensorInput] = {}
        ranks: dict[int, int] = {}
        exact = {sp.exact for items in wide.values() for _, sp in items}
        for i, items in wide.items():
            densities = {sp.density for _, sp in items}
            if len(densities) > 1:
                raise StreamvecError(
                    f"{self.request.entries[i].where} ({self.request.entries[i].path}): "
                    f"{self.request.method.name} trims the whole model at one density; give "
                    "density one value per model (no filters or gradients)"
                )
            total = sum(math.prod(p.shape) for p, _ in items)
            density = densities.pop()
            # The TIES reference code: keep |tau| >= kthvalue(|tau|, N - int(N * density)).
            ranks[i] = total - int(total * density) - 1
            for p, _ in items:
                tensors.setdefault(p.name, self._input(p, deltas))
        # Models may be trimmed over different tensor sets only if a filter says so; the
        # histogram pass covers the union and each model counts only its own tensors.
        sets = {i: {p.name for p, _ in items} for i, items in wide.items()}
        if len({frozenset(s) for s in sets.values()}) > 1:
            raise StreamvecError(
                f"{self.request.method.name}: every model must be trimmed over the same tensors"
            )
        return model_wide_floors(list(tensors.values()), ranks, self.options, exact=all(exact))

    def _mask(
        self,
        p: _Pending,
        i: int,
        sp: Sparsify,
        numel: int,
        cuts: dict[tuple[str, int, int], tuple[int, int]],
        floors: dict[int, int],
        seed: int,
    ) -> Mask:
        if isinstance(sp, Dense):
            return KeepAll()
        if isinstance(sp, Empty) or numel == 0:
            return KeepNone()
        if isinstance(sp, RankRange):
            lo, hi = sp.lo, sp.hi
            if lo is not None and hi is not None and hi <= lo:
                return KeepNone()
            lo_cut = cuts[(p.name, i, lo)] if lo is not None and 0 < lo < numel else None
            hi_cut = cuts[(p.name, i, hi)] if hi is not None and 0 < hi < numel else None
            if lo is not None and lo >= numel:
                return KeepNone()
            if hi is not None and hi <= 0:
                return KeepNone()
            if lo_cut is None and hi_cut is None:
                return KeepAll()
            return RankWindow(lo_cut, hi_cut)
        if isinstance(sp, ModelWideTopK):
            if sp.density >= 1:
                return KeepAll()
            if sp.density <= 0:
                return KeepNone()
            return MagnitudeFloor(floors[i])
        if isinstance(sp, RandomKeep):
            if sp.density >= 1:
                return KeepAll()
            return Bernoulli(keep_threshold(sp.density), seed, i)
        if isinstance(sp, DellaKeep):
            if sp.density >= 1:
                return KeepAll()
            if sp.density <= 0:
                return KeepNone()
            r1d = None
            if len(p.shape) == 1:
                # A 1-d tensor is ranked as a whole (mergekit unsqueezes it to one row): read it
                # (1-d tensors are norms and biases, a few KB) and carry its ranks in the mask.
                base = p.readers[0].read(0, p.shape[0]).astype(np.float32)
                x = p.readers[i + 1].read(0, p.shape[0]).astype(np.float32)
                tau32 = task_vector32(x, base, not self.request.models[i].is_point)
                r1d = ranks_1d(tau32)
            return DellaMagprune(sp.density, sp.epsilon, seed, i, r1d)
        raise TypeError(f"unknown sparsification {sp!r}")

    def _rescale(
        self, pending: list[_Pending], deltas: tuple[bool, ...], out: dict[str, LazyTensor]
    ) -> None:
        wanted: dict[str, tuple[TensorInput, list[tuple[int, Mask]]]] = {}
        for p in pending:
            for i, term in enumerate(p.plan.terms):
                mask = p.masks[i]
                if term.rescale == "l1" and not isinstance(mask, (KeepAll, KeepNone)):
                    assert mask is not None
                    wanted.setdefault(p.name, (self._input(p, deltas), []))[1].append((i, mask))
        factors = l1_factors(wanted, self.options)
        self.stats["l1_factors"] = factors
        for p in pending:
            scales = []
            for i, term in enumerate(p.plan.terms):
                if term.rescale == "l1":
                    scales.append(factors.get((p.name, i), 1.0))
                elif isinstance(term.rescale, float):
                    scales.append(term.rescale)
                else:
                    scales.append(1.0)
            masks = tuple(m for m in p.masks if m is not None)
            op = SparseMergeOp(
                shape=p.shape,
                deltas=deltas,
                masks=masks,
                scales=tuple(scales),
                weights=tuple(float(t.weight) for t in p.plan.terms),
                consensus=p.plan.consensus,
                normalize=p.plan.normalize,
                lam=float(p.plan.lam),
                result_dtype="float64" if p.dtype == np.float64 else "float32",
                work_dtype="float32" if p.dtype.itemsize < 4 else "float64",
            )
            terms = tuple((1.0, r) for r in p.readers)
            out[p.name] = LazyTensor(p.name, p.shape, p.dtype, terms, op)


def _input_readers(
    name: str, lt: LazyTensor, sources: tuple[Source, ...], rules: list[TieRules]
) -> tuple[BlockReader, ...] | None:
    """The reader of every input (base first, then the models in order) for one tensor.

    The checked combination sums the terms of readers that compare equal, and readers are
    equal only when they read the same bytes of the same file at the same version (a model
    that leaves a tensor as the base has it: ``B+LORA`` where the adapter does not touch it).
    Such a model is still one input of the merge, with a zero task vector there, so each
    input's reader is found again among the checked terms: the term holding its own reader,
    or the vocabulary-aligned reader wrapping it.

    Returns:
        The readers, or None when every input reads the base's own bytes (every task vector
        is zero there, and the checked tensor is the base as stored).

    Raises:
        StreamvecError: an input has no such tensor (a sparse source given as a model).
    """
    by_reader: dict[BlockReader, BlockReader] = {}
    for _, r in lt.terms:
        by_reader.setdefault(r, r)
        inner = r.inner if isinstance(r, PaddedReader) else None
        if inner is not None:
            by_reader.setdefault(inner, r)
    owns = [tensor_of(source, name, rules) for source in sources]
    if owns[0] is not None and all(o is not None and o.reader == owns[0].reader for o in owns):
        return None
    found: list[BlockReader] = []
    for source, own in zip(sources, owns, strict=True):
        reader = by_reader.get(own.reader) if own is not None else None
        if reader is None:
            raise StreamvecError(
                f"{source.label}: holds no {name} that the merge can read; every model of a "
                "merge must hold every merged tensor (an adapter stands for its base with it "
                "merged in: list it as MODEL+LORA)"
            )
        found.append(reader)
    return tuple(found)


def _linear(
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    readers: tuple[BlockReader, ...],
    plan: TensorPlan,
    deltas: tuple[bool, ...],
) -> LazyTensor:
    """``base + lam * sum_i w'_i tau_i`` as a weighted sum of the inputs (the linear kernel).

    Coefficients are formed as :func:`streamvec.ops.combine.combine_terms` forms them, so a
    uniform recipe gives the same bytes through either path.
    """
    weights = [float(t.weight) for t in plan.terms]
    if plan.normalize:
        div = sum(weights)
        if abs(div) < 1e-8:
            div = 1.0
        weights = [w / div for w in weights]
    # combine_terms sums the base's share of the task vectors, scales it by lambda, then adds
    # the base: the same association here gives the same coefficients to the last bit.
    base_share = 0.0
    terms: list[tuple[float, BlockReader]] = []
    for w, r, is_delta in zip(weights, readers[1:], deltas, strict=True):
        if not is_delta:
            base_share += -1.0 * w
        terms.append(((1.0 * w) * plan.lam, r))
    base_coef = 1.0 + base_share * plan.lam
    # Checkpoint terms are evaluated as differences from the base (the kernel's delta form).
    points = (True, *(not d for d in deltas))
    return LazyTensor(
        name,
        shape,
        dtype,
        ((base_coef, readers[0]), *terms),
        points=points if sum(points) > 1 else (),
    )
