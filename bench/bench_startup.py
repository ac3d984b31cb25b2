"""Start-up of ``combine`` from a store against the same edit from checkpoints.

Two measurements, each in fresh processes:

* the start-up of the command: wall seconds of ``streamvec combine --base BASE TERM:0.5 -o OUT
  --report R`` minus the report's ``seconds`` (what the engine's own clock did not see:
  interpreter, imports, opening the inputs), TERM the store and then the fine-tune, in
  alternating order round by round;
* where a store's part goes, in one fresh process per source: ``import streamvec``, loading
  zarr and its codecs (:func:`streamvec.io.zarr.access.load_zarr`), and ``sv.open`` +
  resolving the expression.

    PYTHONPATH=. python bench/bench_startup.py BASE FT TAU.zarr [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = """
import time
t0 = time.perf_counter()
import streamvec as sv
t1 = time.perf_counter()
from streamvec.io.zarr.access import load_zarr
load_zarr()
t2 = time.perf_counter()
sv.open({source!r}).resolved()
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def startup(base: str, term: str, workdir: Path) -> float:
    out = workdir / "out"
    report = workdir / "report.json"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "streamvec.cli", "combine", "--base", base, f"{term}:0.5"]
    clock = time.perf_counter()
    subprocess.run([*cmd, "-o", str(out), "--report", str(report), "-q"], check=True)
    wall = time.perf_counter() - clock
    shutil.rmtree(out, ignore_errors=True)
    return wall - float(json.loads(report.read_text())["seconds"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("ft")
    ap.add_argument("store")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    sources = {"store": args.store, "checkpoint": args.ft}
    seconds: dict[str, list[float]] = {k: [] for k in sources}
    phases: dict[str, list[list[float]]] = {k: [] for k in sources}
    with tempfile.TemporaryDirectory(prefix="streamvec-startup-") as tmp:
        for r in range(args.rounds):
            for kind in list(sources) if r % 2 == 0 else list(sources)[::-1]:
                seconds[kind].append(startup(args.base, sources[kind], Path(tmp)))
                code = PHASES.format(source=sources[kind])
                got = subprocess.run(
                    [sys.executable, "-c", code], check=True, capture_output=True, text=True
                ).stdout.split()
                phases[kind].append([float(x) for x in got])
    print(f"load {os.getloadavg()[0]:.1f}")
    for kind in sources:
        runs = " ".join(f"{s:.2f}" for s in seconds[kind])
        med = [statistics.median(p[i] for p in phases[kind]) for i in range(3)]
        print(
            f"{kind:10s} start-up median {statistics.median(seconds[kind]):.2f} s ({runs}); "
            f"import streamvec {med[0]:.3f} s, load_zarr {med[1]:.3f} s, open {med[2]:.3f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
