"""Run a lazy model to a sink under a memory budget, through a Dask scheduler.

The work is one task per (tensor, row block): read the rows of every input, combine them,
write the block, return its checksum. Tasks are independent, so the scheduler keeps exactly
``workers`` blocks in flight and memory is bounded by ``workers x block working set``; block
sizes are chosen from the budget. Input pages are file-backed (page cache) and not counted.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from streamvec.compute.devices import CPU, block_kernel, check_device
from streamvec.compute.finite import nonfinite_inputs, nonfinite_rows, raise_if_nonfinite
from streamvec.compute.kernel import accumulation_dtype
from streamvec.dtypes import dtype_name
from streamvec.engine.jobs import (
    DoneLog,
    Job,
    JobPlan,
    check_done_inputs,
    digest_operands,
)
from streamvec.engine.schedule import execute_graph
from streamvec.engine.settings import Settings
from streamvec.engine.sinks import BlockWriter, PlannedTensor, SafetensorsSink, Sink, ZarrSink
from streamvec.errors import StreamvecError
from streamvec.io.blocks import matrix_shape
from streamvec.io.companions import companions_for, write_model_card
from streamvec.io.output import input_paths
from streamvec.io.read_buffers import BufferLease, ReadBuffers, lease_from
from streamvec.io.safetensors.requantize import aligned_rows
from streamvec.memory import anon_bytes
from streamvec.model.tensor import DEFAULT_BLOCK_BYTES, LazyTensor, row_ranges, rows_per_block
from streamvec.units import format_bytes, parse_size
from streamvec.version import __version__

if TYPE_CHECKING:
    from streamvec.model.algebra import Model

CHECKSUM_ALGO = "xxh3_128"
IN_PROCESS_SCHEDULERS = ("threads", "sync", "synchronous")
# Headroom for the interpreter, dask, zarr's event loop and codec buffers beyond the blocks.
RUNTIME_OVERHEAD = 256 << 20


def run_read_buffers(scheduler: str) -> ReadBuffers | None:
    """A run's read buffers, reused from block task to block task (io/read_buffers.py), for
    the in-process schedulers only: a dask.distributed worker counts maps kept between tasks
    as its memory, and pauses (or restarts) above its limit; there each task's are its own
    (None, see :func:`~streamvec.io.read_buffers.lease_from`)."""
    return ReadBuffers() if scheduler in IN_PROCESS_SCHEDULERS else None


@dataclass
class RunReport:
    """What a run did: enough for a summary line and for benchmarks."""

    path: Path
    kind: str
    format: str
    tensors: int
    input_bytes: int
    output_bytes: int
    seconds: float
    workers: int
    memory_limit: int
    skipped_nonfloat: tuple[str, ...] = ()
    kept_base: tuple[str, ...] = ()
    checksums: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed_blocks: int = 0
    # Seconds per stage: read, compute, encode, write, checksum summed over blocks
    # (worker-seconds); blocks_wall (all blocks) and finish_wall (durable flush, metadata,
    # rename) are wall time.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    device: str = CPU

    def summary(self) -> str:
        rate = self.input_bytes / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"wrote {self.path} ({self.kind}, {self.format}): {self.tensors} tensors, "
            f"{format_bytes(self.input_bytes)} read, {format_bytes(self.output_bytes)} written "
            f"in {self.seconds:.1f} s ({format_bytes(rate)}/s of input)"
        )


def working_bytes_per_element(t: LazyTensor, device: str = CPU) -> int:
    """Anonymous bytes a block task holds per element: accumulator, output, encode buffer.

    Operands are read (``pread``) into anonymous buffers, one per operand; on a GPU they are
    also staged in host buffers (one per operand) on their way.
    """
    out = t.dtype.itemsize
    reads = sum(r.dtype.itemsize for _, r in t.terms)
    # Readers that compute their rows (FP8 dequantization) also hold what they read.
    reads += sum(getattr(r, "resident_bytes_per_element", 0) for _, r in t.terms)
    # Re-quantizing to FP8 pads the block to whole tiles and keeps the 8-bit copy.
    held = 9 if t.requantize is not None else 0
    if t.op is not None:
        # every term upcast to float32, plus the op's result and a temporary of that size
        return 4 * (len(t.terms) + 2) + 3 * out + reads + held
    acc = accumulation_dtype(t.dtype, [c for c, _ in t.terms]).itemsize
    staging = reads if device != CPU else 0
    return (acc if acc != out else 0) + 3 * out + staging + reads + held


def balanced_rows(rows: int, most: int) -> int:
    """Rows per block for the fewest blocks of at most ``most`` rows, split evenly.

    Zarr stores every chunk whole, the last one padded: 5632 rows in blocks of 4096 would store
    8192 rows. The same two blocks of 2816 rows store none extra, and never exceed ``most``.
    """
    if rows <= most:
        return max(rows, 1)
    blocks = -(-rows // most)
    return -(-rows // blocks)


def plan_blocks(
    tensors: list[LazyTensor],
    memory_limit: int,
    workers: int,
    baseline: int,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    device: str = CPU,
) -> list[PlannedTensor]:
    """Choose each tensor's block rows so ``workers`` blocks fit in the budget.

    Raises:
        StreamvecError: the budget cannot hold even one row per worker.
    """
    per_worker = (memory_limit - baseline - RUNTIME_OVERHEAD) // workers
    plan = []
    for t in tensors:
        rows, cols = matrix_shape(t.shape)
        row_cost = max(cols, 1) * working_bytes_per_element(t, device)
        # What readers hold whatever the block size (an adapter's whole A factor).
        fixed = sum(getattr(r, "resident_bytes", 0) for _, r in t.terms)
        fit = (per_worker - fixed) // row_cost if per_worker > 0 else 0
        if fit < 1:
            need = baseline + RUNTIME_OVERHEAD + workers * (row_cost + fixed)
            raise StreamvecError(
                f"--memory-limit {format_bytes(memory_limit)} is too small: tensor {t.name!r} "
                f"needs about {format_bytes(need)} with {workers} worker(s); raise the limit or "
                "use fewer workers"
            )
        most = max(1, min(rows_per_block(t.shape, block_bytes), fit, max(rows, 1)))
        if t.requantize is not None and t.requantize.row_align > 1:
            # FP8 block scales: each block must cover whole tiles of rows.
            plan.append(PlannedTensor(t, aligned_rows(rows, most, t.requantize.row_align)))
        else:
            plan.append(PlannedTensor(t, balanced_rows(rows, most)))
    return plan


# The stages of a block task, in order; RunReport.stage_seconds sums them over all blocks.
BLOCK_STAGES = ("read", "compute", "encode", "write", "checksum")


@dataclass(frozen=True)
class BlockResult:
    """What a block task returns: small, so any scheduler ships it back cheaply."""

    name: str
    r0: int
    digest: bytes
    nonfinite: int = 0
    first_nonfinite_row: int = -1
    # Inputs (files) whose rows of this block already held NaN/inf ("" if none did).
    nonfinite_inputs: str = ""
    # Seconds spent in each of BLOCK_STAGES.
    seconds: tuple[float, ...] = ()
    # xxh3-128 of each operand's bytes, logged so that --resume can tell a changed input.
    inputs: tuple[str, ...] = ()


def _prefetch(following: tuple[LazyTensor, int, int] | None) -> None:
    """Start reading the block planned after this one (see ``SafetensorsReader.prefetch``)."""
    if following is None:
        return
    t, r0, r1 = following
    for _, reader in t.terms:
        prefetch = getattr(reader, "prefetch", None)
        if prefetch is not None:
            prefetch(r0, r1)


def _block_task(
    t: LazyTensor,
    r0: int,
    r1: int,
    writer: BlockWriter,
    check_finite: bool,
    device: str = CPU,
    following: tuple[LazyTensor, int, int] | None = None,
    buffers: ReadBuffers | None = None,
) -> BlockResult:
    with lease_from(buffers) as lease:  # operands die with the lease
        return _run_block(t, r0, r1, writer, check_finite, device, following, lease)


def _run_block(
    t: LazyTensor,
    r0: int,
    r1: int,
    writer: BlockWriter,
    check_finite: bool,
    device: str,
    following: tuple[LazyTensor, int, int] | None,
    lease: BufferLease,
) -> BlockResult:
    clock = time.perf_counter
    started = clock()
    _prefetch(following)
    operands = t.read_operands(r0, r1, lease)
    inputs = tuple(digest_operands(operands))
    read = clock()
    with np.errstate(over="ignore", invalid="ignore"):  # the finite check reports these
        block = t.evaluate(operands, r0, r1, block_kernel(device), lease)
    computed = clock()
    bad, first, culprits = 0, -1, ""
    if check_finite:
        bad, first = nonfinite_rows(block)
        if bad:
            first += r0
            paths = [str(getattr(r, "path", getattr(r, "store", "?"))) for _, r in t.terms]
            culprits = nonfinite_inputs(paths, [x for _, x in operands])
    del operands
    # A disk full, quota or I/O error goes up as it is: the job names the output the user
    # asked for (not the unfinished copy being written) and the space it needs.
    encoding = writer.write(r0, block) or 0.0
    written = clock()
    digest = block_digest(block)
    seconds = (
        read - started,
        computed - read,
        encoding,
        written - computed - encoding,
        clock() - written,
    )
    return BlockResult(
        t.name,
        r0,
        digest,
        nonfinite=bad,
        first_nonfinite_row=first,
        nonfinite_inputs=culprits,
        seconds=seconds,
        inputs=inputs,
    )


def tensor_checksum(block_digests: list[bytes]) -> str:
    """Digest of a tensor from its block digests, in row order."""
    return xxhash.xxh3_128_hexdigest(b"".join(block_digests))


def block_digest(block: np.ndarray) -> bytes:
    """The per-block digest used by :func:`tensor_checksum` (C-order bytes of the block)."""
    return xxhash.xxh3_128_digest(np.ascontiguousarray(block).view(np.uint8).data)


def run(
    model: Model,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,  # noqa: A002 - the natural keyword for users
    workers: int | None = None,
    scheduler: str = "threads",
    memory_limit: str | int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    check_finite: bool = True,
    block_size: str | int | None = None,
    shard_size: str | int = "5GB",
    compression: str = "lz4",
    description: str | None = None,
    extra_attrs: dict[str, Any] | None = None,
    sync_seconds: float | None = None,
    device: str = CPU,
) -> RunReport:
    """Compute every tensor of ``model`` and write it to ``path``; it appears only when done.

    Args:
        model: the lazy expression.
        path: output; a Zarr store for task vectors, a sharded safetensors directory for models.
        format: ``"zarr"`` or ``"safetensors"`` to override the default for the kind.
        workers: blocks in flight at once (default: CPU count).
        scheduler: ``threads`` (default), ``processes``, ``sync``, ``local:N`` (a LocalCluster
            of N processes) or the address of a ``dask.distributed`` scheduler.
        memory_limit: ceiling on anonymous memory, e.g. ``"4GB"`` (default: half of available).
        progress: show a progress bar (bytes read, throughput).
        overwrite: replace an existing output once the new one is complete.
        resume: continue an unfinished job writing ``path`` if its inputs and parameters match
            (its block plan is reused, so the result is identical to an uninterrupted run).
        check_finite: fail, naming tensors and rows, if any result is NaN or infinite, and
            leave nothing under ``path`` (default; False writes such values through).
        block_size: target bytes of float32 work per block (default 32MB); smaller under a
            tight memory limit.
        shard_size: safetensors shard size.
        compression: Zarr chunk compression: ``lz4`` (default, blosc with bit-shuffle),
            ``zstd`` (about 8% smaller, 1.5x the time) or ``none``.
        description: what to record as the operation in the output's attrs.
        extra_attrs: more provenance to record.
        sync_seconds: how often finished blocks are made durable and logged for resume
            (default 5 s, or the ``STREAMVEC_SYNC_SECONDS`` environment variable).
        device: where weighted sums run: ``cpu`` (numpy, default) or ``cuda``/``cuda:N``
            (torch; bit-identical results). Merge methods' per-element rules run on the CPU.

    Returns:
        A :class:`RunReport`.
    """
    started = time.perf_counter()
    # Validated once, by the one settings type, whichever door the call came through.
    settings = Settings(
        workers=workers,
        scheduler=scheduler,
        memory_limit=memory_limit,
        block_size=block_size,
        shard_size=shard_size,
        compression=compression,
        device=device,
    )
    resolved = model.resolved()
    fmt = format or ("safetensors" if resolved.kind == "model" else "zarr")
    if fmt not in ("zarr", "safetensors"):
        raise StreamvecError(f"unknown output format {fmt!r}: use zarr or safetensors")
    workers = settings.resolved_workers()
    limit = settings.resolved_limit()
    device = check_device(device)
    tensors = list(resolved.tensors.values())
    block_bytes = settings.block_bytes()
    # Blocks run in this process only on the threaded and synchronous schedulers; elsewhere
    # they run in fresh worker processes, whose runtime RUNTIME_OVERHEAD covers.
    baseline = anon_bytes() if scheduler in IN_PROCESS_SCHEDULERS else 0
    plan = plan_blocks(tensors, limit, workers, baseline, block_bytes, device)
    anchor = model.anchor()
    sink: Sink
    if fmt == "zarr":
        sink = ZarrSink(compression)
    else:
        companions = (
            companions_for(anchor, resolved.vocab)
            if anchor is not None and resolved.kind == "model"
            else None
        )
        sink = SafetensorsSink(parse_size(shard_size), companions=companions)
    attrs: dict[str, Any] = {
        "format": 1,
        "kind": resolved.kind,
        "operation": description or "combine",
        "expression": model.describe(),
        "sources": [s.info for s in model.sources()],
        "created_by": f"streamvec {__version__}",
        "skipped_nonfloat": list(resolved.skipped_nonfloat),
        "kept_base": list(resolved.kept_base),
        **(extra_attrs or {}),
    }
    if resolved.vocab is not None:
        attrs["vocab"] = resolved.vocab.describe()
    identity = {
        "attrs": attrs,
        "format": fmt,
        "compression": compression if fmt == "zarr" else None,
        "shard_size": parse_size(shard_size) if fmt == "safetensors" else None,
        # without the check, non-finite blocks may be on disk: resuming with it would pass them
        "check_finite": check_finite,
        # --int-tensors decides which file a changed int tensor is read from; it appears in
        # neither the expression nor the attrs
        "int_tensors": getattr(model, "int_tensors", None),
        "tensors": [[t.name, list(t.shape), _stored_dtype(t)] for t in tensors],
    }
    job = Job(
        path,
        inputs=input_paths(model.sources()),
        plan=JobPlan(identity, {p.tensor.name: p.block_rows for p in plan}),
        resume=resume,
        overwrite=overwrite,
        expected_bytes=sum(t.nbytes for t in tensors),  # uncompressed: an upper bound
        sync_seconds=sync_seconds,
    )
    with job:
        job.on_stop(sink.close)  # waits for the writes in flight before any cleanup
        done: dict[tuple[str, int], bytes] = {}
        if job.resumed:
            plan, done = _resume_plan(job, plan)
            sink.reopen(job.partial, plan, attrs)
        else:
            sink.prepare(job.partial, plan, attrs)
        blocks_started = time.perf_counter()
        results = _run_blocks(
            plan,
            sink,
            done,
            job.log,
            scheduler=scheduler,
            workers=workers,
            progress=progress,
            check_finite=check_finite,
            desc=Path(path).name,
            device=device,
        )
        blocks_done = time.perf_counter()
        job.log.flush()
        _raise_if_nonfinite(results)
        digests = {(r.name, r.r0): r.digest for r in results} | done
        checksums = _checksums(plan, digests)
        sink.finish(checksums, attrs)
        sink.close()
        write_model_card(job.partial, attrs)
        final = job.commit()
        finished = time.perf_counter()
    return RunReport(
        path=final,
        kind=resolved.kind,
        format=fmt,
        tensors=len(plan),
        input_bytes=sum(t.input_nbytes for t in tensors),
        output_bytes=sum(t.nbytes for t in tensors),
        seconds=time.perf_counter() - started,
        workers=workers,
        memory_limit=limit,
        skipped_nonfloat=resolved.skipped_nonfloat,
        kept_base=resolved.kept_base,
        checksums=checksums,
        resumed_blocks=len(done),
        stage_seconds={
            **_stage_sums(results),
            "blocks_wall": blocks_done - blocks_started,
            "finish_wall": finished - blocks_done,
        },
        device=device,
    )


def _stage_sums(results: list[BlockResult]) -> dict[str, float]:
    """Seconds per block stage, summed over blocks (so over parallel workers)."""
    sums = dict.fromkeys(BLOCK_STAGES, 0.0)
    for r in results:
        for stage, seconds in zip(BLOCK_STAGES, r.seconds, strict=False):
            sums[stage] += seconds
    return sums


def _resume_plan(
    job: Job, plan: list[PlannedTensor]
) -> tuple[list[PlannedTensor], dict[tuple[str, int], bytes]]:
    """The recorded block plan of the unfinished job ``job`` resumes, its inputs checked."""
    recorded = job.recorded
    assert recorded is not None  # job.resumed
    # The recorded block rows, not this run's budget: blocks must be cut as before.
    replanned = [PlannedTensor(p.tensor, recorded.block_rows[p.tensor.name]) for p in plan]
    # The finished blocks were computed from the inputs as they were then: read them again
    # and compare, so a changed input is refused rather than mixed in (docs/reliability.md).
    for p in replanned:
        rows = matrix_shape(p.tensor.shape)[0]
        for r0, r1 in row_ranges(rows, p.block_rows):
            entry = job.entries.get((p.tensor.name, r0))
            if entry is not None:
                check_done_inputs(p.tensor, r0, r1, entry[1], p.block_rows)
    return replanned, {key: digest for key, (digest, _) in job.entries.items()}


def _run_blocks(
    plan: list[PlannedTensor],
    sink: Sink,
    done: dict[tuple[str, int], bytes],
    log: DoneLog,
    *,
    scheduler: str,
    workers: int,
    progress: bool,
    check_finite: bool,
    desc: str,
    device: str = CPU,
) -> list[BlockResult]:
    """One task per block not already done; each finished block is logged for resume."""
    graph: dict[Any, Any] = {}
    sizes: dict[Any, int] = {}
    blocks: list[tuple[LazyTensor, int, int, BlockWriter]] = []
    buffers = run_read_buffers(scheduler)
    for p in plan:
        t = p.tensor
        writer = sink.writer(t.name)
        blocks += [
            (t, r0, r1, writer)
            for r0, r1 in row_ranges(matrix_shape(t.shape)[0], p.block_rows)
            if (t.name, r0) not in done
        ]
    for i, (t, r0, r1, writer) in enumerate(blocks):
        # Each task starts the read of the block planned after it: workers take blocks in
        # about this order, so from a cold cache the disk works ahead of the computation.
        following = blocks[i + 1][:3] if i + 1 < len(blocks) else None
        key = ("streamvec-block", t.name, r0)
        graph[key] = (_block_task, t, r0, r1, writer, check_finite, device, following, buffers)
        cols = matrix_shape(t.shape)[1]
        sizes[key] = (r1 - r0) * sum(max(cols, 1) * r.dtype.itemsize for _, r in t.terms)

    def finished(key: Any, result: BlockResult) -> None:
        log.record(result.name, result.r0, result.digest, list(result.inputs))

    return execute_graph(
        graph,
        list(graph),
        sizes,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
        total=sum(sizes.values()),
        desc=desc,
        on_result=finished,
    )


def _raise_if_nonfinite(results: list[BlockResult]) -> None:
    bad: dict[str, tuple[int, int, str]] = {}
    for r in sorted(results, key=lambda r: (r.name, r.r0)):
        if r.nonfinite:
            count, first, inputs = bad.get(r.name, (0, r.first_nonfinite_row, ""))
            inputs = inputs or r.nonfinite_inputs
            bad[r.name] = (count + r.nonfinite, min(first, r.first_nonfinite_row), inputs)
    raise_if_nonfinite(bad)


def _stored_dtype(t: LazyTensor) -> str:
    """The dtype a tensor is stored as (FP8 re-quantized outputs compute in float32)."""
    if t.requantize is not None:
        return f"{dtype_name(t.requantize.fp8)}+{t.requantize.granularity}-scales"
    return dtype_name(t.dtype)


def _checksums(
    plan: list[PlannedTensor], digests: dict[tuple[str, int], bytes]
) -> dict[str, dict[str, Any]]:
    out = {}
    for p in plan:
        t = p.tensor
        rows, _ = matrix_shape(t.shape)
        blocks = [digests.get((t.name, r0)) for r0, _ in row_ranges(rows, p.block_rows)]
        if any(b is None for b in blocks):
            raise RuntimeError(f"internal error: blocks of {t.name!r} missing from the results")
        ordered = [b for b in blocks if b is not None]
        out[t.name] = {
            CHECKSUM_ALGO: tensor_checksum(ordered),
            "checksum_block_rows": p.block_rows,
            # Per block (= per chunk of a Zarr output): readers check each chunk they decode.
            "block_" + CHECKSUM_ALGO: [d.hex() for d in ordered],
            "dtype": dtype_name(t.dtype),
            "shape": list(t.shape),
        }
    return out
