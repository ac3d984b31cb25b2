"""Truncated SVD of every matrix of a task vector, into an SVD store (``streamvec svd``).

Each matrix ``tau`` (m x n; a tensor with more axes is its ``(shape[0], prod(rest))`` matrix)
is factored as ``U diag(S) Vh`` with ``k = min(rank, m, n)`` triplets by one of two methods,
chosen per matrix (:func:`plan_svd`):

* ``exact``: read the whole matrix once and run LAPACK's float64 SVD
  (:func:`streamvec.compute.linalg.exact_svd`); used when it fits the memory budget and its
  estimated
  time is lower (small matrices, or ``k`` close to ``min(m, n)``);
* ``randomized``: Halko, Martinsson & Tropp (2011) randomized subspace iteration over row blocks
  (:func:`streamvec.compute.linalg.randomized_svd`), ``2 + 2q`` streaming passes, never more than a
  few
  blocks plus ``(m + n) x (k + p)`` factors in memory; used whenever the matrix does not fit,
  and when it is faster.

When SOURCE is ``FINETUNED`` with ``--base BASE`` the task vector is recomputed block by block
(``ft - base``, in float32) on every pass and never stored. Tensors that are not matrices are
stored dense. The random test matrix of each tensor is seeded from ``(seed, tensor name)``, so
a tensor's factors depend neither on which other tensors are selected nor on their order.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streamvec.compute.linalg.rsvd import (
    SVDResult,
)
from streamvec.dtypes import dtype_name, is_float
from streamvec.engine.jobs import (
    Job,
    JobPlan,
)
from streamvec.engine.settings import Settings
from streamvec.errors import StreamvecError
from streamvec.io.blocks import matrix_shape
from streamvec.io.companions import write_model_card
from streamvec.io.output import check_free_space, input_paths
from streamvec.io.zarr.lowrank import SVDStoreWriter, is_factored_shape
from streamvec.model.algebra import Combination, Model
from streamvec.model.sources import open as open_model
from streamvec.model.tensor import LazyTensor
from streamvec.ops.factorize import (  # re-exported: the API's names
    SVD_METHODS,
    Factorizer,
    SVDOptions,
    SVDPlan,
    dask_compute_kwargs,
    factor_budget,
    matrix_dask,
    plan_svd,
    tensor_seed,
)
from streamvec.ops.registry import check_settings
from streamvec.version import __version__

__all__ = [
    "SVD_METHODS",
    "Factorizer",
    "RunOptions",
    "SVDOptions",
    "SVDPlan",
    "SVDReport",
    "matrix_dask",
    "plan_svd",
    "source_dtype",
    "svd",
    "task_vector_of",
    "tensor_seed",
]


# How to run: the one settings type (the name stays for the API's callers).
RunOptions = Settings


def source_dtype(t: LazyTensor) -> str | list[str]:
    """The dtype(s) of a tensor's inputs, as recorded in store attrs."""
    names = sorted({dtype_name(r.dtype) for _, r in t.terms})
    return names[0] if len(names) == 1 else names


def task_vector_of(
    path: str | os.PathLike[str],
    base: str | os.PathLike[str] | None,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    base_for_stores: Literal["error", "ignore"] = "error",
    strict: bool = False,
    vocab: str | None = None,
) -> Combination:
    """The lazy task vector a command-line SOURCE/TERM names.

    A task-vector store (or an SVD store) is used as it is; a checkpoint needs ``base`` and
    gives ``ft - base``, recomputed block by block whenever it is read; a PEFT LoRA adapter
    is its ``scaling * B @ A`` per target, its names mapped through ``base`` when given.

    Args:
        path: a store or a checkpoint.
        base: the base checkpoint, for checkpoint inputs.
        include: only tensors matching these patterns.
        exclude: leave out tensors matching these.
        base_for_stores: with a store and a ``base``: fail (``error``) or use the store as is.
        strict: with an adapter, a base other than its recorded local base is an error.
        vocab: vocabulary policy when a checkpoint's vocabulary differs from the base's.

    Returns:
        A task-vector :class:`~streamvec.model.algebra.Combination`.

    Raises:
        StreamvecError: a checkpoint without ``base``, the base itself, or a store with an
            unwanted ``base``.

    Example:
        >>> tau = task_vector_of("llama-math", "llama-base")  # doctest: +SKIP
    """
    src = open_model(path, base=base, strict=strict)
    tau: Model
    if src.source.info.get("kind") == "lora_adapter":
        tau = src  # an adapter is a task vector; a base only names its tensors
    elif src.source.is_point:
        if base is None:
            raise StreamvecError(
                f"{path}: is a checkpoint; pass --base BASE so its task vector can be formed, "
                "or give a task-vector store made by `streamvec diff`"
            )
        if Path(path).resolve() == Path(base).resolve():
            raise StreamvecError(f"{path}: is the base itself (its task vector is 0)")
        tau = src - open_model(base)
    else:
        if base is not None and base_for_stores == "error":
            raise StreamvecError(
                f"{path}: is a task-vector store; --base is only for a FINETUNED checkpoint "
                "(drop --base)"
            )
        tau = src
    comb = tau.filter(include, exclude).with_vocab(vocab)
    if comb.kind() != "task_vector":
        raise StreamvecError(f"{path}: is not a task vector ({comb.describe()})")
    return comb


@dataclass
class SVDReport:
    """What ``streamvec svd`` did."""

    path: Path
    factored: int
    dense: int
    methods: Counter[str]
    max_residual: float
    seconds: float
    residuals: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the terminal."""
        how = ", ".join(f"{n} {m}" for m, n in sorted(self.methods.items())) or "none"
        return (
            f"wrote {self.path} (svd): {self.factored} matrices factored ({how}), "
            f"{self.dense} tensors dense, max relative residual {self.max_residual:.3g}, "
            f"in {self.seconds:.1f} s"
        )


def svd(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    options: SVDOptions,
    base: str | os.PathLike[str] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    run: RunOptions | None = None,
    vocab: str | None = None,
) -> SVDReport:
    """Write the truncated SVD of every matrix of a task vector as an SVD store.

    Args:
        source: a task-vector store, or a fine-tuned checkpoint (with ``base``).
        output: the SVD store to write; it appears only when complete.
        options: rank, oversampling, power iterations, seed, method.
        base: the base checkpoint when ``source`` is a checkpoint.
        include: only tensors matching these patterns.
        exclude: leave out tensors matching these.
        run: workers, scheduler, memory limit, progress, overwrite.
        vocab: vocabulary policy when FINETUNED's vocabulary differs from the base's.

    Returns:
        An :class:`SVDReport`.

    Raises:
        StreamvecError: bad input, or a matrix that cannot be factored within the budget.

    Example:
        >>> svd("llama-math", "math-r64.zarr", options=SVDOptions(rank=64),
        ...     base="llama-base", run=RunOptions(memory_limit="8GB"))  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    run = (run or RunOptions()).with_keywords(vocab=vocab)  # one value: run.vocab
    check_settings("svd", run)  # the same check as the CLI's
    tv = task_vector_of(
        source, base, include=include, exclude=exclude, vocab=run.vocab, strict=run.strict
    )
    resolved = tv.resolved()
    root_attrs = {
        "operation": "svd",
        "expression": tv.describe(),
        "sources": [s.info for s in tv.sources()],
        "created_by": f"streamvec {__version__}",
        "skipped_nonfloat": list(resolved.skipped_nonfloat),
        "factored_shape": "tensors with more than 2 axes are factored as (shape[0], prod(rest))",
        **options.attrs(),
    }
    methods: Counter[str] = Counter()
    residuals: dict[str, float] = {}
    dense = 0
    identity = {
        "attrs": root_attrs,
        "tensors": [[n, list(t.shape)] for n, t in resolved.tensors.items()],
        "settings": run.output_identity(),
    }
    expected = svd_store_bytes(resolved.tensors.values(), options.rank)
    if not run.resume:
        check_free_space(Path(output).absolute(), expected)
    job = Job(
        output,
        inputs=input_paths(tv.sources()),
        plan=JobPlan(identity, {}, factor_budget(run)),
        resume=run.resume,
        overwrite=run.overwrite,
        expected_bytes=expected,
    )
    with job:
        if job.resumed:
            # Tensors already factored came from the inputs as they were then: a changed
            # input is refused by name rather than mixed with this run's (docs/reliability.md).
            job.check_done({n: [t] for n, t in resolved.tensors.items()})
        done = job.done_tensors()
        # The budget is part of the job: the block height enters the QR rounding, so a
        # resumed run reuses the recorded limit, workers and block size rather than this run's.
        run = job.budgeted(run)
        with dask_compute_kwargs(run.scheduler, run.resolved_workers()) as kwargs:
            factorizer = Factorizer(options, run, kwargs, job.budget["bytes"])
            writer = SVDStoreWriter(job.partial, root_attrs, reopen=job.resumed)
            items = list(resolved.tensors.items())
            bar = tqdm(items, desc=Path(output).name, unit="tensor", disable=not run.progress)
            for name, t in bar:
                if name in done:
                    recorded_attrs = writer.factor_attrs(name)
                    if recorded_attrs is None:
                        dense += 1
                    else:
                        methods[recorded_attrs["method"]] += 1
                        residuals[name] = float(recorded_attrs["residual"])
                    continue
                if not is_factored_shape(t.shape):
                    writer.write_dense(name, _dense_values(t, run.check_finite), source_dtype(t))
                    dense += 1
                    job.record_tensor(name, factorizer.input_digests(t))
                    continue
                seed = tensor_seed(options.seed, name)
                result, plan = factorizer.factor(t, options.rank, seed)
                writer.write_factors(
                    name,
                    t.shape,
                    source_dtype(t),
                    result.U,
                    result.S,
                    result.Vh,
                    svd_attrs(result, plan, options, seed),
                )
                methods[plan.method] += 1
                residuals[name] = result.residual
                job.record_tensor(name, factorizer.input_digests(t))
            writer.finish()
            write_model_card(job.partial, root_attrs)
            final = job.commit()
    return SVDReport(
        path=final,
        factored=sum(methods.values()),
        dense=dense,
        methods=methods,
        max_residual=max(residuals.values(), default=0.0),
        seconds=time.perf_counter() - started,
        residuals=residuals,
    )


def svd_store_bytes(tensors: Iterable[LazyTensor], rank: int) -> int:
    """About how many bytes an SVD store of these tensors takes (float32, uncompressed).

    Args:
        tensors: the tensors to factor (non-matrices are stored dense).
        rank: the rank kept per matrix.

    Returns:
        ``(m + n + 1) k`` float32 values per factored matrix, every element of the others.
    """
    total = 0
    for t in tensors:
        if is_factored_shape(t.shape):
            m, n = matrix_shape(t.shape)
            total += (m + n + 1) * min(rank, m, n) * 4
        else:
            total += math.prod(t.shape) * 4
    return total


def _dense_values(t: LazyTensor, check_finite: bool = False) -> np.ndarray:
    """A non-matrix tensor's values in a dtype Zarr stores (bfloat16 kept as float32)."""
    values = t.compute()
    if check_finite and not np.isfinite(values.astype(np.float64)).all():
        raise StreamvecError(
            f"tensor {t.name!r} has NaN or infinite values; pass --no-check-finite to store "
            "them anyway"
        )
    if is_float(values.dtype) and values.dtype.kind != "f":
        values = values.astype(np.float32)
    return values


def svd_attrs(result: SVDResult, plan: SVDPlan, options: SVDOptions, seed: int) -> dict[str, Any]:
    """The ``svd`` attrs of one factored tensor.

    Args:
        result: the factorization.
        plan: the plan that produced it.
        options: the SVD options.
        seed: the tensor's derived seed.

    Returns:
        rank (kept), requested rank, oversampling, power iterations, seed, method, relative
        Frobenius residual, Frobenius norm, passes over the matrix, block rows, and whether
        the files were read once (the matrix held in memory) or once per pass.
    """
    return {
        "rank": int(result.S.shape[0]),
        "requested_rank": int(options.rank),
        "oversample": int(options.oversample),
        "power_iters": int(result.power_iters) if plan.method == "randomized" else 0,
        "seed": int(seed),
        "method": plan.method,
        "residual": float(result.residual),
        "frob_norm": float(result.frob_norm),
        "passes": int(result.passes),
        "block_rows": int(plan.block_rows),
        "read_once": bool(plan.held or plan.method == "exact"),
    }
