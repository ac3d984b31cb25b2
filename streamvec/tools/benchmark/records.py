"""The result record of one (size, step): the fields of :data:`RESULT_FIELDS`, from its runs."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamvec.tools.benchmark.cache import PageCache
from streamvec.tools.benchmark.inputs import tree_bytes
from streamvec.tools.benchmark.measure import StepRun, max_known
from streamvec.tools.benchmark.rooflines import roofline_seconds
from streamvec.tools.benchmark.steps import Engine, StepPlan

# What each result record holds (the test and docs/benchmarks.md rely on these names).
RESULT_FIELDS = (
    "step",  # one of STEPS
    "size",  # the size label asked for, e.g. "1B"
    "params",  # parameters of the synthetic model
    "input_bytes",  # bytes of the files the step reads, each counted once
    "output_bytes",  # bytes the step left on disk (compressed for Zarr)
    "output_logical_bytes",  # bytes of the result's arrays, uncompressed
    "seconds",  # median wall time of the step (subprocess: includes start-up)
    "seconds_all",  # every repeat's wall time
    "engine_seconds",  # the engine's own seconds from its report, median run (None: no report)
    "startup_seconds",  # subprocess: seconds - engine_seconds, median run (else None)
    "input_gbps",  # input_bytes / seconds / 1e9
    "output_gbps",  # output_bytes / seconds / 1e9
    "read_roofline_gbps",  # cat of the same input files to /dev/null (warm, or cold)
    "write_roofline_gbps",  # plain write of output_bytes + fdatasync
    "write_roofline_nosync_gbps",  # the same write, timed before fdatasync
    "ratio_input_to_read_roofline",  # input_gbps / read_roofline_gbps
    "ratio_output_to_write_roofline",  # output_gbps / write_roofline_gbps
    "roofline_seconds",  # input_bytes at the read roofline + output_bytes at the write one
    "ratio_to_roofline",  # seconds / roofline_seconds; 1.0 = the machine's I/O speed
    "stage_seconds",  # the engine's seconds per stage, median run (None: no report)
    "engine_workers",  # workers the engine used, from its report (None: no report)
    "peak_anon_bytes",  # max over repeats of the sampled peak RssAnon+RssShmem+VmSwap
    "memory_limit_bytes",  # --memory-limit given to the engine
    "workers",  # --workers given to the engine (None: its default, the CPU count)
    "mode",  # "subprocess" or "in-process"
    "cache",  # "warm", "cold (drop_caches)", "cold (fadvise)" or "not cold (...)"
    "cache_resident_fraction",  # cold: most of the inputs found cached right after a drop
)


@dataclass
class StepResult:
    step: str
    size: str
    params: int
    input_bytes: int
    output_bytes: int
    output_logical_bytes: int
    seconds: float
    seconds_all: list[float]
    engine_seconds: float | None
    startup_seconds: float | None
    input_gbps: float
    output_gbps: float
    read_roofline_gbps: float
    write_roofline_gbps: float
    write_roofline_nosync_gbps: float
    ratio_input_to_read_roofline: float
    ratio_output_to_write_roofline: float
    roofline_seconds: float
    ratio_to_roofline: float
    stage_seconds: dict[str, float] | None
    engine_workers: int | None
    peak_anon_bytes: int
    memory_limit_bytes: int
    workers: int | None
    mode: str
    cache: str
    cache_resident_fraction: float | None
    notes: dict[str, Any] = field(default_factory=dict)


def _logical_bytes(path: Path) -> int:
    """Uncompressed bytes of the arrays of a streamvec output (any Zarr store, e.g. SVD's)."""
    if not (path / "zarr.json").is_file():
        return tree_bytes(path)
    import math

    import numpy as np

    from streamvec.dtypes import OUTPUT_DTYPES

    total = 0
    for meta in path.rglob("zarr.json"):
        node = json.loads(meta.read_text())
        if node.get("node_type") == "array":
            dtype = np.dtype(OUTPUT_DTYPES.get(node["data_type"], node["data_type"]))
            total += math.prod(node["shape"]) * dtype.itemsize
    return total


def _median_run(runs: Sequence[StepRun]) -> StepRun:
    """The run whose time is the (lower) median: its report stands for the record."""
    return sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]


def make_record(
    plan: StepPlan,
    size: str,
    params: int,
    runs: list[StepRun],
    engine: Engine,
    mode: str,
    cache: PageCache,
) -> StepResult:
    input_bytes = sum(f.stat().st_size for f in plan.inputs)
    output_bytes = tree_bytes(plan.output)
    seconds = statistics.median(r.seconds for r in runs)
    in_gbps = input_bytes / seconds / 1e9
    out_gbps = output_bytes / seconds / 1e9
    read_gbps = statistics.median(r.read_gbps for r in runs)
    write_gbps = statistics.median(r.write_gbps for r in runs)
    roof = roofline_seconds(input_bytes, output_bytes, read_gbps, write_gbps)
    typical = _median_run(runs)
    report = typical.report
    engine_seconds = report["seconds"] if report else None
    startup = _startup(typical, mode)
    resident = max_known([r.resident for r in runs])
    return StepResult(
        step=plan.name,
        size=size,
        params=params,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        output_logical_bytes=_logical_bytes(plan.output),
        seconds=seconds,
        seconds_all=[round(r.seconds, 3) for r in runs],
        engine_seconds=engine_seconds,
        startup_seconds=startup,
        input_gbps=in_gbps,
        output_gbps=out_gbps,
        read_roofline_gbps=read_gbps,
        write_roofline_gbps=write_gbps,
        write_roofline_nosync_gbps=statistics.median(r.write_nosync_gbps for r in runs),
        ratio_input_to_read_roofline=in_gbps / read_gbps,
        ratio_output_to_write_roofline=out_gbps / write_gbps,
        roofline_seconds=roof,
        ratio_to_roofline=seconds / roof,
        stage_seconds=report["stage_seconds"] if report else None,
        engine_workers=report["workers"] if report else None,
        peak_anon_bytes=max(r.peak_anon_bytes for r in runs),
        memory_limit_bytes=engine.memory_limit,
        workers=engine.workers,
        mode=mode,
        cache=cache.label(resident),
        cache_resident_fraction=resident,
        notes=_notes(runs, input_bytes, output_bytes, mode),
    )


def _startup(run: StepRun, mode: str) -> float | None:
    """Subprocess wall time the engine's own clock did not see: start-up, imports, headers."""
    if mode != "subprocess" or run.report is None:
        return None
    return max(run.seconds - run.report["seconds"], 0.0)


def _notes(runs: Sequence[StepRun], input_bytes: int, output_bytes: int, mode: str) -> dict:
    """Every run's own figures, next to the medians the record shows."""

    def ratio(r: StepRun) -> float:
        roof = roofline_seconds(input_bytes, output_bytes, r.read_gbps, r.write_gbps)
        return round(r.seconds / roof, 4)

    return {
        "read_roofline_gbps_all": [round(r.read_gbps, 3) for r in runs],
        "write_roofline_gbps_all": [round(r.write_gbps, 3) for r in runs],
        "ratio_input_to_read_roofline_all": [
            round(input_bytes / r.seconds / 1e9 / r.read_gbps, 4) for r in runs
        ],
        "ratio_to_roofline_all": [ratio(r) for r in runs],
        "engine_seconds_all": [r.report["seconds"] if r.report else None for r in runs],
        "startup_seconds_all": [_startup(r, mode) for r in runs],
        "stage_seconds_all": [r.report["stage_seconds"] if r.report else None for r in runs],
        "peak_anon_bytes_all": [r.peak_anon_bytes for r in runs],
        "load_average_1min_all": [round(r.load_average, 2) for r in runs],
        "cache_resident_fraction_all": [r.resident for r in runs],
    }
