"""Running an experiment for several seeds and quoting the spread, not one seed's figures."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def spread(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``min..max (median m)`` of ``values`` times ``scale`` (percent by default)."""
    v = np.asarray(values, dtype=np.float64) * scale
    return f"{v.min():.{digits}f}..{v.max():.{digits}f} (median {np.median(v):.{digits}f})"


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,3,7"`` -> [0, 3, 7]."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


def build() -> dict[str, str]:
    """The build the numbers came from (they are not bit-identical across CPUs and builds)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu}


def main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    run: Callable[[int, Path], dict[str, Any]],
    report: Callable[[Sequence[Mapping[str, Any]]], str],
    figures: Callable[[Sequence[Mapping[str, Any]], Path], None] | None = None,
) -> int:
    """The command line every experiment shares: ``--out DIR --seeds 0-4``.

    Each seed runs into ``DIR/seed-S``; the tables over all seeds are printed and written to
    ``DIR/summary.md`` (with ``DIR/summary.json``); ``figures`` draws into ``DIR``.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,3,7 (default 0-4)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read DIR/seed-S/results.json where a finished run left one, instead of rerunning",
    )
    args = parser.parse_args(argv)
    results = []
    for seed in parse_seeds(args.seeds):
        done = args.out / f"seed-{seed}" / "results.json"
        if args.reuse and done.exists():
            results.append(json.loads(done.read_text()))
        else:
            results.append(run(seed, args.out / f"seed-{seed}"))
    text = report(results) + f"\nBuild: {json.dumps(build())}\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    if figures is not None:
        figures(results, args.out)
    print(text)
    print(f"wrote {args.out / 'summary.md'}", file=sys.stderr)
    return 0
