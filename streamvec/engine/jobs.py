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
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from streamvec.errors import StreamvecError

if TYPE_CHECKING:
    from streamvec.model.tensor import LazyTensor

JOB_FILE = "streamvec-job.json"
DONE_LOG = "streamvec-done.log"
# Flushing to disk has a cost; logging completed blocks every few seconds bounds the redo
# after a crash to those seconds of work.
DEFAULT_SYNC_SECONDS = 5.0


class ResumeError(StreamvecError):
    """An unfinished job exists but cannot be resumed with these inputs or parameters."""


@dataclass(frozen=True)
class JobPlan:
    """The job's identity and its block plan (tensor name -> block rows)."""

    identity: dict[str, Any]
    block_rows: dict[str, int]

    def to_json(self) -> str:
        return json.dumps({"identity": self.identity, "block_rows": self.block_rows}, indent=1)


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
        return JobPlan(doc["identity"], {k: int(v) for k, v in doc["block_rows"].items()})
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
