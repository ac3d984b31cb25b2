"""Lazy models and task arithmetic on them.

A :class:`Model` maps tensor names to :class:`~streamvec.model.tensor.LazyTensor`. Opening a
checkpoint or a store gives a *source*; ``+``, ``-``, unary ``-``, scalar ``*`` and ``/`` and
:meth:`Model.filter` build a :class:`Combination`, a weighted sum of sources, so an expression
such as ``base + 0.4 * (math + code) - tox`` is evaluated in one streaming pass with no
intermediate written.

Checkpoints are *points* (models) and task-vector stores are *vectors*. The weights of the
points in a combination decide what it is: summing to 1 it is a model (``base + tau``), to 0 a
task vector (``ft - base``). A model keeps each tensor's base dtype and passes non-float tensors
(int/bool buffers) through from its *anchor*, the first checkpoint in the expression; a task
vector is float32 by default and leaves non-float tensors out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from streamvec.dtypes import dtype_name, is_float, parse_output_dtype
from streamvec.errors import MismatchError, StreamvecError
from streamvec.io.blocks import BlockReader
from streamvec.io.safetensors.requantize import fp8_outputs
from streamvec.model.nonfloat import INT_POLICIES, IntPolicy, NonFloatReader
from streamvec.model.tensor import LazyTensor
from streamvec.model.ties import TieRules, stored_partner
from streamvec.model.vocab import VocabChoice, VocabMismatch, align
from streamvec.names import NameFilter, combine_filters

if TYPE_CHECKING:
    from streamvec.engine.execute import RunReport

Kind = Literal["model", "task_vector", "combination"]
OnMissing = Literal["error", "base"]
_EPS = 1e-9
# save()'s own keywords; every other one is a run setting (streamvec.engine.settings.Settings)
_SAVE_ARGUMENTS = frozenset({"format", "description", "extra_attrs"})
# Where the settings that are not save()'s are given instead.
_SET_ELSEWHERE = {
    "vocab": "it belongs to the model: model.with_vocab('union').save(...)",
    "int_tensors": "it belongs to the model: model.on_changed_nonfloat('base').save(...)",
    "strict": "it applies when an adapter is opened: sv.open(adapter, base=..., strict=True)",
    "verify_inputs": "store reads follow streamvec.io.zarr.access.using_read_policy(...)",
}


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a source: its geometry and where its bytes are."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    reader: BlockReader


@dataclass(frozen=True)
class Source:
    """A checkpoint or store on disk. Equal when they are the same path and kind.

    Attributes:
        label: the path as given (for messages and provenance).
        is_point: True for a checkpoint (a model), False for a task-vector store.
        tensors: name -> tensor, in file order.
        info: provenance details (kind, fingerprint) recorded in outputs.
        sparse: a tensor it lacks is zero (a LoRA adapter touches a few tensors), not missing.
    """

    label: str
    is_point: bool
    key: str
    tensors: Mapping[str, SourceTensor] = field(compare=False, hash=False, repr=False)
    info: Mapping[str, Any] = field(compare=False, hash=False, repr=False, default_factory=dict)
    extra_files: tuple[str, ...] = field(compare=False, hash=False, repr=False, default=())
    # Which tensors the model shares (tied embeddings), and the weight file stem outputs keep.
    ties: TieRules | None = field(compare=False, hash=False, repr=False, default=None)
    stem: str = field(compare=False, hash=False, repr=False, default="model")
    sparse: bool = field(compare=False, hash=False, repr=False, default=False)


@dataclass(frozen=True)
class Term:
    """``coef * source``, active only on names that pass ``where`` (None: every name)."""

    coef: float
    source: Source
    where: NameFilter | None = None


class Model(Mapping[str, LazyTensor]):
    """A lazy mapping of tensor name to :class:`LazyTensor`, with task-arithmetic operators."""

    def combination(self) -> Combination:
        """This model as a weighted sum of sources (what the operators act on)."""
        raise NotImplementedError

    # What the engine needs; models that are not weighted sums (merge methods) override these.
    def resolved(self) -> Resolved:
        """Every output tensor, checked across sources (headers only)."""
        return self.combination().resolved()

    def anchor(self) -> Source | None:
        """The base checkpoint whose dtypes, buffers and config files a model output keeps."""
        return self.combination().anchor()

    def sources(self) -> list[Source]:
        """The distinct inputs, for provenance."""
        return self.combination().sources()

    def describe(self) -> str:
        """A one-line description of the computation, recorded in outputs."""
        return self.combination().describe()

    # -- Mapping ----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> LazyTensor:
        return self.resolved().tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.resolved().tensors)

    def __len__(self) -> int:
        return len(self.resolved().tensors)

    # -- algebra ----------------------------------------------------------------------------
    def __add__(self, other: object) -> Combination:
        if not isinstance(other, Model):
            return NotImplemented
        a, b = self.combination(), other.combination()
        return Combination(
            a.terms + b.terms,
            dtype=a.dtype or b.dtype,
            on_missing=a.on_missing,
            int_tensors=a.int_tensors,
            vocab=a.vocab or b.vocab,
        )

    def __sub__(self, other: object) -> Combination:
        if not isinstance(other, Model):
            return NotImplemented
        return self + (-other)

    def __neg__(self) -> Combination:
        return self * -1.0

    def __mul__(self, scalar: object) -> Combination:
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float, np.floating)):
            return NotImplemented
        c = self.combination()
        terms = tuple(Term(t.coef * float(scalar), t.source, t.where) for t in c.terms)
        return Combination(
            terms, dtype=c.dtype, on_missing=c.on_missing, int_tensors=c.int_tensors, vocab=c.vocab
        )

    __rmul__ = __mul__

    def __truediv__(self, scalar: object) -> Combination:
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float, np.floating)):
            return NotImplemented
        return self * (1.0 / float(scalar))

    def filter(
        self,
        include: str | list[str] | tuple[str, ...] | None = None,
        exclude: str | list[str] | tuple[str, ...] | None = None,
    ) -> Combination:
        """Restrict the edit to tensors whose names pass the filter.

        For a task vector, tensors outside the filter are dropped. For a model, tensors outside
        the filter keep the anchor's (the base's) value: ``(base + tau).filter("*attn*")``
        edits only attention tensors.

        Args:
            include: glob(s) or ``re:`` regex(es) a name must match (one of).
            exclude: glob(s) or ``re:`` regex(es) a name must not match.

        Example:
            >>> tv = (sv.open("ft") - sv.open("base")).filter("*.self_attn.*")  # doctest: +SKIP
        """
        inc = (include,) if isinstance(include, str) else include
        exc = (exclude,) if isinstance(exclude, str) else exclude
        f = NameFilter.from_patterns(inc, exc)
        c = self.combination()
        if f is None:
            return c
        anchor = c.anchor()
        if c.kind() == "model" and anchor is not None:
            # p.filter(f) = anchor + (p - anchor).filter(f)
            inner = (*c.terms, Term(-1.0, anchor))
            terms = (
                Term(1.0, anchor),
                *(Term(t.coef, t.source, combine_filters(t.where, f)) for t in inner),
            )
        else:
            terms = tuple(Term(t.coef, t.source, combine_filters(t.where, f)) for t in c.terms)
        return Combination(
            terms, dtype=c.dtype, on_missing=c.on_missing, int_tensors=c.int_tensors, vocab=c.vocab
        )

    def astype(self, dtype: str | np.dtype) -> Combination:
        """The same model with float tensors rounded to ``dtype`` (e.g. ``"bfloat16"``)."""
        c = self.combination()
        dt = parse_output_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
        return Combination(
            c.terms, dtype=dt, on_missing=c.on_missing, int_tensors=c.int_tensors, vocab=c.vocab
        )

    def keep_base_when_missing(self) -> Combination:
        """Where a term lacks a tensor, keep the anchor's value instead of failing."""
        c = self.combination()
        return Combination(
            c.terms, dtype=c.dtype, on_missing="base", int_tensors=c.int_tensors, vocab=c.vocab
        )

    def on_changed_nonfloat(self, policy: IntPolicy) -> Combination:
        """Where a fine-tune changed an int/bool tensor: ``error``, ``base`` or ``finetune``.

        See :mod:`streamvec.model.nonfloat`; the default is ``error``.
        """
        if policy not in INT_POLICIES:
            raise StreamvecError(
                f"int tensors: unknown policy {policy!r}; use one of {INT_POLICIES}"
            )
        c = self.combination()
        return Combination(
            c.terms, dtype=c.dtype, on_missing=c.on_missing, int_tensors=policy, vocab=c.vocab
        )

    def with_vocab(self, policy: str | None) -> Combination:
        """Combine inputs whose vocabularies differ: ``base``, ``common`` or ``union`` rows.

        See :mod:`streamvec.model.vocab`; None (the default) refuses a vocabulary difference.
        """
        c = self.combination()
        return Combination(
            c.terms, dtype=c.dtype, on_missing=c.on_missing, int_tensors=c.int_tensors, vocab=policy
        )

    # -- running ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], **options: Any) -> RunReport:
        """Compute every tensor and write the result, streaming block by block.

        A task vector goes to a Zarr store; a model to sharded safetensors in the Hugging Face
        layout (``format="zarr"`` or ``"safetensors"`` overrides). Options are those of
        :func:`streamvec.engine.execute.run`: ``workers``, ``scheduler``, ``memory_limit``,
        ``progress``, ``overwrite``, ``shard_size``, ``resume``.

        Returns:
            A :class:`~streamvec.engine.execute.RunReport` (tensors, bytes, seconds, checksums).

        Example:
            >>> (sv.open("ft") - sv.open("base")).save("tau.zarr")  # doctest: +SKIP
        """
        from streamvec.engine.execute import run
        from streamvec.engine.settings import ENGINE_SETTINGS, Settings

        settings = {k: v for k, v in options.items() if k not in _SAVE_ARGUMENTS}
        Settings.from_kwargs(settings)  # an unknown name or a bad value: one message
        for name in sorted(set(settings) - set(ENGINE_SETTINGS)):
            where = _SET_ELSEWHERE.get(name, "it applies to reading the inputs")
            raise StreamvecError(f"{name}: not a setting of save(); {where}")
        return run(self, path, **options)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


@dataclass(frozen=True)
class Resolved:
    """What a combination evaluates to, tensor by tensor."""

    kind: Kind
    tensors: dict[str, LazyTensor]
    skipped_nonfloat: tuple[str, ...]
    kept_base: tuple[str, ...]
    # What a --vocab policy made of differing vocabularies (None: they did not differ).
    vocab: VocabChoice | None = None


class Combination(Model):
    """A weighted sum of sources: ``sum(coef_i * source_i)``, with per-term name filters."""

    def __init__(
        self,
        terms: tuple[Term, ...],
        *,
        dtype: np.dtype | None = None,
        on_missing: OnMissing = "error",
        int_tensors: IntPolicy = "error",
        vocab: str | None = None,
    ) -> None:
        self.terms = _merge(terms)
        self.dtype = dtype
        self.on_missing: OnMissing = on_missing
        self.int_tensors: IntPolicy = int_tensors
        self.vocab = vocab
        self._resolved: Resolved | None = None

    def combination(self) -> Combination:
        return self

    def kind(self) -> Kind:
        """``model`` (checkpoint weights sum to 1), ``task_vector`` (0), else ``combination``."""
        # Filtered terms come in +/- pairs of the same source (see filter), so the plain sum
        # of point weights decides.
        w = sum(t.coef for t in self.terms if t.source.is_point)
        if abs(w - 1.0) < _EPS:
            return "model"
        if abs(w) < _EPS:
            return "task_vector"
        return "combination"

    def anchor(self) -> Source | None:
        """The first checkpoint in the expression: the base of a model."""
        return next((t.source for t in self.terms if t.source.is_point), None)

    def sources(self) -> list[Source]:
        seen: dict[Source, None] = {}
        for t in self.terms:
            seen.setdefault(t.source, None)
        return list(seen)

    def describe(self) -> str:
        parts = []
        for t in self.terms:
            w = f" [{t.where.describe()}]" if t.where is not None else ""
            parts.append(f"{t.coef:+g}*{t.source.label}{w}")
        return " ".join(parts) or "0"

    def resolved(self) -> Resolved:
        """Resolve every tensor (headers only), checking names, shapes and dtypes."""
        if self._resolved is None:
            self._resolved = _resolve(self)
        return self._resolved


def _merge(terms: tuple[Term, ...]) -> tuple[Term, ...]:
    merged: dict[tuple[Source, NameFilter | None], float] = {}
    for t in terms:
        key = (t.source, t.where)
        merged[key] = merged.get(key, 0.0) + t.coef
    return tuple(Term(c, s, w) for (s, w), c in merged.items())


def _resolve(comb: Combination) -> Resolved:
    kind = comb.kind()
    anchor = comb.anchor()
    names: dict[str, None] = {}
    for s in comb.sources():
        for n in s.tensors:
            names.setdefault(n, None)
    tensors: dict[str, LazyTensor] = {}
    skipped: list[str] = []
    kept_base: list[str] = []
    missing: list[str] = []
    mismatched: list[str] = []
    vocab_problems: list[str] = []
    vocab: VocabChoice | None = None
    rules = [s.ties for s in comb.sources() if s.ties is not None]
    for name in names:
        active = [t for t in comb.terms if t.where is None or t.where(name)]
        if not active:
            continue
        if kind == "model" and anchor is not None and name not in anchor.tensors:
            if stored_partner(name, anchor.tensors, rules) is not None:
                # The base stores this tensor only as its tied partner, and the output keeps
                # the base's config and layout: transformers ties it on load.
                check_tied_copies(name, active, rules)
                continue
        base = anchor.tensors.get(name) if anchor is not None else None
        if kind == "model" and base is not None and not is_float(base.dtype):
            # Task vectors carry no int/bool buffers: those pass through from the base, and
            # only other checkpoints are required to have them.
            active = [t for t in active if t.source.is_point]
        # A sparse source (an adapter) lacking a tensor contributes zero to it.
        active = [
            t for t in active if not t.source.sparse or tensor_of(t.source, name, rules) is not None
        ]
        if not active:
            continue
        lacking = [t.source.label for t in active if tensor_of(t.source, name, rules) is None]
        if lacking:
            if comb.on_missing == "base" and anchor is not None and name in anchor.tensors:
                if kind == "model":
                    active = [Term(1.0, anchor)]
                    kept_base.append(name)
                else:
                    continue
            else:
                missing.append(f"{name} (missing in {', '.join(lacking)})")
                continue
        parts: list[tuple[float, SourceTensor]] = []
        for t in active:
            found = tensor_of(t.source, name, rules)
            assert found is not None  # lacking terms were handled above
            parts.append((t.coef, found))
        shapes = {p.shape for _, p in parts}
        if len(shapes) > 1:
            reference = anchor if kind == "model" else _negative_point(comb)
            try:
                aligned = align(
                    name,
                    [(c, p, t.source) for (c, p), t in zip(parts, active, strict=True)],
                    comb.vocab,
                    reference,
                )
            except VocabMismatch as exc:
                vocab_problems.append(str(exc))
                continue
            if aligned is not None:
                parts, choice = aligned
                vocab = vocab or choice
                shapes = {p.shape for _, p in parts}
        if len(shapes) > 1:
            detail = ", ".join(
                f"{t.source.label}: {list(p.shape)}"
                for t, (_, p) in zip(active, parts, strict=True)
            )
            mismatched.append(f"{name} shapes differ ({detail})")
            continue
        floats = {is_float(p.dtype) for _, p in parts}
        if floats == {True, False}:
            detail = ", ".join(
                f"{t.source.label}: {dtype_name(p.dtype)}"
                for t, (_, p) in zip(active, parts, strict=True)
            )
            mismatched.append(f"{name} mixes float and non-float dtypes ({detail})")
            continue
        first = parts[0][1]
        if floats == {False}:
            if kind == "model" and base is not None and anchor is not None:
                reader = nonfloat_reader(name, anchor, base, active, comb.int_tensors)
                tensors[name] = LazyTensor(name, base.shape, base.dtype, ((1.0, reader),))
            else:
                skipped.append(name)
            continue
        if kind == "model" and base is not None:
            out_dtype = base.dtype
        else:
            out_dtype = np.dtype(np.float32)
        if comb.dtype is not None:
            out_dtype = comb.dtype
        terms = _collapse([(c, p.reader) for c, p in parts])
        point = {p.reader: t.source.is_point for t, (_, p) in zip(active, parts, strict=True)}
        points = _points(terms, point)
        if kind == "model" and base is not None and comb.dtype is None:
            stored = fp8_outputs(name, base.reader, first.shape, terms, points)  # FP8 stays FP8
            if stored is not None:
                tensors.update(stored)
                continue
        tensors[name] = LazyTensor(name, first.shape, np.dtype(out_dtype), terms, points=points)
    if vocab_problems:
        more = f" (and {len(vocab_problems) - 1} more tensors)" if len(vocab_problems) > 1 else ""
        raise MismatchError(f"inputs do not match: {vocab_problems[0]}{more}")
    problems = missing + mismatched
    if problems:
        shown = "; ".join(problems[:6])
        more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        # Never suggest keeping the base for a tensor tied to another: that writes an edited
        # embedding next to an unedited head (a silently untied model).
        tied = any(r.partners(m.split(" ")[0]) for m in missing for r in rules)
        hint = (
            " (pass --missing keep-base to keep the base value for missing tensors)"
            if missing and kind == "model" and not tied
            else ""
        )
        raise MismatchError(f"inputs do not match: {shown}{more}{hint}")
    if not tensors:
        raise StreamvecError(
            f"the expression selects no floating-point tensors ({comb.describe()}); "
            "check --include/--exclude"
        )
    return Resolved(kind, tensors, tuple(skipped), tuple(kept_base), vocab)


def tensor_of(source: Source, name: str, rules: list[TieRules]) -> SourceTensor | None:
    """``source``'s tensor ``name``, or the tied tensor it stores instead (None: neither)."""
    found = source.tensors.get(name)
    if found is not None:
        return found
    partner = stored_partner(name, source.tensors, rules)
    return source.tensors[partner] if partner is not None else None


def check_tied_copies(name: str, active: list[Term], rules: list[TieRules]) -> None:
    """Refuse a term that stores ``name`` apart from, and unlike, the tensor it is tied to.

    transformers loads such a checkpoint untied (its own head), which the base's tied layout
    cannot hold; equal copies (what older savers wrote) are the same tensor and are fine.
    """
    from streamvec.model.ties import tied_copies_equal

    for t in active:
        stored = t.source.tensors.get(name)
        if stored is None:
            continue
        partner = stored_partner(name, t.source.tensors, rules)
        if partner is None or not tied_copies_equal(stored, t.source.tensors[partner]):
            raise MismatchError(
                f"{t.source.label}: stores {name} apart from {partner or 'its tied tensor'} "
                "with different values (transformers loads it untied), while the base ties "
                f"them and the output keeps the base's tied layout; edit the tied tensor only "
                f"(--exclude {name}), or use a base whose config.json has "
                "tie_word_embeddings false"
            )


def _negative_point(comb: Combination) -> Source | None:
    """The checkpoint subtracted in a task vector (``ft - base``): its base."""
    return next((t.source for t in comb.terms if t.source.is_point and t.coef < 0), None)


def nonfloat_reader(
    name: str, anchor: Source, base: SourceTensor, active: list[Term], policy: IntPolicy
) -> BlockReader:
    """The base's reader for an int/bool tensor, checked against the other checkpoints."""
    others = tuple(
        (t.source.label, t.source.tensors[name].reader)
        for t in active
        if t.source.is_point and t.source != anchor and name in t.source.tensors
    )
    seen: dict[str, BlockReader] = {}
    for label, reader in others:
        seen.setdefault(label, reader)
    if not seen or policy == "base":
        return base.reader
    return NonFloatReader(name, base.reader, anchor.label, tuple(seen.items()), policy)


def _collapse(terms: list[tuple[float, BlockReader]]) -> tuple[tuple[float, BlockReader], ...]:
    """Sum coefficients of identical readers (filtered +/- pairs) and drop zero weights."""
    acc: dict[BlockReader, float] = {}
    for c, r in terms:
        acc[r] = acc.get(r, 0.0) + c
    kept = tuple((c, r) for r, c in acc.items() if c != 0.0)
    if kept:
        return kept
    # Everything cancelled (ft - ft): keep one zero-weight term so the result is zeros.
    first = terms[0][1]
    return ((0.0, first),)


def _points(
    terms: tuple[tuple[float, BlockReader], ...], point: Mapping[BlockReader, bool]
) -> tuple[bool, ...]:
    """Which terms are checkpoints, when two or more are (the kernel's delta form)."""
    flags = tuple(point.get(r, False) for _, r in terms)
    return flags if sum(flags) >= 2 else ()


class SourceModel(Model):
    """A checkpoint or a store opened with :func:`streamvec.open`."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def combination(self) -> Combination:
        return Combination((Term(1.0, self.source),))

    def __repr__(self) -> str:
        what = "checkpoint" if self.source.is_point else "task-vector store"
        return f"<streamvec {what} {self.source.label}: {len(self.source.tensors)} tensors>"
