"""Resumable jobs: what a job is, and a durable record of which blocks are done.

An unfinished output (the hidden ``.NAME.partial`` sibling) holds two files besides the data:

- ``streamvec-job.json``: the job's identity (inputs with their fingerprints, the expression,
  output dtypes and shapes, format, shard size, streamvec version) and its block plan. A resumed
  run must have the same identity, and reuses the recorded plan, so every block is cut exactly
  as before and the result is identical bit for bit to an uninterrupted run.
- ``streamvec-done.log``: one line per finished block (tensor, first row, digest). Lines are
  appended only after the data they describe has been flushed to disk (``os.sync``), so after a
  crash or power loss every logged block is really on disk; blocks done but not yet logged are
  simply redone.

Both files are removed before the output is renamed to its final name.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamvec.errors import StreamvecError

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
    done: dict[tuple[str, int], bytes] = {}
    try:
        text = (partial / DONE_LOG).read_text()
    except OSError:
        return done
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            done[(str(entry[0]), int(entry[1]))] = bytes.fromhex(entry[2])
        except (ValueError, IndexError, TypeError):
            continue
    return done


class DoneLog:
    """Appends finished blocks, durably and in batches (see the module docstring)."""

    def __init__(self, partial: Path, sync_seconds: float = DEFAULT_SYNC_SECONDS) -> None:
        self.path = partial / DONE_LOG
        self.sync_seconds = sync_seconds
        self._pending: list[tuple[str, int, bytes]] = []
        self._last = time.monotonic()
        self._file = open(self.path, "a")  # closed in close()

    def record(self, name: str, r0: int, digest: bytes) -> None:
        self._pending.append((name, r0, digest))
        if time.monotonic() - self._last >= self.sync_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        os.sync()  # the blocks' data first, then the lines that say they are done
        for name, r0, digest in self._pending:
            self._file.write(json.dumps([name, r0, digest.hex()]) + "\n")
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
