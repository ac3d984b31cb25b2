"""Running the benchmark: every size, every step, ``repeat`` runs each; then the report.

Absolute times on a shared machine are indicative only: the figures to use are the ratios
measured side by side in one run.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from streamvec.tools.benchmark.cache import PageCache
from streamvec.tools.benchmark.inputs import (
    WORKDIR_MARKER,
    claim_workdir,
    ensure_pair,
    remove_pair,
    size_label,
)
from streamvec.tools.benchmark.measure import StepRun, measured_run
from streamvec.tools.benchmark.peers import (
    PeerRun,
    missing_peers,
    peer_notes,
    peers_for,
    run_peer,
    svd_store_mean_residual,
)
from streamvec.tools.benchmark.records import StepResult, make_record
from streamvec.tools.benchmark.report import (
    bench_data,
    format_peers,
    format_table,
    write_json,
    write_plots,
)
from streamvec.tools.benchmark.steps import STEPS, SVD_RANK, Engine, Pair, plan_step, steps_to_run


def bench_size(
    workdir: Path,
    size: str,
    *,
    steps: Sequence[str] = STEPS,
    repeat: int = 1,
    memory_limit: int,
    workers: int | None = None,
    in_process: bool = False,
    cache: PageCache | None = None,
    keep_outputs: bool = False,
    peers: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> list[StepResult]:
    """Build (or reuse) the pair for ``size`` and measure each step against its rooflines.

    Records hold the medians over ``repeat`` runs and every run's figures under ``notes``;
    with ``peers``, the installed peers of a step (:mod:`~streamvec.tools.benchmark.peers`) run
    after each of its runs and their times and ratios go under ``notes["peers"]``.
    Outputs are deleted as soon as a step is measured unless ``keep_outputs`` (diff's store
    only once the steps reading it are done).
    """
    from streamvec.units import parse_param_count

    cache = cache or PageCache()
    base, ft = ensure_pair(workdir, size, log=log)
    pair = Pair(workdir, size_label(size), base, ft)
    engine = Engine(memory_limit, workers)
    mode = "in-process" if in_process else "subprocess"
    results: list[StepResult] = []
    try:
        for name in steps_to_run(steps):
            plan = plan_step(name, pair, engine)
            runs = []
            peer_runs: dict[str, list[PeerRun]] = {p: [] for p in peers_for(name) if peers}
            missing = missing_peers(name) if peers and name in steps else []
            for line in missing:
                log(f"  {line}")  # an optional peer not installed: said once, not measured
            for i in range(repeat):
                run = measured_run(plan, engine, in_process, cache)
                runs.append(run)
                log(_run_line(pair.label, name, i, repeat, run))
                for peer, done in peer_runs.items():  # interleaved with the step's runs
                    done.append(run_peer(peer, pair.tau, SVD_RANK, (pair.base, pair.ft)))
                    log(
                        f"  {pair.label} {name} run {i + 1}/{repeat}: {peer} "
                        f"{done[-1].seconds:.2f} s"
                    )
            if name in steps:
                params = parse_param_count(size)
                record = make_record(plan, size, params, runs, engine, mode, cache)
                if peer_runs:
                    residual = svd_store_mean_residual(plan.output) if name == "svd" else None
                    seconds = [r.seconds for r in runs]
                    record.notes["peers"] = peer_notes(seconds, residual, peer_runs)
                if missing:
                    record.notes["peers_missing"] = missing
                results.append(record)
            if not keep_outputs and name != "diff":
                shutil.rmtree(plan.output, ignore_errors=True)
    finally:
        if not keep_outputs:
            shutil.rmtree(pair.tau, ignore_errors=True)
    return results


def _run_line(label: str, step: str, i: int, repeat: int, run: StepRun) -> str:
    return (
        f"  {label} {step} run {i + 1}/{repeat}: {run.seconds:.2f} s "
        f"(cat {run.read_gbps:.2f} GB/s, write {run.write_gbps:.2f} GB/s, "
        f"load {run.load_average:.1f})"
    )


def run_bench(
    sizes: Sequence[str],
    *,
    workdir: Path | None = None,
    json_path: Path | None = None,
    steps: Sequence[str] = STEPS,
    repeat: int = 1,
    memory_limit: str | int | None = None,
    workers: int | None = None,
    in_process: bool = False,
    cold: bool = False,
    plots: bool = True,
    keep: bool = False,
    quiet: bool = False,
    peers: bool = True,
) -> list[StepResult]:
    """Benchmark every size; print the table; write the results JSON and the plots.

    Args:
        sizes: parameter counts such as ``["0.3B", "1B"]``.
        workdir: where checkpoints and outputs go; pairs a previous ``keep`` run left there
            are reused (default: a new temporary directory under /tmp).
        json_path: where to write the results (default ``./bench.json``); plots go next to it.
        steps: names from :data:`STEPS` (diff runs anyway when a step reads its store).
        repeat: runs per step; the table shows the median time.
        memory_limit: passed to the engine (default: what the engine would pick, fixed here
            so it is known and the same for every run).
        workers: passed to the engine (default: its own, the CPU count).
        in_process: run the steps through the Python API here instead of subprocesses.
        cold: evict the inputs from the page cache before every run and every read roofline
            (:class:`PageCache`); raises StreamvecError where no method is permitted.
        plots: write PNG plots next to the JSON (skipped, with one line, without matplotlib).
        keep: keep checkpoints and outputs for the next run; otherwise each size's multi-GB
            files are deleted as soon as it is measured, and a temporary workdir after.
        quiet: print nothing (but a missing matplotlib).
        peers: also time the installed peers of each step (``torch.svd_lowrank`` for svd,
            mergekit's task_arithmetic for combine-ckpt)
            on the same inputs, interleaved with its runs, and show the ratios.
    """
    from streamvec.memory import default_memory_limit
    from streamvec.units import parse_size

    def log(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    cache = PageCache.cold() if cold else PageCache()
    temporary = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="streamvec-bench-", dir="/tmp"))
    claim_workdir(wd)
    limit = parse_size(memory_limit) if memory_limit is not None else default_memory_limit()
    json_path = Path(json_path or "bench.json")
    results: list[StepResult] = []
    try:
        for size in sizes:
            log(f"size {size} ({cache.setting()} cache):")
            try:
                results += bench_size(
                    wd,
                    size,
                    steps=steps,
                    repeat=repeat,
                    memory_limit=limit,
                    workers=workers,
                    in_process=in_process,
                    cache=cache,
                    keep_outputs=keep,
                    peers=peers,
                    log=log,
                )
            finally:
                if not keep:
                    remove_pair(wd, size)
        settings = {
            "sizes": list(sizes),
            "steps": list(steps),
            "repeat": repeat,
            "memory_limit_bytes": limit,
            "workers": workers,
            "mode": "in-process" if in_process else "subprocess",
            "cache": cache.setting(),
            "cold_method": cache.method,
            "workdir": str(wd),
            "command": sys.argv,
        }
        data = bench_data(results, settings)
        # JSON and table first: a plotting failure loses no figure.
        write_json(json_path, data)
        log("")
        log(format_table(results))
        for line in format_peers(results):
            log(line)
        log(f"\nresults: {json_path}")
        if plots:
            data["plots"] = write_plots(json_path, data)
            write_json(json_path, data)
            log("plots: " + ", ".join(data["plots"]) if data["plots"] else "no plots")
    finally:
        if temporary and not keep:
            shutil.rmtree(wd, ignore_errors=True)
        elif not keep:
            # what the run wrote is gone; pairs an earlier --keep left carry their own markers
            (wd / WORKDIR_MARKER).unlink(missing_ok=True)
    return results
