"""One measured run of a step: wall time, peak memory, the engine's report, its rooflines.

The steps run as ``streamvec`` subprocesses by default (a fresh process per step, as a user
runs it; the time includes interpreter start-up, reported apart as ``startup_seconds``) or
in-process through the Python API. Steps run by the block engine (``diff``, ``combine``,
``combine-ckpt``, ``diff-raw``) also report their time per stage (``--report``). Peak memory is
``RssAnon + RssShmem + VmSwap`` of the engine process and its children, sampled every 10 ms
(:class:`streamvec.memory.PeakSampler`): page-cache pages of the inputs are not counted,
because the kernel can drop them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamvec.tools.benchmark.cache import PageCache
from streamvec.tools.benchmark.inputs import tree_bytes
from streamvec.tools.benchmark.rooflines import read_roofline, write_roofline
from streamvec.tools.benchmark.steps import Engine, StepPlan


@dataclass
class StepRun:
    seconds: float
    peak_anon_bytes: int
    # From the engine's RunReport: seconds, stage_seconds, workers (None without one).
    report: dict[str, Any] | None = None
    # The rooflines measured right around this run (see measure_step).
    read_gbps: float = 0.0
    write_gbps: float = 0.0
    write_nosync_gbps: float = 0.0
    load_average: float = 0.0
    # Cold: the most of the inputs still cached right after this run's drops.
    resident: float | None = None


def _report_fields(report: Mapping[str, Any]) -> dict[str, Any]:
    """What the benchmark keeps of a RunReport (or of its ``--report`` JSON)."""
    return {
        "seconds": float(report["seconds"]),
        "stage_seconds": {k: float(v) for k, v in report["stage_seconds"].items()},
        "workers": int(report["workers"]),
    }


def run_subprocess(args: Sequence[str], report: Path | None = None) -> StepRun:
    """Run ``streamvec ARGS`` as a child process; wall time and peak anonymous memory.

    The peak is sampled every 10 ms from ``/proc/PID/status`` of the child and its own
    children (dask process schedulers), so it is the whole job's anonymous memory. ``report``:
    the ``--report`` file the arguments ask for, read back (and removed) after the run.
    """
    from streamvec.memory import PeakSampler

    cmd = [sys.executable, "-m", "streamvec.cli", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakSampler(proc.pid, interval=0.01) as sampler:
        out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        # The child's last stderr line is its one-line reason (the CLI's error contract).
        lines = (err or out).strip().splitlines()
        reason = lines[-1] if lines else "no output"
        raise RuntimeError(f"`streamvec {' '.join(args)}` exited {proc.returncode}: {reason}")
    fields = None
    if report is not None:
        fields = _report_fields(json.loads(report.read_text()))
        report.unlink()
    return StepRun(seconds, sampler.peak, fields)


def run_in_process(fn: Callable[[], Any], reports: bool = False) -> StepRun:
    """Run ``fn`` here; wall time and this process's peak anonymous memory while it ran.

    ``reports``: ``fn`` returns the engine's RunReport, whose figures are kept.
    """
    from streamvec.memory import PeakSampler

    start = time.perf_counter()
    with PeakSampler(interval=0.01) as sampler:
        result = fn()
    seconds = time.perf_counter() - start
    return StepRun(seconds, sampler.peak, _report_fields(vars(result)) if reports else None)


def run_step(plan: StepPlan, engine: Engine, in_process: bool) -> StepRun:
    """One run of a step, as a subprocess (with ``--report`` where it has one) or here."""
    if in_process:
        return run_in_process(plan.run_here, plan.reports)
    report = plan.output.parent / f".report-{plan.output.name}.json" if plan.reports else None
    flags = ["--report", str(report)] if report is not None else []
    return run_subprocess([*plan.cli, *engine.flags(), *flags], report)


def max_known(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _read_roofline_for(files: Sequence[Path], cache: PageCache) -> tuple[float, float | None]:
    """The read roofline as this run's cache mode sees it: (GB/s, fraction left cached)."""
    if not cache.is_cold:
        return read_roofline(files, repeat=1), None
    resident = cache.drop(files)
    return read_roofline(files, warm=False), resident


def measured_run(plan: StepPlan, engine: Engine, in_process: bool, cache: PageCache) -> StepRun:
    """One run of a step bracketed by its rooflines.

    Each run gets its own rooflines so that a change of machine load (the machine is shared)
    hits both sides of a ratio alike.
    """
    read_gbps, roof_resident = _read_roofline_for(plan.inputs, cache)
    shutil.rmtree(plan.output, ignore_errors=True)
    os.sync()  # writeback left by earlier work is not billed to this run
    run_resident = cache.drop(plan.inputs)
    load = os.getloadavg()[0]
    run = run_step(plan, engine, in_process)
    run.write_gbps, run.write_nosync_gbps = write_roofline(
        tree_bytes(plan.output), plan.output.parent
    )
    run.read_gbps, run.load_average = read_gbps, load
    run.resident = max_known([roof_resident, run_resident])
    return run
