"""Same diff on the threaded scheduler and on dask.distributed LocalClusters, side by side.

Usage: python bench/bench_distributed.py [--params 0.3B] [--workdir DIR] [--keep]

Prints wall time, input GB/s and peak anonymous memory (RssAnon + RssShmem + VmSwap of the
process and all its children, sampled every 10 ms) for each scheduler, and the ratio to the
threaded run measured in the same invocation. Outputs are compared bit for bit.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streamvec.memory import PeakSampler
from streamvec.tools import synth
from streamvec.units import format_bytes


def run(cmd: list[str]) -> tuple[float, int]:
    proc = subprocess.Popen([sys.executable, "-m", "streamvec.cli", *cmd])
    with PeakSampler(proc.pid) as peak:
        t0 = time.perf_counter()
        proc.wait()
        wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"failed: {cmd}")
    return wall, peak.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="0.3B")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sv-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    base, ft = work / "base", work / "ft"
    if not base.exists():
        synth.build_checkpoint(base, params=args.params, shard_size="500MB")
    if not ft.exists():
        synth.build_finetune(base, ft, seed=1)
    nbytes = sum(p.stat().st_size for d in (base, ft) for p in d.glob("*.safetensors"))
    subprocess.run(
        ["cat", *map(str, base.glob("*.safetensors")), *map(str, ft.glob("*"))],
        stdout=subprocess.DEVNULL,
        check=True,
    )  # warm the page cache
    rows = []
    for label, sched in (("threads", "threads"), ("local:1", "local:1"), ("local:2", "local:2")):
        out = work / f"tau-{label.replace(':', '')}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        wall, peak = run(
            [
                "diff",
                str(base),
                str(ft),
                "-o",
                str(out),
                "-q",
                "--scheduler",
                sched,
                "--memory-limit",
                "2GB",
            ]
        )
        rows.append((label, wall, peak))
    ref = rows[0][1]
    print(f"{args.params} bf16 pair, {format_bytes(nbytes)} of input, memory limit 2GB")
    print(f"{'scheduler':<10} {'wall s':>7} {'GB/s in':>8} {'vs threads':>10} {'peak anon':>10}")
    for label, wall, peak in rows:
        print(
            f"{label:<10} {wall:7.1f} {nbytes / wall / 1e9:8.2f} {wall / ref:9.2f}x "
            f"{format_bytes(peak):>10}"
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
