"""``--device cuda`` against the CPU: combine, diff and svd on the same synthetic pair.

Runs each operation in-process twice, on the CPU (numpy) and on the device, interleaved
round by round, and prints seconds, GB/s of input, the device/CPU speed ratio and, for the
engine steps, the seconds per stage (read, compute, encode, write, checksum; summed over
workers). Outputs are checked equal: bit for bit for combine and diff, singular values to
1e-6 relative for svd. Results also go to a JSON file.

    PYTHONPATH=. python bench/bench_gpu.py [--params 1B] [--rank 64] [--repeat 3]
        [--device cuda] [--workdir DIR] [--json bench/results/bench_gpu.json]

``--device torch-cpu`` runs the device code through torch on the CPU (a dry run of this
script on a machine without a GPU; its times say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamvec.compute.devices import check_device
from streamvec.tools.benchmark import ensure_pair, weight_files


def combine_step(base: Path, ft: Path, out: Path, device: str) -> dict[str, Any]:
    import streamvec as sv

    model = sv.open(base) + 0.5 * (sv.open(ft) - sv.open(base))
    report = model.save(out, progress=False, device=device)
    return {"seconds": report.seconds, "stages": report.stage_seconds}


def diff_step(base: Path, ft: Path, out: Path, device: str) -> dict[str, Any]:
    from streamvec.ops.task_vector import task_vector

    report = task_vector(base, ft).save(out, progress=False, device=device)
    return {"seconds": report.seconds, "stages": report.stage_seconds}


def svd_step(rank: int) -> Callable[[Path, Path, Path, str], dict[str, Any]]:
    def run(base: Path, ft: Path, out: Path, device: str) -> dict[str, Any]:
        from streamvec.ops.svd import RunOptions, SVDOptions, svd

        started = time.perf_counter()
        svd(
            ft,
            out,
            base=base,
            options=SVDOptions(rank=rank, method="randomized"),
            run=RunOptions(progress=False, device=device),
        )
        return {"seconds": time.perf_counter() - started, "stages": None}

    return run


def same_result(step: str, a: Path, b: Path) -> bool:
    """Device and CPU outputs agree (bit for bit, or S to 1e-6 for svd)."""
    if step == "svd":
        from streamvec.io.zarr.lowrank import LowRankReader, read_svd_store

        sa, sb = read_svd_store(a), read_svd_store(b)
        for name, e in sa.entries.items():
            if e.factored:
                f = sb.entries[name]
                s0 = LowRankReader(str(a), e.path, e.shape, e.rank).factors(0, 1)[1]
                s1 = LowRankReader(str(b), f.path, f.shape, f.rank).factors(0, 1)[1]
                if not np.allclose(s0, s1, rtol=1e-6):
                    return False
        return True
    files_a = sorted(p for p in a.rglob("*") if p.is_file() and "zarr.json" not in p.name)
    files_b = sorted(p for p in b.rglob("*") if p.is_file() and "zarr.json" not in p.name)
    if [p.relative_to(a) for p in files_a] != [p.relative_to(b) for p in files_b]:
        return False
    # Weights and chunk files (no suffix); metadata files record paths.
    return all(
        x.read_bytes() == y.read_bytes()
        for x, y in zip(files_a, files_b, strict=True)
        if x.suffix in (".safetensors", "")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="1B")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", default="combine,diff,svd")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path, default=Path("bench/results/bench_gpu.json"))
    args = ap.parse_args(argv)
    device = check_device(args.device)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="streamvec-gpu-", dir="/tmp"))
    base, ft = ensure_pair(workdir, args.params, log=print)
    input_bytes = sum(f.stat().st_size for f in weight_files(base, ft))
    steps: dict[str, Callable[[Path, Path, Path, str], dict[str, Any]]] = {
        "combine": combine_step,
        "diff": diff_step,
        "svd": svd_step(args.rank),
    }
    chosen = [s.strip() for s in args.steps.split(",") if s.strip()]
    results: dict[str, Any] = {}
    for step in chosen:
        runs: dict[str, list[dict[str, Any]]] = {"cpu": [], device: []}
        for _ in range(args.repeat):
            for dev in runs:  # interleaved: load changes hit both sides alike
                out = workdir / f"{step}-{dev}"
                shutil.rmtree(out, ignore_errors=True)
                runs[dev].append(steps[step](base, ft, out, dev))
        agree = same_result(step, workdir / f"{step}-cpu", workdir / f"{step}-{device}")
        results[step] = {
            dev: {
                "seconds": statistics.median(r["seconds"] for r in rs),
                "seconds_all": [round(r["seconds"], 3) for r in rs],
                "stages": rs[len(rs) // 2]["stages"],
            }
            for dev, rs in runs.items()
        }
        results[step]["same_result"] = agree
        cpu_s, dev_s = results[step]["cpu"]["seconds"], results[step][device]["seconds"]
        print(
            f"{step:8s} cpu {cpu_s:7.2f} s ({input_bytes / cpu_s / 1e9:5.2f} GB/s)  "
            f"{device} {dev_s:7.2f} s ({input_bytes / dev_s / 1e9:5.2f} GB/s)  "
            f"cpu/{device} {cpu_s / dev_s:5.2f}x  same result: {agree}"
        )
        for dev in runs:
            stages = results[step][dev]["stages"]
            if stages:
                split = ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
                print(f"         {dev} stages (s): {split}")
    import torch

    info = {
        "params": args.params,
        "input_bytes": input_bytes,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=1) + "\n")
    print(f"results: {args.json}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
