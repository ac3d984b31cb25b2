"""``sv.stats``: task-vector analytics in one streaming pass."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from streamvec.compute.linalg.blas import limit_blas_threads
from streamvec.compute.linalg.defaults import DEFAULT_POWER_ITERS
from streamvec.engine.settings import Settings
from streamvec.errors import StreamvecError
from streamvec.ops.stats.accumulate import TensorMoments
from streamvec.ops.stats.defaults import DEFAULT_DENSITY, DEFAULT_RESIDUAL
from streamvec.ops.stats.grouping import layer_of, module_kind
from streamvec.ops.stats.inputs import StatsInputs, open_inputs
from streamvec.ops.stats.result import Figures, Stats
from streamvec.ops.stats.runner import TopSets, run_stats_pass
from streamvec.ops.stats.sample import DEFAULT_SAMPLE, sampleable
from streamvec.ops.stats.spectrum import Spectrum, SpectrumOptions, spectra


@dataclass(frozen=True)
class StatsOptions:
    """What ``stats`` computes beyond the always-on figures.

    Attributes:
        density: share of largest-magnitude entries per tensor whose overlap between task
            vectors is measured (0: skip it).
        exact_topk: find each top set's threshold with a histogram pass (to within one
            2^-7 magnitude bin, holding the exact top k) and count in a second pass, instead
            of from a sample of each tensor in the one pass (tensors of stores and other
            inputs without cheap scattered reads always take this way).
        topk_sample: elements sampled per tensor for the thresholds (tensors up to this
            size are read whole: exact).
        spectrum: ``K`` top singular values per matrix by randomized SVD (0: only those an
            SVD store term already holds).
        residual: residual energy share the LoRA ranks are given for.
        oversample: extra probes of the randomized SVD.
        power_iters: its power iterations (None: chosen per matrix).
        seed: its seed.
    """

    density: float = DEFAULT_DENSITY
    exact_topk: bool = False
    topk_sample: int = DEFAULT_SAMPLE
    spectrum: int = 0
    residual: float = DEFAULT_RESIDUAL
    oversample: int = 10
    power_iters: int | None = DEFAULT_POWER_ITERS
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.density <= 1.0:
            raise StreamvecError(f"--density must be between 0 and 1, got {self.density}")
        if self.topk_sample < 256:
            raise StreamvecError(f"topk_sample must be >= 256, got {self.topk_sample}")
        if self.spectrum < 0:
            raise StreamvecError(f"--spectrum must be >= 0, got {self.spectrum}")
        if not 0.0 < self.residual < 1.0:
            raise StreamvecError(f"--residual must be between 0 and 1, got {self.residual}")


def stats(
    terms: Sequence[str | os.PathLike[str]],
    *,
    base: str | os.PathLike[str] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    labels: list[str] | None = None,
    vocab: str | None = None,
    options: StatsOptions | None = None,
    workers: int | None = None,
    scheduler: str = "threads",
    memory_limit: str | int | None = None,
    block_size: str | int | None = None,
    progress: bool = False,
) -> Stats:
    """Norms, cosines, sign conflicts, top-k overlaps and spectra of task vectors.

    One streaming pass over the inputs computes every figure, the top-k overlaps with
    thresholds sampled from each tensor (``exact_topk``: a second pass); ``--spectrum K``
    adds the passes of a randomized SVD per matrix and task vector.

    Args:
        terms: task-vector stores, SVD stores, or fine-tuned checkpoints (with ``base``).
        base: the base checkpoint (checkpoint terms; relative sizes).
        include: only tensors matching these patterns.
        exclude: leave out tensors matching these.
        labels: names of the terms in outputs (default: last path components).
        vocab: a fine-tune with a resized vocabulary: ``base`` (its rows cut to the base's)
            or ``common`` (the rows all share); ``union`` is refused (the task vectors would
            differ in shape, and figures compare them row by row).
        options: density, spectrum rank, residual.
        workers: blocks in flight at once.
        scheduler: ``threads``, ``processes``, ``sync``, ``local:N`` or an address.
        memory_limit: ceiling on anonymous memory (default: half of available).
        block_size: target float32 bytes per row block.
        progress: show progress bars.

    Returns:
        A :class:`~streamvec.ops.stats.result.Stats`.

    Example:
        >>> import streamvec as sv
        >>> st = sv.stats(["ft-a", "ft-b"], base="base")  # doctest: +SKIP
        >>> st.names, st.overall.cosine[0, 0, 1]  # doctest: +SKIP
        (('ft-a', 'ft-b'), 0.021)
    """
    opts = options or StatsOptions()
    inputs = open_inputs(
        [str(t) for t in terms],
        base=base,
        include=include,
        exclude=exclude,
        labels=labels,
        vocab=vocab,
    )
    run = Settings(
        workers=workers,
        scheduler=scheduler,
        memory_limit=memory_limit,
        progress=progress,
        block_size=block_size,
    )
    # Each block's products are small BLAS calls; a multi-threaded BLAS wakes its pool for
    # each (measured 50x slower than the arithmetic on a loaded machine), while the
    # scheduler already keeps `workers` blocks in flight.
    with limit_blas_threads(1):
        moments = _moments(inputs, run, opts)
    figures = _figures(inputs, moments)
    found: dict[str, list[Spectrum | None]] = {}
    subspace: dict[str, np.ndarray] = {}
    energies = {t.name: np.diag(moments[t.name].gram).copy() for t in inputs.tensors}
    svd_run = replace(run, progress=False)
    spec_options = SpectrumOptions(opts.spectrum, opts.oversample, opts.power_iters, opts.seed)
    for name, specs, overlaps in spectra(inputs.tensors, energies, spec_options, svd_run):
        found[name] = specs
        subspace[name] = overlaps
    return Stats(
        inputs.names,
        figures,
        tuple(module_kind(t.name) for t in inputs.tensors),
        tuple(layer_of(t.name) for t in inputs.tensors),
        inputs.base,
        opts.density,
        found,
        subspace,
        opts.residual,
        inputs.skipped_nonfloat,
    )


def _moments(inputs: StatsInputs, run: Settings, opts: StatsOptions) -> dict[str, TensorMoments]:
    if opts.density == 0:
        return run_stats_pass(inputs.tensors, run)
    sample = opts.topk_sample
    quick = (
        []
        if opts.exact_topk
        else [t for t in inputs.tensors if sampleable(t.shape, t.readers, sample)]
    )
    out: dict[str, TensorMoments] = {}
    if quick:
        # thresholds from a sample of each tensor, counted in the same pass
        out.update(run_stats_pass(quick, run, top=TopSets(opts.density, sample)))
    rest = [t for t in inputs.tensors if t.name not in out]
    if not rest:
        return out
    # histogram thresholds (to within one 2^-7 magnitude bin), counted in a second pass
    first = run_stats_pass(rest, run, histogram=True, density=opts.density)
    given = {name: m.thresholds for name, m in first.items()}
    counts = run_stats_pass(
        rest,
        run,
        moments=False,
        top=TopSets(opts.density, sample, given),
        desc="stats (top-k overlaps)",
    )
    out.update({name: replace(m, top_both=counts[name].top_both) for name, m in first.items()})
    return out


def _figures(inputs: StatsInputs, moments: dict[str, TensorMoments]) -> Figures:
    ts = inputs.tensors
    n = len(inputs.names)
    m = [moments[t.name] for t in ts]
    nan = np.full((n, n), np.nan)
    return Figures(
        tuple(t.name for t in ts),
        inputs.names,
        np.array([t.numel for t in ts], np.int64),
        np.ones(len(ts), np.int64),
        np.stack([x.gram for x in m]),
        np.stack([x.absgram for x in m]),
        np.stack([x.maxabs for x in m]),
        np.stack([x.zeros for x in m]),
        np.array([x.base_sq if t.base >= 0 else np.nan for x, t in zip(m, ts, strict=True)]),
        np.stack([x.top_both.astype(np.float64) if x.top_both.size else nan for x in m]),
    )
