"""A whole-model ``streamvec svd`` against a plain ``torch.svd_lowrank`` loop, same store.

Builds (or reuses, in ``--workdir``) a synthetic bf16 base and a fine-tune of ``--params``
parameters and their task-vector store (``streamvec diff``), then, in interleaved rounds:

* ``streamvec svd``: :func:`streamvec.ops.svd.svd` on the store, rank K (default options:
  power iterations chosen per matrix), written to a fresh SVD store;
* ``torch loop``: the 15-line script a user would write: for each 2-D array of the store,
  ``torch.svd_lowrank(torch.from_numpy(zarr_array[...]), q=K + 10, niter=Q)`` (Q = 1 and 2),
  factors kept in memory, nothing written.

Every ``streamvec svd`` run writes a store of its own into a folder this benchmark makes in
``WORKDIR`` (``svd-outputs-*``), removed, with nothing else, when the benchmark ends: on an
ext4 without a journal (this development machine's disk), creating a file or folder checks
every inode freed in the last half minute or so before reusing one (the kernel's
``recently_deleted``), so removing the previous round's output (~700 files and folders at
0.1B) just before a run made that run's folders cost 10x, a cost of the benchmark, not of
the command (``--remove-between`` measures it).

Each run is its own process, timed after one warm-up run in it, and reports its wall time
and peak anonymous memory (``PeakSampler``, sampled every
10 ms, minus the process before the run), and the mean relative residual over the matrices.
The time leaves out what only the benchmark does: the loop's float64 residuals and the read
back of the residuals ``streamvec svd`` recorded.

    PYTHONPATH=. python bench/bench_svd_model.py [--params 0.1B] [--rank 16] [--rounds 3]
        [--workdir /tmp/bsvdm] [--trees before=/tmp/old,after=. [--calls]]

``--trees``: the ``streamvec svd`` command of several checkouts (``git worktree add /tmp/old
COMMIT``) on the same store, as subprocesses, interleaved, with their peak anonymous memory;
with ``--calls``, each tree's ``svd(...)`` call timed in a process of its own after a warm-up
call (no interpreter start-up in the figure).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def ensure_store(workdir: Path, params: str) -> Path:
    from streamvec.ops.task_vector import task_vector
    from streamvec.tools import synth

    store = workdir / f"tau-{params}.zarr"
    if store.exists():
        return store
    base, ft = workdir / f"base-{params}", workdir / f"ft-{params}"
    synth.build_checkpoint(base, params=params, dtype="bfloat16")
    synth.build_finetune(base, ft, seed=1)
    task_vector(base, ft).save(store, progress=False)
    return store


def torch_loop(store: Path, rank: int, niter: int) -> tuple[float, list[float]]:
    """Seconds of the loop (listing, reads and factorizations; not the residuals, which
    need a float64 pass over each matrix) and the residuals."""
    import torch
    import zarr

    from streamvec.io.zarr.store import read_store

    residuals = []
    start = time.perf_counter()
    seconds = 0.0
    for info in read_store(store).arrays.values():
        if len(info.shape) != 2:
            continue
        a = np.asarray(zarr.open_array(str(store), path=info.array_path, mode="r")[...])
        t = torch.from_numpy(a)
        u, s, v = torch.svd_lowrank(t, q=min(rank + 10, *a.shape), niter=niter)
        seconds += time.perf_counter() - start
        k = min(rank, *a.shape)
        norm2 = float(np.sum(a.astype(np.float64) ** 2))
        kept = float(np.sum(s[:k].double().numpy() ** 2))
        residuals.append(np.sqrt(max(0.0, norm2 - kept) / norm2) if norm2 else 0.0)
        del u, v
        start = time.perf_counter()
    return seconds, residuals


def fresh_output(outputs: Path, remove_between: bool) -> Path:
    """A path for one run's output store in the benchmark's own ``outputs`` folder: a new one
    (kept until the benchmark ends), or with ``remove_between`` the same each time, removed
    first."""
    import uuid

    if remove_between:
        out = outputs / "svd.zarr"
        shutil.rmtree(out, ignore_errors=True)
        return out
    return outputs / f"svd-{uuid.uuid4().hex}.zarr"


def one_command(args: argparse.Namespace, name: str) -> list[str]:
    """The command line of this script's ``--one NAME`` with the run's settings."""
    import sys

    cmd = [sys.executable, __file__, "--params", args.params, "--rank", str(args.rank)]
    cmd += ["--workdir", str(args.workdir), "--outputs", str(args.outputs), "--one", name]
    return cmd + (["--remove-between"] if args.remove_between else [])


def streamvec_svd(store: Path, out: Path, rank: int) -> tuple[float, list[float]]:
    """Seconds of the call (which writes its store at ``out``, a path not taken) and the
    residuals it recorded (read back afterwards)."""
    from streamvec.io.zarr.lowrank import read_svd_store
    from streamvec.ops.svd import RunOptions, SVDOptions, svd

    start = time.perf_counter()
    svd(store, out, options=SVDOptions(rank=rank), run=RunOptions(progress=False))
    seconds = time.perf_counter() - start
    entries = read_svd_store(out).entries.values()
    return seconds, [e.attrs["svd"]["residual"] for e in entries if e.factored]


def cli_svd(tree: str, store: Path, out: Path, rank: int) -> tuple[float, int]:
    """``streamvec svd STORE --rank K`` from the checkout ``tree``: wall seconds, peak anon."""
    import subprocess
    import sys

    from streamvec.memory import PeakSampler

    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, "-m", "streamvec.cli", "svd", str(store), "-o", str(out)]
    start = time.perf_counter()
    # cwd: `python -m` puts the working directory ahead of PYTHONPATH on sys.path
    proc = subprocess.Popen([*cmd, "--rank", str(rank), "-q"], env=env, cwd=tree)
    with PeakSampler(proc.pid, interval=0.01) as sampler:
        proc.wait()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"streamvec svd from {tree} exited {proc.returncode}")
    return seconds, sampler.peak


def call_svd(tree: str, args: argparse.Namespace) -> tuple[float, int]:
    """``svd(...)`` of the checkout ``tree``, timed in a process of its own after a warm-up
    call (this script's ``--one``, run against that tree): seconds, peak anon growth."""
    import json
    import subprocess

    env = dict(os.environ, PYTHONPATH=tree)
    cmd = one_command(args, "streamvec svd")
    line = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    got = json.loads(line.strip().splitlines()[-1])
    return got["seconds"], got["peak"]


def compare_trees(args: argparse.Namespace, store: Path) -> None:
    """``--trees before=DIR,after=DIR``: the CLI of each checkout (or with ``--calls`` its
    ``svd(...)`` call), interleaved rounds."""
    from streamvec.units import format_bytes

    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    times: dict[str, list[float]] = {k: [] for k in trees}
    peaks: dict[str, int] = {k: 0 for k in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            if args.calls:
                sec, peak = call_svd(tree, args)
            else:
                out = fresh_output(args.outputs, args.remove_between)
                sec, peak = cli_svd(tree, store, out, args.rank)
            times[name].append(sec)
            peaks[name] = max(peaks[name], peak)
            load = os.getloadavg()[0]
            print(f"round {r + 1} {name:12s} {sec:7.2f} s  load {load:.1f}", flush=True)
    first = statistics.median(times[next(iter(trees))])
    what = "svd(...) calls, after a warm-up" if args.calls else "subprocess"
    print(f"\n{args.params} task vector, `streamvec svd --rank {args.rank}` ({what}):")
    for name in trees:
        med = statistics.median(times[name])
        print(
            f"  {name:12s} median {med:7.2f} s ({med / first:4.2f}x) | peak anon "
            f"{format_bytes(peaks[name])}"
        )


RUNS = ("streamvec svd", "torch loop niter=1", "torch loop niter=2")


def one_run(args: argparse.Namespace, store: Path) -> None:
    """``--one NAME``: one run in this process; prints its figures as one JSON line."""
    import json

    from streamvec.memory import PeakSampler, anon_bytes

    def svd_run() -> tuple[float, list[float]]:
        return streamvec_svd(store, fresh_output(args.outputs, args.remove_between), args.rank)

    runs: dict[str, Any] = {
        "streamvec svd": svd_run,
        "torch loop niter=1": lambda: torch_loop(store, args.rank, 1),
        "torch loop niter=2": lambda: torch_loop(store, args.rank, 2),
    }
    fn = runs[args.one]
    fn()  # warm: imports, thread pools, the page cache
    before = anon_bytes()
    with PeakSampler() as sampler:
        sec, residuals = fn()
    peak = sampler.peak - before
    print(json.dumps({"seconds": sec, "residual": float(np.mean(residuals)), "peak": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="0.1B")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bsvdm"))
    p.add_argument(
        "--trees",
        help="NAME=DIR,...: instead, time the `streamvec svd` CLI of each checkout "
        "(e.g. before=/tmp/old,after=.) in interleaved rounds, with its peak anonymous memory",
    )
    p.add_argument(
        "--calls",
        action="store_true",
        help="with --trees: time each tree's svd(...) call in a process of its own, after a "
        "warm-up call, instead of its CLI (no interpreter start-up)",
    )
    p.add_argument(
        "--remove-between",
        action="store_true",
        help="remove each run's output just before the next run writes the same path (what "
        "the benchmark did before; see the module's docstring) instead of keeping them all "
        "until the end",
    )
    p.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)
    p.add_argument("--outputs", type=Path, help=argparse.SUPPRESS)  # with --one: the run's
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    store = ensure_store(args.workdir, args.params)
    if args.one:
        if args.outputs is None:
            p.error("--one needs --outputs (the folder the benchmark made for its outputs)")
        one_run(args, store)
        return
    import tempfile

    # A folder of its own: nothing the benchmark did not write is removed with it.
    args.outputs = Path(tempfile.mkdtemp(prefix="svd-outputs-", dir=args.workdir))
    try:
        if args.trees:
            compare_trees(args, store)
        else:
            compare_runs(args)
    finally:
        shutil.rmtree(args.outputs, ignore_errors=True)


def compare_runs(args: argparse.Namespace) -> None:
    """``streamvec svd`` and the torch loops, interleaved rounds, each run in its own process."""
    import json
    import subprocess

    from streamvec.units import format_bytes

    times: dict[str, list[float]] = {k: [] for k in RUNS}
    peaks: dict[str, int] = {k: 0 for k in RUNS}
    res: dict[str, float] = {}
    for r in range(args.rounds):
        for name in RUNS:  # interleaved, each in its own process: torch's thread pool and
            # numpy's OpenBLAS threads in one process slowed whichever ran second
            cmd = one_command(args, name)
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            got = json.loads(line.strip().splitlines()[-1])
            times[name].append(got["seconds"])
            peaks[name] = max(peaks[name], got["peak"])
            res[name] = got["residual"]
            load = os.getloadavg()[0]
            print(f"round {r + 1} {name:20s} {got['seconds']:7.2f} s  load {load:.1f}", flush=True)
    ref = statistics.median(times["torch loop niter=2"])
    print(f"\n{args.params} task vector, rank {args.rank}:")
    for name in RUNS:
        med = statistics.median(times[name])
        print(
            f"  {name:20s} median {med:7.2f} s ({med / ref:4.2f}x torch niter=2) | mean "
            f"residual {res[name]:.5f} | peak anon growth {format_bytes(peaks[name])}"
        )


if __name__ == "__main__":
    main()
