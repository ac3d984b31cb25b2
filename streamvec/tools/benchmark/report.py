"""Reporting: the text table, the results JSON with the machine's description, the plots.

Results JSON (``bench.json`` under ``--out``) holds ``machine``, ``settings``, ``results`` (one
record per (size, step) with the fields of :data:`~streamvec.tools.benchmark.records.RESULT_FIELDS`)
and ``plots`` (the PNGs that :mod:`streamvec.tools.benchmark.plots` wrote next to it).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from streamvec.tools.benchmark.records import RESULT_FIELDS, StepResult


def machine_info() -> dict[str, Any]:
    import numpy
    import psutil
    import zarr

    from streamvec.version import __version__

    vm = psutil.virtual_memory()
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": vm.total,
        "available_bytes": vm.available,
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "zarr": zarr.__version__,
        "streamvec": __version__,
    }


def _cell(value: float | None, fmt: str, width: int) -> str:
    """A table cell; ``-`` where a step has no such figure."""
    return f"{'-':>{width}}" if value is None else f"{value:{width}{fmt}}"


TABLE_LEGEND = (
    "roof s: plain sequential I/O of the same bytes here (inputs at cat's rate + output at "
    "the plain write's, fdatasync);\nx roofline = s / roof s (1.0 = this machine's I/O "
    "speed; target for diff and combine <= 1.25); start s: process start-up inside s."
)


def format_table(results: Sequence[StepResult]) -> str:
    """The results as a fixed-width text table, with a legend of its ratios."""
    head = (
        f"{'size':>6} {'step':>12} {'in GB':>6} {'out GB':>6} {'s':>6} {'start s':>7} "
        f"{'in GB/s':>8} {'out GB/s':>8} {'cat GB/s':>8} {'write GB/s':>10} {'roof s':>6} "
        f"{'x roofline':>10} {'peak anon':>10}  cache"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.size:>6} {r.step:>12} {r.input_bytes / 1e9:6.2f} {r.output_bytes / 1e9:6.2f} "
            f"{r.seconds:6.2f} {_cell(r.startup_seconds, '.2f', 7)} {r.input_gbps:8.3f} "
            f"{r.output_gbps:8.3f} {r.read_roofline_gbps:8.2f} {r.write_roofline_gbps:10.3f} "
            f"{r.roofline_seconds:6.2f} {r.ratio_to_roofline:10.2f} "
            f"{r.peak_anon_bytes / 2**20:6.0f} MiB  {r.cache}"
        )
    return "\n".join([*lines, "", TABLE_LEGEND])


def format_peers(results: Sequence[StepResult]) -> list[str]:
    """One line per (step, peer) measured side by side: the time ratio and both residuals."""
    lines = []
    for r in results:
        for name, peer in r.notes.get("peers", {}).items():
            mine, theirs = peer.get("step_mean_residual"), peer["mean_residual"]
            accuracy = (
                f"; mean residual {mine:.5f} vs {theirs:.5f}"
                if mine is not None and theirs is not None
                else ""
            )
            what = (
                f"a {name} loop (niter={peer['niter']}) over the same arrays"
                if peer.get("niter") is not None
                else f"{name} on the same checkpoints"
            )
            whole = peer.get("process_seconds")
            started = (
                f" (the loop alone, after its imports; with its process start-up, as the "
                f"step's time has streamvec's: {whole:.2f} s = {peer['process_ratio']:.2f}x)"
                if whole is not None and peer.get("niter") is not None
                else ""
            )
            lines.append(
                f"{r.size} {r.step}: {r.seconds:.2f} s vs {peer['seconds']:.2f} s for "
                f"{what} = {peer['ratio']:.2f}x its time{started}{accuracy}"
            )
    return ["", *lines] if lines else []


def bench_data(results: Sequence[StepResult], settings: dict[str, Any]) -> dict[str, Any]:
    """What bench.json holds (``plots`` is filled in once they are written)."""
    return {
        "machine": machine_info(),
        "settings": settings,
        "result_fields": list(RESULT_FIELDS),
        "results": [asdict(r) for r in results],
        "plots": [],
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


PLOTS_MISSING = "plots skipped: matplotlib is not installed (pip install 'streamvec[bench]')"


def write_plots(json_path: Path, data: Mapping[str, Any]) -> list[str]:
    """PNGs next to the JSON (names of the files written); none without matplotlib."""
    from streamvec.tools.benchmark import plots

    if not plots.available():
        # Said even under --quiet: the plots asked for are not there.
        print(PLOTS_MISSING, file=sys.stderr)
        return []
    return plots.write_plots(data, json_path.parent, prefix=json_path.stem)
