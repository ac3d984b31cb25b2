"""How one matrix is factored under a memory budget: the plan, and the factorizer.

:func:`plan_svd` chooses, per matrix, between the exact LAPACK SVD (read the matrix whole) and
the randomized subspace iteration of Halko, Martinsson & Tropp (2011) over row blocks, from the
memory each needs and a time model; :class:`Factorizer` runs the plan (held in memory when the
matrix fits, streamed in blocks otherwise, or on a GPU). Every SVD command (``svd``, ``lora``,
``decompose``, ``merge-svd``) factors through it; :mod:`streamvec.ops.svd` is the ``svd``
command's driver.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from streamvec.compute.devices import CPU, check_device
from streamvec.compute.kernel import accumulation_dtype
from streamvec.compute.linalg.blas import limit_blas_threads
from streamvec.compute.linalg.rsvd import (
    SVDResult,
    exact_svd,
    randomized_svd,
    randomized_svd_in_memory,
    sketch_width,
)
from streamvec.engine.execute import RUNTIME_OVERHEAD  # the engine's headroom: budgets agree
from streamvec.engine.jobs import (
    digest_rows,
    tensor_input_digests,
)
from streamvec.engine.schedule import awaited_threads
from streamvec.engine.settings import Settings, distributed_client
from streamvec.errors import StreamvecError
from streamvec.io.blocks import matrix_shape
from streamvec.io.read_buffers import BufferLease, ReadBuffers
from streamvec.memory import anon_bytes
from streamvec.model.tensor import DEFAULT_BLOCK_BYTES, LazyTensor, row_ranges, rows_per_block
from streamvec.ops.held import read_matrix
from streamvec.units import format_bytes

__all__ = [
    "BLOCK_OVERHEAD_S",
    "EXACT_S_PER_MNP",
    "PASS_OVERHEAD_S",
    "RANDOMIZED_S_PER_MNL",
    "READ_S_PER_ELEMENT",
    "SVD_METHODS",
    "Factorizer",
    "Method",
    "SVDOptions",
    "SVDPlan",
    "dask_compute_kwargs",
    "factor_budget",
    "matrix_dask",
    "plan_svd",
    "tensor_seed",
]


Method = Literal["exact", "randomized"]


SVD_METHODS = ("auto", "exact", "randomized")


# Time model used to pick a method (seconds). Measured on the development machine (2 shared
# cores, OpenBLAS): numpy's float64 gesdd took 0.7-2.6 ns per m*n*min(m, n); a randomized pass
# 0.4-1.3 ns per m*n*l plus ~2 ms of dask scheduling per pass; reading a block ~1 ns/element.
# Only the ratio matters, and the choice only flips where both are fast.
EXACT_S_PER_MNP = 1.5e-9


RANDOMIZED_S_PER_MNL = 0.5e-9


READ_S_PER_ELEMENT = 1.0e-9


PASS_OVERHEAD_S = 2e-3


BLOCK_OVERHEAD_S = 5e-4


@dataclass(frozen=True)
class SVDOptions:
    """How to factor each matrix.

    Attributes:
        rank: target rank ``K``; a matrix keeps ``min(K, m, n)`` triplets.
        oversample: extra random probes ``p`` of the randomized method.
        power_iters: subspace iterations ``q`` of the randomized method (2 passes each);
            None: chosen per matrix from the residual (:func:`streamvec.compute.linalg.converged`).
        seed: base seed; each tensor's test matrix is seeded from ``(seed, name)``.
        method: ``auto`` (per matrix, see :func:`plan_svd`), ``exact`` or ``randomized``.
    """

    rank: int
    oversample: int = 10
    power_iters: int | None = None
    seed: int = 0
    method: str = "auto"

    def __post_init__(self) -> None:
        for label, value, low in (
            ("--rank", self.rank, 1),
            ("--oversample", self.oversample, 0),
            ("--power-iters", 0 if self.power_iters is None else self.power_iters, 0),
            ("--seed", self.seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise StreamvecError(f"{label} must be an integer >= {low}, got {value!r}")
        if self.method not in SVD_METHODS:
            raise StreamvecError(
                f"--method must be one of {', '.join(SVD_METHODS)}, got {self.method!r}"
            )

    def attrs(self) -> dict[str, Any]:
        """The options as store attrs."""
        return {
            "rank": int(self.rank),
            "oversample": int(self.oversample),
            "power_iters": "auto" if self.power_iters is None else int(self.power_iters),
            "seed": int(self.seed),
            "method": self.method,
        }


@dataclass(frozen=True)
class SVDPlan:
    """The method, rank and block height chosen for one matrix, and the estimates behind it.

    Attributes:
        method: ``exact`` or ``randomized``.
        rank: triplets kept, ``min(K, m, n)``.
        held: the randomized passes ran over the matrix held in memory, read once.
        block_rows: rows per block of the randomized passes (all rows for ``exact``).
        exact_bytes: estimated peak anonymous bytes of the exact method.
        randomized_bytes: the same for the randomized method at ``block_rows``.
        exact_seconds: estimated time of the exact method.
        randomized_seconds: estimated time of the randomized method.
    """

    method: Method
    rank: int
    block_rows: int
    exact_bytes: int
    randomized_bytes: int
    exact_seconds: float
    randomized_seconds: float
    # The randomized passes ran over the matrix held in memory (read from the files once).
    held: bool = False


def tensor_seed(seed: int, name: str, salt: str = "") -> int:
    """The seed of one tensor's random test matrix: a hash of ``(seed, name, salt)``.

    Args:
        seed: the user's seed.
        name: tensor name.
        salt: distinguishes several factorizations of one tensor (e.g. one per task).

    Returns:
        A 63-bit integer for ``numpy.random.default_rng``.

    Example:
        >>> tensor_seed(0, "w") == tensor_seed(0, "w"), tensor_seed(0, "w") == tensor_seed(1, "w")
        (True, False)
    """
    digest = hashlib.blake2b(f"{seed}\0{name}\0{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _read_bytes_per_element(t: LazyTensor) -> int:
    """Anonymous bytes per element of ``t.read_rows``: the result, plus an accumulator, plus
    each input's rows as read (``pread`` buffers)."""
    out = np.dtype(t.dtype).itemsize
    acc = accumulation_dtype(t.dtype, [c for c, _ in t.terms]).itemsize
    reads = sum(np.dtype(r.dtype).itemsize for _, r in t.terms)
    return out + (acc if acc != out else 0) + reads


def _work_bytes(t: LazyTensor) -> int:
    """Bytes per element of a block in the products' precision (float32, or float64)."""
    return 8 if np.dtype(t.dtype) == np.float64 else 4


def plan_svd(
    t: LazyTensor,
    rank: int,
    options: SVDOptions,
    budget: int,
    workers: int,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> SVDPlan:
    """Choose the method and block height for a rank-``rank`` SVD of ``t`` under ``budget``.

    Memory (anonymous bytes; file pages of the inputs are page cache and not counted):

    * exact: the matrix as read (``e`` bytes/element), its float64 copy and LAPACK's own copy
      (``16 m n``), thin ``U`` and ``Vh`` (``8 p (m + n)``) and gesdd's workspace
      (about ``8 (4 p^2 + max(m, n))``), ``p = min(m, n)``;
    * randomized: the ``l = k + oversample`` wide factors (``Y``, ``Q`` and TSQR's blocks of
      m rows; the test matrix, ``Z``, its QR, ``B`` and ``B``'s SVD of n columns:
      ``8 l (3 m + 5 n)``, plus ``U``) and, per row of a block, the row as read and its
      float32 upcast; dask may hold up to two blocks per worker (one being read while the
      previous one's product finishes).

    Time: see the constants of this module. ``auto`` picks the faster method that fits;
    ``exact``/``randomized`` force one (and fail when it does not fit).

    Args:
        t: the tensor (any shape with >= 2 axes; its matrix view is factored).
        rank: target rank ``K`` (clamped to ``min(m, n)``).
        options: the SVD options (method, oversample, power iterations).
        budget: bytes available to this factorization.
        workers: blocks in flight at once.
        block_bytes: target float32 bytes of a block when the budget allows it.

    Returns:
        The :class:`SVDPlan`.

    Raises:
        StreamvecError: no allowed method fits in ``budget``.

    Example:
        >>> plan_svd(tv["w"], 64, SVDOptions(64), 1 << 30, 2).method  # doctest: +SKIP
        'randomized'
    """
    m, n = matrix_shape(t.shape)
    p = min(m, n)
    k = min(rank, p)
    el = _read_bytes_per_element(t)
    exact_bytes = m * n * el + 16 * m * n + 8 * p * (m + n) + 8 * (4 * p * p + max(m, n))
    exact_s = EXACT_S_PER_MNP * m * n * p + READ_S_PER_ELEMENT * m * n + PASS_OVERHEAD_S

    width = sketch_width(k, options.oversample, m, n)
    fixed = 8 * width * (3 * m + 5 * n) + 8 * m * k
    per_row = 2 * workers * n * (el + _work_bytes(t))
    fit = (budget - fixed) // per_row if budget > fixed else 0
    block_rows = max(1, min(rows_per_block(t.shape, block_bytes), fit, m))
    # auto: usually one or two iterations; the estimate assumes two
    passes = 2 + 2 * (2 if options.power_iters is None else options.power_iters)
    blocks = math.ceil(m / block_rows)
    randomized_bytes = fixed + per_row * block_rows
    randomized_s = passes * (
        RANDOMIZED_S_PER_MNL * m * n * width
        + READ_S_PER_ELEMENT * m * n
        + PASS_OVERHEAD_S
        + BLOCK_OVERHEAD_S * blocks
    )
    exact_fits = exact_bytes <= budget
    randomized_fits = fit >= 1

    def plan(method: Method) -> SVDPlan:
        return SVDPlan(
            method,
            k,
            m if method == "exact" else block_rows,
            exact_bytes,
            randomized_bytes,
            exact_s,
            randomized_s,
        )

    def too_small(what: str, need: int) -> StreamvecError:
        return StreamvecError(
            f"--memory-limit leaves {format_bytes(max(budget, 0))} for the SVD of tensor "
            f"{t.name!r} ({m} x {n}, rank {k}), and {what} needs about {format_bytes(need)}; "
            "raise --memory-limit, use fewer --workers or a lower --rank"
        )

    if options.method == "exact":
        if not exact_fits:
            raise too_small("the exact method", exact_bytes)
        return plan("exact")
    if options.method == "randomized":
        if not randomized_fits:
            raise too_small("the randomized method", fixed + per_row)
        return plan("randomized")
    if exact_fits and (not randomized_fits or exact_s <= randomized_s):
        return plan("exact")
    if randomized_fits:
        return plan("randomized")
    raise too_small("even the randomized method", fixed + per_row)


def matrix_dask(t: LazyTensor, block_rows: int) -> Any:
    """``t`` as a 2-D ``(rows, cols)`` dask array of row blocks, one read task per block.

    Unlike :meth:`LazyTensor.to_dask` (which keeps the tensor's own shape), the blocks are the
    matrix view the SVD needs, also for tensors with more than two axes.

    Args:
        t: the lazy tensor.
        block_rows: rows per block.

    Returns:
        A ``dask.array.Array`` of shape ``matrix_shape(t.shape)`` chunked along rows only.

    Example:
        >>> matrix_dask(tv["model.conv.weight"], 2).shape  # doctest: +SKIP
        (4, 90)
    """
    import dask.array as da
    from dask.base import tokenize

    rows, cols = matrix_shape(t.shape)
    ranges = row_ranges(rows, block_rows)
    name = "streamvec-matrix-" + tokenize(t.name, t.shape, str(t.dtype), t.terms, block_rows)
    graph = {(name, i, 0): (_read_rows, t, r0, r1) for i, (r0, r1) in enumerate(ranges)}
    chunks = (tuple(r1 - r0 for r0, r1 in ranges), (cols,))
    return da.Array(graph, name, chunks=chunks, dtype=t.dtype)


def _read_rows(t: LazyTensor, r0: int, r1: int) -> np.ndarray:
    return t.read_rows(r0, r1)


@contextmanager
def dask_compute_kwargs(scheduler: str, workers: int) -> Iterator[dict[str, Any]]:
    """Keyword arguments for ``dask.compute`` for a scheduler name (a client while open).

    Args:
        scheduler: ``threads``, ``processes``, ``sync``, ``local:N`` or a scheduler address.
        workers: worker threads/processes of the local schedulers.

    Yields:
        The keyword arguments.
    """
    if scheduler in ("threads", "processes"):
        with awaited_threads(scheduler, workers) as pool:
            yield {"scheduler": scheduler, "num_workers": workers, **pool}
        return
    if scheduler in ("sync", "synchronous"):
        yield {"scheduler": "sync"}
        return
    with distributed_client(scheduler) as client:
        yield {"scheduler": client}


def memory_budget(run: Settings) -> int:
    """Bytes a factorization may use now: the limit less this process's anonymous memory and
    the runtime's headroom (as the engine's planner counts)."""
    return run.resolved_limit() - anon_bytes() - RUNTIME_OVERHEAD


def factor_budget(run: Settings) -> dict[str, Any]:
    """What an SVD command records with its job so that a resumed run factors every matrix as
    the unfinished one did: the run's :meth:`~streamvec.engine.settings.Settings.plan_budget`
    and the byte budget taken now (``bytes``, which depends on this process's memory)."""
    return {**run.plan_budget(), "bytes": memory_budget(run)}


class Factorizer:
    """Factors tensors one at a time under a memory budget fixed at construction.

    The budget is ``memory_limit - (anonymous memory now) - RUNTIME_OVERHEAD``, taken once,
    like the engine's, so the plan does not drift as the process's own state grows.

    Args:
        options: SVD options.
        run: run options (workers, memory limit, scheduler).
        compute_kwargs: ``dask.compute`` keyword arguments (from :func:`dask_compute_kwargs`).

    Example:
        >>> with dask_compute_kwargs("threads", 2) as kw:  # doctest: +SKIP
        ...     f = Factorizer(SVDOptions(rank=16), Settings(), kw)
        ...     result, plan = f.factor(tv["w"], 16, seed=tensor_seed(0, "w"))
    """

    def __init__(
        self,
        options: SVDOptions,
        run: Settings,
        compute_kwargs: dict[str, Any],
        budget: int | None = None,
    ) -> None:
        self.options = options
        self.workers = run.resolved_workers()
        self.limit = run.resolved_limit()
        # A job's recorded budget (factor_budget), so that a resumed run plans every matrix
        # as the unfinished one did; else taken now.
        self.budget = budget if budget is not None else memory_budget(run)
        self.block_bytes = run.block_bytes()
        self.compute_kwargs = compute_kwargs
        self.device = check_device(run.device)
        # (tensor name, its inputs' digests) of the last matrix read whole, and (name, block
        # rows) of the last one streamed: input_digests reuses them.
        self._digests: tuple[str, list[str]] | None = None
        self._streamed_rows: tuple[str, int] | None = None
        # The memory of the matrices held, reused from one to the next (see _hold).
        self._held = ReadBuffers()

    def plan(self, t: LazyTensor, rank: int) -> SVDPlan:
        """The plan for ``t`` at ``rank`` (see :func:`plan_svd`)."""
        return plan_svd(t, rank, self.options, self.budget, self.workers, self.block_bytes)

    def factor(self, t: LazyTensor, rank: int, seed: int) -> tuple[SVDResult, SVDPlan]:
        """Truncated SVD of ``t``'s matrix view with ``min(rank, m, n)`` triplets.

        Args:
            t: the tensor (>= 2 axes, no zero-size axis).
            rank: target rank.
            seed: seed of the random test matrix (randomized method).

        Returns:
            The :class:`~streamvec.compute.linalg.SVDResult` and the plan that produced it.
        """
        # The digests kept for input_digests are this tensor's only (decompose and TSV-M
        # factor several tensors of one name, one per task).
        self._digests = None
        self._streamed_rows = None
        plan = self.plan(t, rank)
        if self.device != CPU:
            return self._factor_on_device(t, plan, seed), plan
        if plan.method == "exact":
            # LAPACK's memory comes on top of the matrix, up to the whole budget: no held
            # matrix's memory is kept beside it, and this one is read into fresh memory.
            self._held = ReadBuffers()
            return exact_svd(self._hold(t), plan.rank), plan
        if self._can_hold(t, plan):
            # Read the files once and run every pass over the matrix in memory, each product
            # one multi-threaded BLAS call: no re-reading and re-decoding the inputs 2 + 2q
            # times, no per-block task overhead per pass.
            with self._held.lease() as lease:
                result = randomized_svd_in_memory(
                    self._hold(t, lease),
                    plan.rank,
                    oversample=self.options.oversample,
                    power_iters=self.options.power_iters,
                    seed=seed,
                )
            return result, replace(plan, held=True)
        self._streamed_rows = (t.name, plan.block_rows)
        self._held = ReadBuffers()  # a streamed matrix's plan counts no held one beside it
        a = matrix_dask(t, plan.block_rows)
        with self.blas_limit():
            result = randomized_svd(
                a,
                plan.rank,
                oversample=self.options.oversample,
                power_iters=self.options.power_iters,
                seed=seed,
                compute_kwargs=self.compute_kwargs,
            )
        return result, plan

    def _hold(self, t: LazyTensor, lease: BufferLease | None = None) -> np.ndarray:
        """``t``'s matrix read once; its inputs' digests are kept for :meth:`input_digests`.

        With ``lease`` (on the factorizer's pool of held-matrix memory), the matrix lives in a
        map borrowed from it, valid until the lease is closed: the pool keeps the map for the
        next matrix, so its pages are faulted in once per run instead of once per matrix
        (fresh pages cost about 0.75 s per GB on the development machine: 3 of the 6.5 s a
        1B store's matrices took to read). The pool drops its map before making a larger
        one, so it holds at most the largest matrix held, which passed the same
        half-of-the-limit test as the one beside it now.
        """
        space = None
        if lease is not None:
            space = lease.array(matrix_shape(t.shape), t.dtype)
        held = read_matrix(t, self.block_bytes, out=space)
        self._digests = (held.name, held.digests)
        return held.values

    def input_digests(self, t: LazyTensor) -> list[str]:
        """Digests of ``t``'s inputs (for ``--resume``), from the factorization's own read.

        A matrix just factored from memory was digested as it was read; a streamed one is
        read once more, in the factorization's blocks (whole compressed chunks, decoded once
        each, within the memory the plan already allowed); any other tensor in small reads.

        Args:
            t: the tensor just factored (or stored dense).

        Returns:
            One digest per input, as :func:`streamvec.engine.jobs.tensor_input_digests`.
        """
        rows = matrix_shape(t.shape)[0]
        if self._digests is not None and self._digests[0] == t.name:
            return self._digests[1]
        step = digest_rows(t)
        if self._streamed_rows is not None and self._streamed_rows[0] == t.name:
            step = max(step, self._streamed_rows[1])
        return tensor_input_digests(t, 0, rows, step)

    def _can_hold(self, t: LazyTensor, plan: SVDPlan) -> bool:
        """Whether the matrix as read (and in float32), next to the method's own memory, fits.

        Held and streamed factors differ in the last float64 bits (sums in another order), so
        the choice must not depend on what this process happens to hold: it is made against
        half of the limit (a function of the job's recorded parameters alone), and only falls
        back to streaming when the process's own memory leaves less than that.
        """
        m, n = matrix_shape(t.shape)
        need = m * n * _read_bytes_per_element(t) + plan.randomized_bytes
        if np.dtype(t.dtype) not in (np.float32, np.float64):
            need += m * n * 4  # the float32 copy the products run on
        return need <= min((self.limit - RUNTIME_OVERHEAD) // 2, self.budget)

    def _factor_on_device(self, t: LazyTensor, plan: SVDPlan, seed: int) -> SVDResult:
        """The same factorization on the GPU: one read of the files, passes in GPU memory."""
        from streamvec.compute.linalg.torch_svd import factor_on_device

        # The exact plan reads the matrix whole; on the device it is streamed in blocks too.
        block_rows = (
            plan.block_rows
            if plan.method == "randomized"
            else rows_per_block(t.shape, self.block_bytes)
        )
        return factor_on_device(
            t,
            plan.rank,
            method=plan.method,
            oversample=self.options.oversample,
            power_iters=self.options.power_iters,
            seed=seed,
            block_rows=block_rows,
            workers=self.workers,
            device=self.device,
        )

    def blas_limit(self) -> AbstractContextManager[Any]:
        """One BLAS thread per call while several Dask threads run block tasks here.

        Dask already runs ``workers`` block products at once; OpenBLAS threads on top of
        them oversubscribe the cores (3-4x slower measured, see
        :mod:`streamvec.compute.linalg.blas`).
        Results are bit-identical either way. The exact path keeps every BLAS thread: it is
        one LAPACK call. Process-based schedulers run BLAS in their own processes.

        Returns:
            A context manager: the BLAS thread limit, or a no-op.
        """
        if self.compute_kwargs.get("scheduler") == "threads" and self.workers > 1:
            return limit_blas_threads(1)
        return nullcontext()
