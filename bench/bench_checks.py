"""What the "no silent wrong result" checks cost: each measured against the run without it.

Two A/B pairs, interleaved round by round on the same inputs (in-process, threads
scheduler, warm page cache):

* ``finite`` / ``no-finite``: ``combine`` (the edited model ``base + 0.5 (ft - base)``,
  bf16 safetensors) with the default NaN/inf check of every output block, and with
  ``check_finite=False`` (``--no-check-finite``);
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


def combine(base: Path, ft: Path, out: Path, **options: object) -> float:
    import streamvec as sv

    b = sv.open(base)
    model = b + 0.5 * (sv.open(ft) - b)
    policy = options.pop("int_tensors", None)
    if policy is not None:
        model = model.on_changed_nonfloat(policy)  # type: ignore[arg-type]
    return model.save(out, progress=False, **options).seconds  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    from streamvec import synth

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
    variants = {
        "finite": lambda out: combine(base, ft, out),
        "no-finite": lambda out: combine(base, ft, out, check_finite=False),
        "int-check": lambda out: combine(ibase, ift, out),
        "int-base": lambda out: combine(ibase, ift, out, int_tensors="base"),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            out = workdir / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # earlier writeback is not billed to this run
            seconds = fn(out)
            times[name].append(seconds)
            shutil.rmtree(out, ignore_errors=True)
            print(f"round {r + 1} {name:10s} {seconds:6.2f} s  load {os.getloadavg()[0]:.1f}")
    print(f"\n{'variant':10s} {'median s':>9s} {'ratio':>7s}  all")
    for a, b in (("finite", "no-finite"), ("int-check", "int-base")):
        ref = statistics.median(times[b])
        for v in (a, b):
            med = statistics.median(times[v])
            runs = " ".join(f"{t:.2f}" for t in times[v])
            print(f"{v:10s} {med:9.2f} {med / ref:6.3f}x  {runs}")
    # Paired per round: the two runs of a pair ran back to back, so their ratio is less noisy.
    for a, b in (("finite", "no-finite"), ("int-check", "int-base")):
        ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
        print(
            f"{a} / {b} per round: median {statistics.median(ratios):.3f}x  "
            + " ".join(f"{q:.3f}" for q in ratios)
        )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
