"""Resumable jobs: what a job is, and a durable record of which blocks are done.

An unfinished output (the hidden ``.NAME.partial`` sibling) holds two files besides the data:

- ``streamvec-job.json``: the job's identity (inputs with their fingerprints, the expression,
  output dtypes and shapes, format, shard size, streamvec version) and its block plan. A resumed
  run must have the same identity, and reuses the recorded plan, so every block is cut exactly
  as before and the result is identical bit for bit to an uninterrupted run.
- ``streamvec-done.log``: one line per finished block (tensor, first row, digest of the output
  block, and a digest of each input's bytes for those rows). Lines are
  appended only after the data they describe has been flushed to disk (``os.sync``), so after a
  crash or power loss every logged block is really on disk; blocks done but not yet logged are
  simply redone.

A resumed run reads the inputs of every block already done again and compares their digests
with the logged ones (:func:`check_done_inputs`): an input that changed since (one flipped byte,
or a file replaced by another with the same header and size) is refused by name, never mixed
with the blocks computed from its earlier version.

Both files are removed before the output is renamed to its final name.

:class:`Job` is the one lifecycle every writing command goes through: the output directory
(never over an input, see :class:`~streamvec.io.output.OutputDir`), the job record, the done
log, resume, abort on error, and release on Ctrl-C or SIGTERM. The engine logs row blocks;
the SVD commands (``svd``, ``lora``, ``decompose``, ``merge-svd``) log whole tensors
(first row 0), each with its inputs' digests.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import xxhash

from streamvec.errors import StreamvecError
from streamvec.units import format_bytes

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from streamvec.engine.settings import Settings
    from streamvec.io.output import InputPaths
    from streamvec.model.tensor import LazyTensor

S = TypeVar("S", bound="Settings")

JOB_FILE = "streamvec-job.json"
DONE_LOG = "streamvec-done.log"
# Flushing to disk has a cost; logging completed blocks every few seconds bounds the redo
# after a crash to those seconds of work.
DEFAULT_SYNC_SECONDS = 5.0


class ResumeError(StreamvecError):
    """An unfinished job exists but cannot be resumed with these inputs or parameters."""


@dataclass(frozen=True)
class JobPlan:
    """The job's identity and how it was planned, reused as recorded when it resumes.

    Attributes:
        identity: what the output is (inputs, expression, settings that change its bytes); a
            resumed run must have the same.
        block_rows: the engine's block plan (tensor name -> block rows).
        budget: the SVD commands' plan inputs (memory limit, workers, block size), which
            decide how each matrix is factored and so its last bits.
    """

    identity: dict[str, Any]
    block_rows: dict[str, int]
    budget: dict[str, Any] | None = None

    def to_json(self) -> str:
        doc: dict[str, Any] = {"identity": self.identity, "block_rows": self.block_rows}
        if self.budget is not None:
            doc["budget"] = self.budget
        return json.dumps(doc, indent=1)


def write_job(partial: Path, plan: JobPlan) -> None:
    """Record the job (durably) before any block is written."""
    path = partial / JOB_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(plan.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_job(partial: Path) -> JobPlan | None:
    """The recorded job of an unfinished output, or None when there is none or it is unreadable."""
    try:
        doc = json.loads((partial / JOB_FILE).read_text())
        budget = doc.get("budget")
        return JobPlan(
            doc["identity"],
            {k: int(v) for k, v in doc["block_rows"].items()},
            dict(budget) if budget is not None else None,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def explain_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> str:
    """Which parts of the job identity differ, in words."""
    keys = sorted(set(recorded) | set(current))
    diffs = [k for k in keys if recorded.get(k) != current.get(k)]
    return ", ".join(diffs) or "unknown"


def read_done(partial: Path) -> dict[tuple[str, int], bytes]:
    """Blocks recorded as done: (tensor name, first row) -> block digest.

    A torn last line (crash mid-append) is ignored.
    """
    return {key: digest for key, (digest, _) in read_done_entries(partial).items()}


def read_done_entries(partial: Path) -> dict[tuple[str, int], tuple[bytes, list[str] | None]]:
    """Blocks recorded as done: (tensor, first row) -> (block digest, input digests or None)."""
    done: dict[tuple[str, int], tuple[bytes, list[str] | None]] = {}
    try:
        text = (partial / DONE_LOG).read_text()
    except OSError:
        return done
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            inputs = [str(x) for x in entry[3]] if len(entry) > 3 else None
            done[(str(entry[0]), int(entry[1]))] = (bytes.fromhex(entry[2]), inputs)
        except (ValueError, IndexError, TypeError):
            continue
    return done


def digest_operands(operands: list[tuple[float, np.ndarray]]) -> list[str]:
    """One digest per operand of a block: xxh3-128 of its bytes as read (C order)."""
    return [
        xxhash.xxh3_128_hexdigest(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
        for _, a in operands
    ]


def tensor_input_digests(t: LazyTensor, r0: int, r1: int, step: int) -> list[str]:
    """:func:`digest_operands` over rows ``[r0, r1)``, read ``step`` rows at a time.

    Streaming xxh3 over the rows in order equals one digest of them all, so the result is the
    same whatever ``step`` is.
    """
    hashes = [xxhash.xxh3_128() for _ in t.terms]
    for a in range(r0, r1, max(step, 1)):
        for h, (_, block) in zip(hashes, t.read_operands(a, min(a + step, r1)), strict=True):
            h.update(np.ascontiguousarray(block).reshape(-1).view(np.uint8).data)
    return [h.hexdigest() for h in hashes]


# Rows read at a time when digesting a whole tensor's inputs outside a planned block: 256 kB,
# so the digests add nothing noticeable to the memory of a run under a tight budget.
DIGEST_READ_BYTES = 256 << 10


def digest_rows(t: LazyTensor) -> int:
    """Rows per read that keep one read of all of ``t``'s inputs near DIGEST_READ_BYTES."""
    from streamvec.io.blocks import matrix_shape

    cols = max(matrix_shape(t.shape)[1], 1)
    row_bytes = cols * sum(r.dtype.itemsize for _, r in t.terms)
    return max(1, DIGEST_READ_BYTES // max(row_bytes, 1))


def input_label(t: LazyTensor, i: int) -> str:
    """The file (or store) operand ``i`` of ``t`` is read from, for messages."""
    reader = t.terms[i][1]
    return str(getattr(reader, "path", None) or getattr(reader, "store", None) or "an input")


def check_done_inputs(
    t: LazyTensor, r0: int, r1: int, recorded: list[str] | None, step: int
) -> None:
    """Refuse to resume when the inputs of a finished block are not what they were.

    Args:
        t: the tensor.
        r0: first row of the block.
        r1: end row of the block.
        recorded: the input digests logged when the block finished (None: not logged).
        step: rows read at a time (bounds the memory of the check).

    Raises:
        ResumeError: naming the input file that changed.
    """
    current = tensor_input_digests(t, r0, r1, step)
    if recorded is None or len(recorded) != len(current):
        raise ResumeError(
            f"cannot resume: the unfinished job did not record its inputs' digests for tensor "
            f"{t.name!r}; rerun without --resume to start over"
        )
    for i, (was, now) in enumerate(zip(recorded, current, strict=True)):
        if was != now:
            raise ResumeError(
                f"cannot resume: {input_label(t, i)} changed since the unfinished run (tensor "
                f"{t.name!r}, rows {r0}-{r1} differ); its finished blocks would mix two "
                "versions; rerun without --resume to start over"
            )


def whole_tensor_digests(t: LazyTensor) -> list[str]:
    """:func:`tensor_input_digests` of every row of ``t``, read in small steps."""
    from streamvec.io.blocks import matrix_shape

    return tensor_input_digests(t, 0, matrix_shape(t.shape)[0], digest_rows(t))


def check_done_tensors(tensors: Sequence[LazyTensor], recorded: list[str] | None) -> None:
    """:func:`check_done_inputs` for a finished output tensor computed from whole tensors.

    The SVD commands log one entry per output tensor with the digests of every input tensor
    it was computed from, in order (``merge-svd``'s TSV-M reads each task's matrix,
    ``decompose`` each task's); ``recorded`` is cut back into one list per tensor.

    Raises:
        ResumeError: naming the input file that changed.
    """
    from streamvec.io.blocks import matrix_shape

    widths = [len(t.terms) for t in tensors]
    if recorded is None or len(recorded) != sum(widths):
        recorded = None
    start = 0
    for t, width in zip(tensors, widths, strict=True):
        part = None if recorded is None else recorded[start : start + width]
        start += width
        check_done_inputs(t, 0, matrix_shape(t.shape)[0], part, digest_rows(t))


class DoneLog:
    """Appends finished blocks, durably and in batches (see the module docstring)."""

    def __init__(self, partial: Path, sync_seconds: float = DEFAULT_SYNC_SECONDS) -> None:
        self.path = partial / DONE_LOG
        self.sync_seconds = sync_seconds
        self._pending: list[tuple[str, int, bytes, list[str]]] = []
        self._last = time.monotonic()
        self._file = open(self.path, "a")  # closed in close()

    def record(self, name: str, r0: int, digest: bytes, inputs: list[str] | None = None) -> None:
        """Log a finished block with its output digest and its inputs' digests."""
        self._pending.append((name, r0, digest, list(inputs or [])))
        if time.monotonic() - self._last >= self.sync_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        os.sync()  # the blocks' data first, then the lines that say they are done
        for name, r0, digest, inputs in self._pending:
            self._file.write(json.dumps([name, r0, digest.hex(), inputs]) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._pending.clear()
        self._last = time.monotonic()

    def close(self) -> None:
        self._file.close()


def remove_job_files(partial: Path) -> None:
    for name in (JOB_FILE, DONE_LOG):
        try:
            (partial / name).unlink()
        except FileNotFoundError:
            pass


class Job:
    """One writing command's output, from its start to its commit (see the module doc).

    Use as a context manager. On entry the output directory is opened; with ``resume`` an
    unfinished output of the same job is kept (:attr:`resumed`, :attr:`recorded`,
    :attr:`entries`), else it starts anew and ``plan`` is recorded. On leaving with an error,
    the partial output is removed; on Ctrl-C or SIGTERM, or when the unfinished job cannot be
    resumed as asked, it is kept for ``--resume`` and the lock released. A disk error becomes
    a one-line :class:`~streamvec.io.output.OutputError` saying what is needed.

    Args:
        output: the output path.
        inputs: every file and directory the command reads (the output may not overlap them).
        plan: this job's identity and plan, recorded when it starts anew.
        resume: keep an unfinished output of the same job and continue it.
        overwrite: replace an existing output once the new one is complete.
        expected_bytes: about how large the output will be (for the disk-full message).
        sync_seconds: how often finished work is made durable and logged (default:
            ``STREAMVEC_SYNC_SECONDS`` or 5 s).
        intermediate: ``output`` is a hidden sibling of another command's output (such as
            ``.OUT.factors``): its partial output and lock are ``.OUT.factors.partial`` and
            ``.OUT.factors.lock``, so every file of a run writing OUT starts with ``.OUT.``.

    Example:
        >>> with Job(out, inputs=paths, plan=JobPlan(identity, {}), resume=True) as job:
        ...     for name, t in tensors.items():  # doctest: +SKIP
        ...         if name not in job.done_tensors():
        ...             write(job.partial, name, t)
        ...             job.record_tensor(name, whole_tensor_digests(t))
        ...     final = job.commit()
    """

    def __init__(
        self,
        output: str | os.PathLike[str],
        *,
        inputs: InputPaths,
        plan: JobPlan,
        resume: bool = False,
        overwrite: bool = False,
        expected_bytes: int | None = None,
        sync_seconds: float | None = None,
        intermediate: bool = False,
    ) -> None:
        from streamvec.io.output import OutputDir

        self.out = OutputDir(output, overwrite=overwrite, inputs=inputs, intermediate=intermediate)
        self.out.expected_bytes = expected_bytes
        self.plan = plan
        self.resume = resume
        self.sync_seconds = (
            sync_seconds
            if sync_seconds is not None
            else float(os.environ.get("STREAMVEC_SYNC_SECONDS", DEFAULT_SYNC_SECONDS))
        )
        self.resumed = False
        self.recorded: JobPlan | None = None
        self.entries: dict[tuple[str, int], tuple[bytes, list[str] | None]] = {}
        self._log: DoneLog | None = None
        self._closers: list[Callable[[], None]] = []

    @property
    def partial(self) -> Path:
        """The directory the output is written into until :meth:`commit`."""
        return self.out.partial

    @property
    def final(self) -> Path:
        """The output path."""
        return self.out.final

    def __enter__(self) -> Job:
        out = self.out
        try:
            kept = out.open(keep_partial=self.resume)
            recorded = read_job(out.partial) if kept else None
            entries = read_done_entries(out.partial) if kept else {}
            if kept and recorded is None and (out.partial / JOB_FILE).exists():
                # Written whole or not at all (write_job), so this one was damaged since.
                raise ResumeError(
                    f"cannot resume: the job record {out.partial / JOB_FILE} is unreadable; "
                    "rerun without --resume to start over"
                )
            if kept and (
                recorded is None or (recorded.identity == self.plan.identity and not entries)
            ):
                # Stopped before anything was logged as done (before its job record, or
                # before its files were all created): nothing to continue, so start over.
                out.release()
                kept = out.open(keep_partial=False)
            if kept:
                assert recorded is not None
                if recorded.identity != self.plan.identity:
                    what = explain_mismatch(recorded.identity, self.plan.identity)
                    raise ResumeError(
                        f"cannot resume: the unfinished job differs in {what}; rerun without "
                        "--resume to start over"
                    )
                self.resumed, self.recorded, self.entries = True, recorded, entries
            else:
                write_job(out.partial, self.plan)
            self._log = DoneLog(out.partial, self.sync_seconds)
        except BaseException as exc:
            self._stop(type(exc), exc)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._stop(exc_type, exc)

    def _stop(self, exc_type: type[BaseException], exc: BaseException | None) -> None:
        """Close what the command opened, then keep or remove the partial output."""
        for close in reversed(self._closers):
            try:
                close()  # e.g. wait for writes in flight; may fail again on a full disk
            except OSError:
                pass
        if self._log is not None:
            self._log.close()
        if issubclass(exc_type, (KeyboardInterrupt, ResumeError)):
            self.out.release()  # keep the partial output: --resume continues it
            return
        self.out.abort()
        if isinstance(exc, OSError) and not isinstance(exc, StreamvecError):
            raise self.out.write_error(exc) from None

    def on_stop(self, close: Callable[[], None]) -> None:
        """Call ``close`` when the job stops on an error or a signal, before the cleanup."""
        self._closers.append(close)

    @property
    def log(self) -> DoneLog:
        """The done log (open inside the ``with`` block)."""
        assert self._log is not None, "use Job as a context manager"
        return self._log

    @property
    def budget(self) -> dict[str, Any]:
        """The budget this job's factorizations are planned with: the unfinished run's when
        resumed (:func:`streamvec.ops.factorize.factor_budget`)."""
        recorded = self.recorded if self.resumed else self.plan
        if recorded is None or recorded.budget is None:
            raise ResumeError(
                f"cannot resume: the unfinished job in {self.out.partial} has no recorded "
                "budget (written by another version); rerun without --resume to start over"
            )
        return recorded.budget

    def budgeted(self, run: S) -> S:
        """``run`` with the memory limit, workers and block size of :attr:`budget`.

        Raises:
            ResumeError: a resumed run was given one of them with another value than the
                unfinished run's: its tensors left to factor would be planned differently
                (say, a lower limit after running out of memory), and its output would be
                neither run's. The message says how to go on.
        """
        budget = self.budget
        if self.resumed:
            given, resolved = run.given(), run.plan_budget()
            for key in ("memory_limit", "workers", "block_size"):
                if key in given and resolved[key] != budget[key]:
                    flag, was = "--" + key.replace("_", "-"), budget[key]
                    size = "" if key == "workers" else f" ({format_bytes(was)})"
                    raise ResumeError(
                        f"cannot resume with {flag} {given[key]}: the unfinished run in "
                        f"{self.out.partial} planned its factorizations with {flag} "
                        f"{was}{size}, and the tensors left must be planned the same; rerun "
                        f"with {flag} {was} (or without {flag}), or without --resume to start "
                        "over with the new value"
                    )
        return run.with_budget(budget)

    def done_tensors(self) -> set[str]:
        """Tensors an unfinished run logged as done (whole-tensor jobs)."""
        return {name for name, _ in self.entries}

    def check_done(self, tensors: dict[str, Sequence[LazyTensor]]) -> None:
        """Refuse to resume when an input of a finished tensor changed since (by name).

        Args:
            tensors: output tensor name -> the input tensors it was computed from, in the
                order their digests were logged.
        """
        for (name, _), (_, inputs) in self.entries.items():
            if name in tensors:
                check_done_tensors(tensors[name], inputs)

    def record_tensor(self, name: str, inputs: Iterable[str]) -> None:
        """Log an output tensor as done, with the digests of the inputs it was computed from."""
        self.log.record(name, 0, b"", list(inputs))

    def commit(self, scratch: Iterable[Path] = ()) -> Path:
        """Remove the job files, then ``scratch`` (work files inside the partial output that a
        resumed run would need while the job files exist), and give the output its name."""
        self.log.flush()
        self.log.close()
        remove_job_files(self.out.partial)
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
        return self.out.commit()

    def discard(self) -> None:
        """Remove the partial output of a job whose result is no longer needed."""
        if self._log is not None:
            self._log.close()
        self.out.abort()
