"""Where the time of one ``diff`` goes: per-stage timers around the engine's own functions.

Runs ``task_vector(...).save(...)`` in-process (threads scheduler) with timers wrapped around
the functions each stage calls, then prints seconds per stage. Parallel stages (run by the
worker threads) are summed over threads, so they can add up to more than the wall time;
serial stages (create, finish, sync) are wall time.

    python bench/profile_diff.py BASE FINETUNED [--workdir DIR] [--repeat 3] [--workers N]

The wrappers are installed for the duration of the run and removed after; this is a
measuring tool, not part of the engine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class StageTimer:
    """Thread-safe sums of seconds per stage label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                with self._lock:
                    self.seconds[label] += took
                    self.calls[label] += 1

        return timed


@contextmanager
def instrumented(timer: StageTimer) -> Iterator[None]:
    """Wrap the engine's stage functions where they are looked up; undo on exit."""
    from streamvec.engine import execute as engine
    from streamvec.engine import sinks
    from streamvec.io import blocks, output
    from streamvec.io.zarr import store as zarr_store
    from streamvec.model import tensor

    patches: list[tuple[Any, str, str]] = [
        (blocks.SafetensorsReader, "read", "read (map + populate rows)"),
        (tensor.LazyTensor, "evaluate", "compute (convert + subtract)"),
        (engine, "block_digest", "checksum"),
        (zarr_store.ZarrBlockWriter, "write", "block write, total (check+encode+write)"),
        (zarr_store, "_is_all_zero", "  empty-chunk check"),
        (zarr_store, "encode_chunk", "  encode (incl. empty check)"),
        (zarr_store, "_write_file", "  write chunk files (+ finish attrs)"),
        (sinks.ZarrSink, "prepare", "create store (arrays + attrs)"),
        (zarr_store, "set_array_attrs", "finish: array attrs"),
        (zarr_store, "update_root_attrs", "finish: root attrs"),
        (zarr_store, "consolidate", "finish: consolidate"),
        (output.os, "sync", "os.sync (commit; resume log)"),
    ]
    saved = []
    for owner, name, label in patches:
        original = getattr(owner, name, None)
        if original is None:
            continue  # an older engine without this stage
        saved.append((owner, name, original))
        setattr(owner, name, timer.wrap(label, original))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def profile_once(base: str, finetuned: str, out: Path, workers: int | None) -> dict[str, float]:
    from streamvec.ops.task_vector import task_vector

    timer = StageTimer()
    with instrumented(timer):
        start = time.perf_counter()
        report = task_vector(base, finetuned).save(out, progress=False, workers=workers)
        wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {"wall": wall, "input_bytes": float(report.input_bytes), **timer.seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("finetuned")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="streamvec-profile-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs = [
        profile_once(args.base, args.finetuned, workdir / f"tau-{i}.zarr", args.workers)
        for i in range(args.repeat)
    ]
    labels = list(dict.fromkeys(k for r in runs for k in r if k not in ("wall", "input_bytes")))
    wall = statistics.median(r["wall"] for r in runs)
    gb = runs[0]["input_bytes"] / 1e9
    print(f"{args.repeat} runs, median wall {wall:.2f} s, {gb / wall:.2f} GB/s of input")
    print(f"{'stage':42s} {'median s':>9s} {'share of wall':>14s}")
    for label in labels:
        s = statistics.median(r.get(label, 0.0) for r in runs)
        print(f"{label:42s} {s:9.2f} {s / wall:13.0%}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    raise SystemExit(main())
