"""Split task vectors into a shared and a unique component each (``streamvec decompose``).

Following Damirchi, Abbasnejad, Zhang & Shi, "Decomposing Task Vectors for Refined Model
Editing" (arXiv:2512.22511, 2025): several task vectors overlap in concepts; the directions they
share are the near-common column spaces of their SVDs. Per weight matrix, with ``T`` tasks:

1. ``U_i``: the top-``K`` left singular vectors of ``tau_i`` (streaming truncated SVD);
2. ``C = common_subspace(U_1..U_T, threshold)``: an orthonormal basis (m x s) of the directions
   whose energy survives projection onto every task's subspace by at least ``threshold``
   (a cos^2 overlap; see :func:`streamvec.compute.linalg.common_subspace`);
3. ``shared_i = C C^T tau_i`` and ``unique_i = tau_i - shared_i``.

Tensors that are not matrices (norms, biases, scalars) have ``shared_i = 0``, ``unique_i = tau_i``.

Output: a directory with two stores per input, named after it (``tox.zarr`` gives ``tox``):

* ``OUT/<name>.shared.zarr``: ``shared_i`` as an SVD store. It is exactly low-rank:
  ``shared_i = C (C^T tau_i) = (C Ub) diag(Sb) Vhb`` with ``C^T tau_i = Ub diag(Sb) Vhb`` (s x n,
  small), so it costs ``s (m + n)`` numbers per matrix, not ``m n``; like every SVD store it is
  a valid ``combine`` term (read back as ``U S Vh`` in float32, computed in float64).
* ``OUT/<name>.unique.zarr``: ``unique_i = tau_i - shared_i`` as an ordinary task-vector store
  written by the engine from exactly that expression (the shared store as written), so
  ``shared_i + unique_i`` equals ``tau_i`` within one float32 rounding.
* ``OUT/decomposition.json``: inputs, components, per-matrix shared dimension ``s``.

so that, e.g.::

    streamvec combine --base BASE -o detox OUT/tox.unique.zarr:-1          # negate unique part
    streamvec combine --base BASE -o multi OUT/a.shared.zarr OUT/b.shared.zarr   # add shared parts
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamvec.compute.linalg.factors import common_subspace
from streamvec.engine.jobs import Job, JobPlan, whole_tensor_digests
from streamvec.errors import StreamvecError
from streamvec.io.blocks import matrix_shape
from streamvec.io.companions import write_model_card
from streamvec.io.output import input_paths
from streamvec.io.zarr.lowrank import SVDStoreWriter, is_factored_shape
from streamvec.model.algebra import Combination, Model
from streamvec.model.sources import open as open_model
from streamvec.model.tensor import LazyTensor, rows_per_block
from streamvec.ops.factorize import factor_budget
from streamvec.ops.registry import check_settings
from streamvec.ops.svd import (
    Factorizer,
    RunOptions,
    SVDOptions,
    dask_compute_kwargs,
    matrix_dask,
    source_dtype,
    task_vector_of,
    tensor_seed,
)
from streamvec.version import __version__

__all__ = ["DEFAULT_RANK", "DEFAULT_THRESHOLD", "DecomposeReport", "component_names", "decompose"]

DEFAULT_RANK = 16
DEFAULT_THRESHOLD = 0.85
MANIFEST = "decomposition.json"


@dataclass
class DecomposeReport:
    """What ``streamvec decompose`` did."""

    path: Path
    components: dict[str, dict[str, str]]
    shared_dims: dict[str, int]
    methods: Counter[str]
    seconds: float

    def summary(self) -> str:
        """One line for the terminal."""
        dims = list(self.shared_dims.values())
        with_shared = sum(1 for d in dims if d > 0)
        return (
            f"wrote {self.path}: shared + unique components of {len(self.components)} task "
            f"vectors; {with_shared} of {len(dims)} matrices have shared directions "
            f"(max dimension {max(dims, default=0)}), in {self.seconds:.1f} s"
        )


def component_names(terms: list[str]) -> list[str]:
    """Stems that name each input's components: the file name without ``.zarr``, deduplicated.

    Args:
        terms: the input paths as given.

    Returns:
        One unique stem per input.

    Example:
        >>> component_names(["runs/tox.zarr", "math", "other/tox.zarr"])
        ['tox', 'math', 'tox-2']
    """
    stems: list[str] = []
    for i, t in enumerate(terms):
        name = Path(str(t).rstrip("/")).name
        stem = name[: -len(".zarr")] if name.endswith(".zarr") and len(name) > 5 else name
        stem = stem or f"task{i}"
        if stem in stems:
            stem = f"{stem}-{i}"
        stems.append(stem)
    return stems


def _refuse_repeated(terms: Sequence[str | os.PathLike[str]]) -> None:
    """Each task vector once: the same input twice would name two outputs alike."""
    seen: dict[str, str] = {}
    for t in terms:
        key = str(Path(t).absolute().resolve()) if Path(t).exists() else str(t)
        if key in seen:
            raise StreamvecError(
                f"decompose: {t} is given twice (also as {seen[key]}); give each task vector "
                "once (a task vector shares everything with itself)"
            )
        seen[key] = str(t)


def project(t: LazyTensor, c: np.ndarray, block_rows: int, compute_kwargs: dict[str, Any]) -> Any:
    """``C^T tau`` (s x n, float64) in one streaming pass over the row blocks of ``tau``.

    Args:
        t: the task-vector tensor (its matrix view, m x n).
        c: (m, s) basis.
        block_rows: rows per block.
        compute_kwargs: ``dask.compute`` keyword arguments.

    Returns:
        The (s, n) float64 coefficients.
    """
    import dask.array as da

    a = matrix_dask(t, block_rows)  # (m, n) row blocks
    cd = da.from_array(c, chunks=(a.chunks[0], c.shape[1]))  # (m, s), same row blocks
    # Blockwise C_b^T A_b (s, n) then a tree sum over blocks: one read of each block.
    return np.asarray((cd.T @ a.astype(np.float64)).compute(**compute_kwargs))


def decompose(
    terms: list[str],
    output: str | os.PathLike[str],
    *,
    options: SVDOptions,
    threshold: float = DEFAULT_THRESHOLD,
    base: str | os.PathLike[str] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    run: RunOptions | None = None,
    vocab: str | None = None,
    intermediate: bool = False,
) -> DecomposeReport:
    """Write the shared and unique components of each task vector (see module doc).

    Args:
        terms: two or more task-vector stores (or checkpoints, with ``base``).
        output: the directory to write; it appears only when complete.
        options: SVD options; ``options.rank`` is ``K``, the per-task subspace size.
        threshold: cos^2 overlap for a direction to count as shared, in (0, 1].
        base: base checkpoint for checkpoint terms.
        include: only tensors matching these patterns.
        exclude: leave out tensors matching these.
        run: workers, scheduler, memory limit, progress, overwrite.
        vocab: vocabulary policy (default: ``run.vocab``).
        intermediate: ``output`` is a hidden sibling of another command's output (the
            components of a ``shared_unique`` merge, see :class:`streamvec.engine.jobs.Job`).

    Returns:
        A :class:`DecomposeReport`.

    Raises:
        StreamvecError: fewer than two inputs, mismatched inputs, a bad threshold, or a
            matrix that cannot be factored within the memory budget.

    Example:
        >>> decompose(["tox.zarr", "math.zarr"], "parts", options=SVDOptions(rank=16))
        ... # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from streamvec.engine.execute import run as run_engine

    started = time.perf_counter()
    run = (run or RunOptions()).with_keywords(vocab=vocab)  # one value: run.vocab
    # the same check as the CLI's: a setting this command cannot honour is refused
    check_settings("decompose", run)
    if len(terms) < 2:
        raise StreamvecError("decompose needs at least two task vectors (TV1 TV2 ...)")
    if not 0.0 < threshold <= 1.0:
        raise StreamvecError(f"--threshold must be in (0, 1], got {threshold}")
    _refuse_repeated(terms)
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
    total: Model = taus[0]
    for tau in taus[1:]:
        total = total + tau
    names = list(total.combination().resolved().tensors)  # checks names and shapes agree
    per_task = [tau.resolved().tensors for tau in taus]
    stems = component_names([str(t) for t in terms])
    components = {
        str(t): {"shared": f"{s}.shared.zarr", "unique": f"{s}.unique.zarr"}
        for t, s in zip(terms, stems, strict=True)
    }
    common = {
        "operation": "decompose",
        "created_by": f"streamvec {__version__}",
        "decomposition": {
            "inputs": [str(t) for t in terms],
            "threshold": threshold,
            "method": "Damirchi et al. 2025: shared_i = C C^T tau_i, unique_i = tau_i - shared_i",
        },
        **options.attrs(),
    }

    shared_dims: dict[str, int] = {}
    methods: Counter[str] = Counter()
    identity = {
        **common,
        "sources": [[s.info for s in tau.sources()] for tau in taus],
        "tensors": [[n, [list(t[n].shape) if n in t else None for t in per_task]] for n in names],
        "settings": run.output_identity(),
    }
    job = Job(
        output,
        inputs=input_paths(s for tau in taus for s in tau.sources()),
        plan=JobPlan(identity, {}, factor_budget(run)),
        resume=run.resume,
        overwrite=run.overwrite,
        intermediate=intermediate,
    )
    with job:
        if job.resumed:
            job.check_done({n: [t[n] for t in per_task if n in t] for n in names})
        done = job.done_tensors()
        # each matrix is planned with the budget the job records (the unfinished run's)
        run = job.budgeted(run)
        writers = []
        for i, (term, tau) in enumerate(zip(terms, taus, strict=True)):
            attrs = {
                **common,
                "component": "shared",
                "task": str(term),
                "task_index": i,
                "expression": f"shared part of ({tau.describe()})",
                "sources": [s.info for s in tau.sources()],
            }
            shared_path = job.partial / components[str(term)]["shared"]
            writers.append(SVDStoreWriter(shared_path, attrs, reopen=job.resumed))
        with dask_compute_kwargs(run.scheduler, run.resolved_workers()) as kwargs:
            factorizer = Factorizer(options, run, kwargs, job.budget["bytes"])
            desc = f"{Path(output).name} (shared)"
            bar = tqdm(names, desc=desc, unit="tensor", disable=not run.progress)
            for name in bar:
                present = [tensors[name] for tensors in per_task if name in tensors]
                if name in done:
                    recorded = writers[0].factor_attrs(name)
                    if recorded is not None:  # a matrix: what the unfinished run found
                        shared_dims[name] = int(recorded["rank"])
                        # the plans are those of the recorded budget, as then
                        methods.update(factorizer.plan(t, options.rank).method for t in present)
                    continue
                digests: list[str] = []
                if len(present) < len(per_task):
                    # A LoRA adapter touches few tensors: a task without an update of this
                    # tensor shares no direction of it, so every shared part is 0.
                    for w in writers:
                        w.write_dense(name, np.zeros(present[0].shape, np.float32), "float32")
                    digests = [d for t in present for d in whole_tensor_digests(t)]
                elif not is_factored_shape(present[0].shape):
                    for w, t in zip(writers, present, strict=True):
                        # shared = 0 for non-matrices; zero chunks are not even written.
                        w.write_dense(name, np.zeros(t.shape, np.float32), source_dtype(t))
                    digests = [d for t in present for d in whole_tensor_digests(t)]
                else:
                    shared_dims[name] = _decompose_matrix(
                        name,
                        present,
                        writers,
                        factorizer,
                        options,
                        threshold,
                        kwargs,
                        methods,
                        digests,
                    )
                job.record_tensor(name, digests)
            # The shared stores are complete before the unique parts read them.
            job.log.flush()
        for w in writers:
            w.finish()
        for i, (term, tau) in enumerate(zip(terms, taus, strict=True)):
            unique_path = job.partial / components[str(term)]["unique"]
            if unique_path.is_dir():
                continue  # finished by the unfinished run, from inputs checked above
            shared_path = job.partial / components[str(term)]["shared"]
            # keep_base_when_missing: a checkpoint pair also has int/bool buffers, which a task
            # vector leaves out and the shared store therefore lacks; only those are missing.
            # The filter applies to the whole difference: the shared store holds only the
            # filtered tensors, so its term must not be active outside the filter either.
            difference = (tau - open_model(shared_path)).filter(include, exclude)
            unique: Combination = difference.keep_base_when_missing()
            run_engine(
                unique,
                unique_path,
                description="decompose",
                extra_attrs={
                    **common,
                    "component": "unique",
                    "task": str(term),
                    "task_index": i,
                    "expression": f"({tau.describe()}) - shared",
                    "shared_store": components[str(term)]["shared"],
                    "sources": [s.info for s in tau.sources()],
                },
                # resume: an unfinished unique part continues where it stopped
                **{**run.engine_kwargs(), "overwrite": False, "resume": job.resumed},
            )
        manifest = {
            **common,
            "components": components,
            "shared_dims": shared_dims,
            "usage": {
                "negate a unique component": f"streamvec combine --base BASE -o OUT "
                f"{Path(output).name}/{components[str(terms[0])]['unique']}:-1",
                "add the shared components": "streamvec combine --base BASE -o OUT "
                + " ".join(f"{Path(output).name}/{c['shared']}" for c in components.values()),
            },
        }
        (job.partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        sources = {json.dumps(s.info, sort_keys=True): s.info for t in taus for s in t.sources()}
        write_model_card(job.partial, {**common, "sources": list(sources.values())})
        final = job.commit()
    return DecomposeReport(
        path=final,
        components=components,
        shared_dims=shared_dims,
        methods=methods,
        seconds=time.perf_counter() - started,
    )


def _decompose_matrix(
    name: str,
    tensors: list[LazyTensor],
    writers: list[SVDStoreWriter],
    factorizer: Factorizer,
    options: SVDOptions,
    threshold: float,
    compute_kwargs: dict[str, Any],
    methods: Counter[str],
    digests: list[str],
) -> int:
    """Factor each task's matrix, find the common subspace, write each shared part.

    The digests of each task's inputs, as read for its factorization, are appended to
    ``digests`` (for ``--resume``).

    Returns:
        ``s``, the dimension of the shared subspace.
    """
    seed = tensor_seed(options.seed, name)  # same test matrix for every task: equal in, equal out
    bases = []
    norms = []
    block_rows = rows_per_block(tensors[0].shape)
    for t in tensors:
        result, plan = factorizer.factor(t, options.rank, seed)
        digests.extend(factorizer.input_digests(t))
        bases.append(result.U)
        norms.append(result.frob_norm)
        methods[plan.method] += 1
        if plan.method == "randomized":
            block_rows = min(block_rows, plan.block_rows)
    c = common_subspace(bases, threshold=threshold)  # (m, s) float64
    m, n = matrix_shape(tensors[0].shape)
    s_dim = c.shape[1]
    for t, w, norm in zip(tensors, writers, norms, strict=True):
        if s_dim:
            with factorizer.blas_limit():
                coeffs = project(t, c, block_rows, compute_kwargs)  # (s, n) = C^T tau
            ub, sb, vhb = np.linalg.svd(coeffs, full_matrices=False)  # (s, s), (s,), (s, n)
            u = c @ ub  # (m, s): orthonormal, so (C Ub) Sb Vhb is an SVD of C C^T tau
        else:
            u, sb, vhb = np.zeros((m, 0)), np.zeros(0), np.zeros((0, n))
        energy = float(np.sum(sb**2) / norm**2) if norm > 0 else 0.0
        w.write_factors(
            name,
            t.shape,
            source_dtype(t),
            u,
            sb,
            vhb,
            {
                "rank": int(s_dim),
                "method": "projection",
                "task_rank": int(bases[0].shape[1]),
                "threshold": threshold,
                "shared_energy": energy,
                "seed": int(seed),
            },
        )
    return int(s_dim)
