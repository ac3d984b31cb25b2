"""What the "no silent wrong result" checks cost: each measured against the run without it.

Two A/B pairs, interleaved round by round on the same inputs (in-process, threads
scheduler, warm page cache):

* ``finite`` / ``no-finite``: ``combine`` (the edited model ``base + 0.5 (ft - base)``,
  bf16 safetensors) with the default NaN/inf check of every output block, and with
  ``check_finite=False`` (``--no-check-finite``);
* ``check_share``: the CPU time of the check against the CPU time of reading and combining
  the same blocks (thread CPU time, so other load on the machine does not count);
* ``int-check`` / ``int-base``: the same ``combine`` on checkpoints that also hold an int8
  tensor of ``--int-mb`` MB (equal in both), with the default check that the fine-tune did
  not change it (a read of both) and with ``--int-tensors base`` (the base's copied unread
  in the fine-tune).

    PYTHONPATH=. python bench/bench_checks.py [--params 0.5B] [--rounds 5] [--int-mb 256]
        [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np

KINDS = ("wall", "cpu")
PAIRS = (("finite", "no-finite"), ("int-check", "int-base"))


def add_int_tensor(checkpoint: Path, megabytes: int) -> None:
    """Add an int8 tensor (the same in every checkpoint) as one more shard of ``checkpoint``."""
    import json

    import safetensors.numpy

    rows = megabytes * 1024
    data = np.random.default_rng(0).integers(-127, 128, (rows, 1024), dtype=np.int8)
    safetensors.numpy.save_file({"extra.int8_table": data}, str(checkpoint / "extra.safetensors"))
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["extra.int8_table"] = "extra.safetensors"
    index_path.write_text(json.dumps(index))


def combine(base: Path, ft: Path, out: Path, **options: object) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads of this process) of one ``combine``."""
    import resource

    import streamvec as sv

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    started = cpu()
    b = sv.open(base)
    model = b + 0.5 * (sv.open(ft) - b)
    policy = options.pop("int_tensors", None)
    if policy is not None:
        model = model.on_changed_nonfloat(policy)  # type: ignore[arg-type]
    wall = model.save(out, progress=False, **options).seconds  # type: ignore[arg-type]
    return wall, cpu() - started


def check_share(base: Path, ft: Path) -> tuple[float, float, float]:
    """CPU seconds (this thread) of the block kernel and of the finite check, over every
    block of ``base + 0.5 (ft - base)``, each block's check timed right after its kernel.

    Thread CPU time rather than wall time: the machine is shared, and what is asked is the
    work the check adds. Returns (read + kernel seconds, check seconds, bytes of output).
    """
    import time

    import streamvec as sv
    from streamvec.compute.finite import nonfinite_rows
    from streamvec.io.blocks import matrix_shape
    from streamvec.model.tensor import row_ranges, rows_per_block

    b = sv.open(base)
    model = b + 0.5 * (sv.open(ft) - b)
    work = check = 0.0
    nbytes = 0
    for t in model.resolved().tensors.values():
        rows, _ = matrix_shape(t.shape)
        for r0, r1 in row_ranges(rows, rows_per_block(t.shape)):
            t0 = time.thread_time()
            block = t.read_rows(r0, r1)
            t1 = time.thread_time()
            nonfinite_rows(block)
            t2 = time.thread_time()
            work += t1 - t0
            check += t2 - t1
            nbytes += block.nbytes
    return work, check, nbytes


def int_share(base: Path, ft: Path) -> tuple[float, float, int]:
    """CPU seconds of reading the int8 table as copied from the base (``--int-tensors base``)
    and as checked against the fine-tune (the default), block by block as the engine does."""
    import time

    import streamvec as sv
    from streamvec.io.blocks import matrix_shape
    from streamvec.model.tensor import row_ranges, rows_per_block

    b = sv.open(base)
    name = "extra.int8_table"
    checked = (b + 0.5 * (sv.open(ft) - b)).resolved().tensors[name]
    copied = checked.terms[0][1].base  # type: ignore[attr-defined]
    rows, _ = matrix_shape(checked.shape)
    plain = check = 0.0
    for r0, r1 in row_ranges(rows, rows_per_block(checked.shape)):
        t0 = time.thread_time()
        np.array(copied.read(r0, r1))
        t1 = time.thread_time()
        np.array(checked.terms[0][1].read(r0, r1))
        t2 = time.thread_time()
        plain += t1 - t0
        check += t2 - t1
    return plain, check, checked.nbytes


def main(argv: list[str] | None = None) -> int:
    from streamvec.tools import synth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="0.5B")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--int-mb", type=int, default=256)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="streamvec-checks-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    base, ft = workdir / "base", workdir / "ft"
    if not base.exists():
        synth.build_checkpoint(base, params=args.params, seed=0)
        synth.build_finetune(base, ft, seed=1)
    ibase, ift = workdir / "ibase", workdir / "ift"
    if not ibase.exists():
        shutil.copytree(base, ibase)
        shutil.copytree(ft, ift)
        add_int_tensor(ibase, args.int_mb)
        add_int_tensor(ift, args.int_mb)
    for i in range(3):
        work, check, nbytes = check_share(base, ft)
        print(
            f"pass {i + 1}: read+kernel {work:.2f} s CPU, finite check {check:.3f} s CPU "
            f"({100 * check / work:.1f}% of read+kernel; {nbytes / check / 1e9:.1f} GB/s)"
        )
    for i in range(3):
        plain, check, nbytes = int_share(ibase, ift)
        print(
            f"pass {i + 1}: int8 table {nbytes / 1e6:.0f} MB copied {plain:.3f} s CPU, "
            f"checked against the fine-tune {check:.3f} s CPU ({check / plain:.2f}x)"
        )
    if args.rounds == 0:
        return 0
    variants = {
        "finite": lambda out: combine(base, ft, out),
        "no-finite": lambda out: combine(base, ft, out, check_finite=False),
        "int-check": lambda out: combine(ibase, ift, out),
        "int-base": lambda out: combine(ibase, ift, out, int_tensors="base"),
    }
    times: dict[tuple[str, str], list[float]] = {(v, k): [] for v in variants for k in KINDS}
    for r in range(args.rounds):
        for name, fn in variants.items():
            out = workdir / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # earlier writeback is not billed to this run
            wall, cpu = fn(out)
            times[(name, "wall")].append(wall)
            times[(name, "cpu")].append(cpu)
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            print(f"round {r + 1} {name:10s} {wall:6.2f} s wall {cpu:6.2f} s CPU  load {load:.1f}")
    for kind in KINDS:
        print(f"\n{kind}: {'variant':10s} {'median s':>9s} {'ratio':>7s}  all")
        for a, b in PAIRS:
            ref = statistics.median(times[(b, kind)])
            for v in (a, b):
                med = statistics.median(times[(v, kind)])
                runs = " ".join(f"{t:.2f}" for t in times[(v, kind)])
                print(f"{kind}: {v:10s} {med:9.2f} {med / ref:6.3f}x  {runs}")
        # Paired per round: the two runs of a pair ran back to back, so less noise.
        for a, b in PAIRS:
            ratios = [x / y for x, y in zip(times[(a, kind)], times[(b, kind)], strict=True)]
            print(
                f"{kind}: {a} / {b} per round: median {statistics.median(ratios):.3f}x  "
                + " ".join(f"{q:.3f}" for q in ratios)
            )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
