"""SVD-based merges of several task vectors: TSV-M and Iso-C (``streamvec merge-svd``).

Per weight matrix (a tensor with more than two axes is its ``(shape[0], prod(rest))`` matrix),
with ``T`` tasks and rank budget ``K`` (default ``min(m, n)``, the papers' full rank):

* **TSV-M** (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
  Merging", CVPR 2025): each task keeps its top ``k = max(1, K // T)`` triplets
  ``U_i S_i V_i^T``; the concatenations ``U = [U_1 .. U_T]`` and ``V = [V_1 .. V_T]`` are
  replaced by their orthogonal polar factors (``X = P Sigma Q^T -> P Q^T``), and the merged
  update is ``U_perp diag([S_1 .. S_T]) V_perp^T``
  (:func:`streamvec.compute.linalg.tsv_merge`).
* **Iso-C** (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025): with ``sum_i tau_i = U diag(S) V^T`` (rank ``K``), the
  merged update is ``mean(S) U V^T``, a flat spectrum on the summed task's subspace
  (:func:`streamvec.compute.linalg.iso_c_merge`).

Tensors that are not matrices are averaged: ``mean_i tau_i``. The result is
``alpha * merged`` (a task-vector store) or, with ``--base``, ``base + alpha * merged`` (an
edited model in the Hugging Face layout).

Memory: per matrix only the factors are ever held (``(m + n) K`` numbers); both merges are
low-rank products, so the factors are written to an SVD store in the hidden sibling
``.OUT.factors.partial`` and the (m x n) result is produced by the engine block by block as
``U[r0:r1] diag(S) Vh`` (:mod:`streamvec.io.zarr.lowrank`), in bounded memory. The factors
are a job of their own (:class:`streamvec.engine.jobs.Job`): a run stopped while factoring or
while writing the output continues with ``--resume``; the factors are removed once the output
is complete.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streamvec.engine.execute import RunReport
from streamvec.engine.jobs import Job, JobPlan, whole_tensor_digests
from streamvec.errors import StreamvecError
from streamvec.io.blocks import matrix_shape
from streamvec.io.output import check_destination, finished, input_paths
from streamvec.io.zarr.lowrank import SVDStoreWriter, is_factored_shape
from streamvec.model.sources import open as open_model
from streamvec.ops.factorize import factor_budget
from streamvec.ops.registry import check_settings
from streamvec.ops.svd import (
    Factorizer,
    RunOptions,
    SVDOptions,
    dask_compute_kwargs,
    source_dtype,
    task_vector_of,
    tensor_seed,
)
from streamvec.version import __version__

__all__ = ["MERGES", "SVDMergeReport", "iso_c_factors", "merge_svd", "tsv_factors"]

SVDMergeKind = Literal["tsv", "iso-c"]
MERGES: tuple[SVDMergeKind, ...] = ("tsv", "iso-c")


def _polar(x: np.ndarray) -> np.ndarray:
    """Orthogonal polar factor ``P Q^T`` of ``x = P Sigma Q^T`` (float64)."""
    p, _, qh = np.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_factors(
    factors: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The TSV-M merge of one matrix as factors ``(U_perp, S_cat, V_perp^T)``.

    The same arithmetic as :func:`streamvec.compute.linalg.tsv_merge` (which returns the dense
    product), kept factored so the (m x n) result can be streamed block by block.

    Args:
        factors: per task ``(U_i, S_i, Vh_i)``, shapes (m, k_i), (k_i,), (k_i, n).
        rank: total rank budget ``K``; each task keeps ``max(1, K // T)`` triplets.

    Returns:
        ``U_perp`` (m, K'), ``S_cat`` (K',), ``V_perp^T`` (K', n), float64, with
        ``K' = T * k`` (fewer when a task has fewer triplets).

    Example:
        >>> u, s, vh = tsv_factors([(u1, s1, vh1), (u2, s2, vh2)], 8)  # doctest: +SKIP
        >>> merged = (u * s) @ vh  # doctest: +SKIP
    """
    if not factors:
        raise StreamvecError("TSV-M needs at least one task's factors")
    k = max(1, rank // len(factors))
    u_cat = np.concatenate([np.asarray(u, np.float64)[:, :k] for u, _, _ in factors], axis=1)
    s_cat = np.concatenate([np.asarray(s, np.float64)[:k] for _, s, _ in factors])
    v_cat = np.concatenate([np.asarray(vh, np.float64)[:k].T for _, _, vh in factors], axis=1)
    return _polar(u_cat), s_cat, _polar(v_cat).T


def iso_c_factors(
    u: np.ndarray, s: np.ndarray, vh: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Iso-C merge of one matrix as factors ``(U, mean(S) * 1, Vh)``.

    Args:
        u: (m, k) left singular vectors of the summed task vector.
        s: (k,) its singular values.
        vh: (k, n) its right singular vectors.

    Returns:
        ``(U, S_iso, Vh)`` with every entry of ``S_iso`` equal to ``mean(S)``.

    Example:
        >>> iso_c_factors(np.eye(2), np.array([3.0, 1.0]), np.eye(2))[1]
        array([2., 2.])
    """
    if s.shape[0] == 0:
        raise StreamvecError("Iso-C needs at least one singular triplet")
    return u, np.full(s.shape[0], float(np.mean(s))), vh


@dataclass
class SVDMergeReport:
    """What ``streamvec merge-svd`` did: the engine's report plus the factorization summary."""

    run: RunReport
    method: str
    methods: Counter[str]
    ranks: dict[str, int]

    def summary(self) -> str:
        """One line for the terminal."""
        how = ", ".join(f"{n} {m}" for m, n in sorted(self.methods.items())) or "none"
        return (
            f"{self.method}: {len(self.ranks)} matrices merged ({how} SVDs); {self.run.summary()}"
        )


def merge_svd(
    method: str,
    terms: list[str],
    output: str | os.PathLike[str],
    *,
    options: SVDOptions,
    rank: int | None = None,
    alpha: float = 1.0,
    base: str | os.PathLike[str] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    dtype: str | None = None,
    shard_size: str | int | None = None,
    run: RunOptions | None = None,
) -> SVDMergeReport:
    """Merge task vectors by TSV-M or Iso-C; write ``alpha * merged`` or ``base + alpha * merged``.

    Args:
        method: ``tsv`` or ``iso-c``.
        terms: task-vector stores (or checkpoints, with ``base``), at least one.
        output: a Zarr store (no base) or a sharded safetensors directory (with base).
        options: oversampling, power iterations, seed and method of the SVDs
            (``options.rank`` is ignored; see ``rank``).
        rank: rank budget ``K`` per matrix (default ``min(m, n)``, the papers' setting).
        alpha: the global scaling coefficient.
        base: base checkpoint: output the edited model; also forms checkpoint terms' tau.
        include: only tensors matching these patterns (with ``base``, others keep the base).
        exclude: leave out tensors matching these.
        dtype: output dtype (default: the base's, or float32 for a task vector).
        shard_size: safetensors shard size of an edited model (default: ``run.shard_size``).
        run: workers, scheduler, memory limit, progress, overwrite.

    Returns:
        A :class:`SVDMergeReport`.

    Raises:
        StreamvecError: unknown method, bad rank or alpha, mismatched inputs, or a matrix
            that cannot be factored within the memory budget.

    Example:
        >>> merge_svd("tsv", ["a.zarr", "b.zarr"], "merged", options=SVDOptions(rank=1),
        ...           base="llama-base", alpha=1.0)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from streamvec.engine.execute import run as run_engine

    run = run or RunOptions()
    # the same check as the CLI's: a setting this command cannot honour is refused
    check_settings("merge-svd", run)
    if method not in MERGES:
        raise StreamvecError(f"merge method must be one of {', '.join(MERGES)}, got {method!r}")
    if not terms:
        raise StreamvecError("merge-svd needs at least one task vector")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise StreamvecError(f"--rank must be a positive integer, got {rank!r}")
    if not math.isfinite(alpha):
        raise StreamvecError("--alpha must be a finite number")
    if method == "tsv" and rank is not None and rank < len(terms):
        raise StreamvecError(
            f"--rank {rank} leaves no singular triplet per task for {len(terms)} tasks "
            f"(TSV-M keeps rank // tasks each; need --rank >= {len(terms)})"
        )
    out_path = Path(output)
    taus = [
        task_vector_of(
            t,
            base,
            include=include,
            exclude=exclude,
            base_for_stores="ignore",
            vocab=run.vocab,
            strict=run.strict,
        )
        for t in terms
    ]
    # The factor phase can take long and writes beside the output: check the destination
    # (never over an input) before it, not only when the engine opens the output.
    inputs = [s for tau in taus for s in tau.sources()]
    if base is not None:
        inputs.append(open_model(base).source)
    check_destination(out_path, overwrite=run.overwrite, inputs=input_paths(inputs))
    total = taus[0].combination()
    for tau in taus[1:]:
        total = total + tau
    summed = total.resolved().tensors  # checks names and shapes agree
    mean = (total / len(taus)).resolved().tensors
    # Every input with weight 0: no arithmetic (zero terms are dropped from the sums), but
    # each task vector is then aligned to the vocabulary of all the inputs, so that with
    # --vocab the tasks' matrices have the same rows as the summed one.
    context = 0.0 * total
    per_task = [
        (tau + context if run.vocab is not None else tau).resolved().tensors for tau in taus
    ]

    merge_attrs = {
        "method": method,
        "rank": rank,
        "alpha": alpha,
        "inputs": [str(t) for t in terms],
        "non_matrix": "mean of the task vectors",
        "paper": "Gargiulo et al., CVPR 2025 (TSV-M)"
        if method == "tsv"
        else "Marczak et al., ICML 2025 (Iso-C)",
    }
    methods: Counter[str] = Counter()
    ranks: dict[str, int] = {}
    factor_attrs = {
        "operation": f"merge-svd {method}",
        "created_by": f"streamvec {__version__}",
        "merge": merge_attrs,
        **{k: v for k, v in options.attrs().items() if k != "rank"},
    }

    def inputs_of(name: str) -> list[Any]:
        """The tensors the merged tensor ``name`` is computed from (their digests' order)."""
        if not is_factored_shape(summed[name].shape):
            return [mean[name]]
        return [summed[name]] if method == "iso-c" else _having(name, per_task)

    identity = {
        "attrs": factor_attrs,
        "sources": [[s.info for s in tau.sources()] for tau in taus],
        "tensors": [[n, list(t.shape)] for n, t in summed.items()],
        "settings": run.output_identity(),
    }
    # The merged factors are a job of their own, in a hidden sibling of the output: a run
    # stopped while factoring or while writing the output resumes from what it finished.
    factors = Job(
        out_path.absolute().parent / f".{out_path.name}.factors",
        inputs=input_paths(inputs),
        plan=JobPlan(identity, {}, factor_budget(run)),
        resume=run.resume,
        intermediate=True,
    )
    with factors:
        if factors.resumed:
            factors.check_done({n: inputs_of(n) for n in summed})
        done = factors.done_tensors()
        # each matrix is planned with the budget the job records (the unfinished run's)
        factor_run = factors.budgeted(run)
        writer = SVDStoreWriter(factors.partial, factor_attrs, reopen=factors.resumed)
        with dask_compute_kwargs(factor_run.scheduler, factor_run.resolved_workers()) as kwargs:
            factorizer = Factorizer(options, factor_run, kwargs, factors.budget["bytes"])
            desc = f"{out_path.name} ({method})"
            bar = tqdm(summed, desc=desc, unit="tensor", disable=not run.progress)
            for name in bar:
                t_sum = summed[name]
                if name in done:
                    recorded = writer.factor_attrs(name)
                    if recorded is not None:  # a matrix: what the unfinished run found
                        ranks[name] = int(recorded["rank"])
                        # the plans are those of the recorded budget, as then
                        tasks = inputs_of(name)
                        k = int(recorded["budget"])
                        k = k if method == "iso-c" else max(1, k // len(tasks))
                        methods.update(factorizer.plan(t, k).method for t in tasks)
                    continue
                digests: list[str] = []
                if not is_factored_shape(t_sum.shape):
                    writer.write_dense(name, mean[name].compute(), source_dtype(t_sum))
                    digests = whole_tensor_digests(mean[name])
                else:
                    m, n = matrix_shape(t_sum.shape)
                    budget_k = min(m, n) if rank is None else min(rank, m, n)
                    seed = tensor_seed(options.seed, name)
                    u, s, vh = _merge_matrix(
                        method,
                        budget_k,
                        seed,
                        t_sum,
                        inputs_of(name),
                        factorizer,
                        methods,
                        digests,
                    )
                    ranks[name] = int(s.shape[0])
                    writer.write_factors(
                        name,
                        t_sum.shape,
                        source_dtype(t_sum),
                        u,
                        s,
                        vh,
                        {
                            "rank": int(s.shape[0]),
                            "merge": method,
                            "budget": budget_k,
                            "seed": seed,
                        },
                    )
                factors.record_tensor(name, digests)
        factors.log.flush()
        writer.finish()
        merged = float(alpha) * open_model(factors.partial)
        # With a base, the fine-tunes (weight 0) say which rows the vocabulary has and whose
        # rows added tokens take (--vocab union); the merged store has no config.json.
        # Only then: weight-0 checkpoints would otherwise add checks (int buffers) to a merge
        # that never read them.
        model = open_model(base) + merged if base is not None else merged
        if base is not None and any(
            s.info.get("kind") == "lora_adapter" for tau in taus for s in tau.sources()
        ):
            # Adapters change only the modules they target: the merged factors hold those,
            # and every other tensor of the model is the base's (a zero task vector).
            model = model.keep_base_when_missing()
        if base is not None and run.vocab is not None:
            model = model + context
        model = model.filter(include, exclude)
        if dtype:
            model = model.astype(dtype)
        sources = [s.info for tau in taus for s in tau.sources()]
        if base is not None:
            sources.append(open_model(base).source.info)
        # --resume continues the output's own unfinished blocks too (the engine's job).
        try:
            report = run_engine(
                model.combination(),
                out_path,
                description=f"merge-svd {method}",
                extra_attrs={
                    "merge": merge_attrs,
                    "expression": f"{'base + ' if base is not None else ''}{alpha:g} * "
                    f"{method}({', '.join(str(t) for t in terms)})",
                    "sources": _unique(sources),
                    **{k: v for k, v in options.attrs().items() if k != "rank"},
                },
                **{**run.engine_kwargs(), "shard_size": shard_size or run.shard_size},
            )
        except KeyboardInterrupt:
            # A signal during the output's final rename is raised once the output is
            # complete: its factors are then not needed by any --resume.
            if finished(out_path):
                factors.discard()
            raise
        factors.discard()  # the output is complete: the factors are no longer needed
    return SVDMergeReport(report, method, methods, ranks)


def _unique(infos: list[Any]) -> list[Any]:
    seen: list[Any] = []
    for i in infos:
        if i not in seen:
            seen.append(i)
    return seen


def _having(name: str, per_task: list[dict[str, Any]]) -> list[Any]:
    """The tasks' tensors ``name``: a LoRA adapter that does not target it has none (its task
    vector there is zero, so it takes no part in that tensor's merge)."""
    return [p[name] for p in per_task if name in p]


def _merge_matrix(
    method: str,
    budget: int,
    seed: int,
    t_sum: Any,
    tensors: list[Any],
    factorizer: Factorizer,
    methods: Counter[str],
    digests: list[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The merged factors of one matrix; each factored input's digests go to ``digests``."""
    if method == "iso-c":
        result, plan = factorizer.factor(t_sum, budget, seed)
        digests.extend(factorizer.input_digests(t_sum))
        methods[plan.method] += 1
        return iso_c_factors(result.U, result.S, result.Vh)
    k = max(1, budget // len(tensors))
    per_task = []
    for t in tensors:
        result, plan = factorizer.factor(t, k, seed)
        digests.extend(factorizer.input_digests(t))
        methods[plan.method] += 1
        per_task.append((result.U, result.S, result.Vh))
    return tsv_factors(per_task, k * len(tensors))
