"""``streamvec bench``: the engine's throughput and memory next to the machine's own I/O.

Every figure that matters is a ratio measured side by side in one run: each run of a step is
bracketed by its rooflines, plain sequential I/O of the same bytes on the same machine.
Absolute times on a shared machine are indicative only.

One job per module:

- :mod:`~streamvec.tools.benchmark.inputs`: the synthetic checkpoint pairs, a step's files and
  bytes;
- :mod:`~streamvec.tools.benchmark.cache`: the page cache, warm or cold (drop_caches, fadvise,
  mincore);
- :mod:`~streamvec.tools.benchmark.rooflines`: the read and write rooflines;
- :mod:`~streamvec.tools.benchmark.steps`: the steps measured and how each one runs;
- :mod:`~streamvec.tools.benchmark.measure`: one measured run of a step;
- :mod:`~streamvec.tools.benchmark.records`: the result record of a (size, step), from its runs;
- :mod:`~streamvec.tools.benchmark.runner`: every size and step, then the report
  (:func:`run_bench`);
- :mod:`~streamvec.tools.benchmark.report`: the table, the results JSON, the plots;
- :mod:`~streamvec.tools.benchmark.plots`: the PNGs, drawn from the results JSON (matplotlib);
- :mod:`streamvec.cli.bench`: the ``streamvec bench`` command (its flags and ``--help``).

The names below are re-exported for the callers that import them from here. Module-level
settings read at call time (such as ``cache.DROP_CACHES``) are not: patch them where they live.
"""

from __future__ import annotations

from streamvec.tools.benchmark.cache import PageCache, resident_fraction
from streamvec.tools.benchmark.inputs import (
    ensure_pair,
    remove_pair,
    size_label,
    store_files,
    tree_bytes,
    weight_files,
)
from streamvec.tools.benchmark.measure import (
    StepRun,
    measured_run,
    run_in_process,
    run_step,
    run_subprocess,
)
from streamvec.tools.benchmark.records import RESULT_FIELDS, StepResult
from streamvec.tools.benchmark.report import (
    bench_data,
    format_table,
    machine_info,
    write_json,
    write_plots,
)
from streamvec.tools.benchmark.rooflines import read_roofline, roofline_seconds, write_roofline
from streamvec.tools.benchmark.runner import bench_size, run_bench
from streamvec.tools.benchmark.steps import (
    NEEDS_STORE,
    REPORTING,
    STEP_HELP,
    STEPS,
    Engine,
    Pair,
    StepPlan,
    parse_steps,
    plan_step,
    steps_to_run,
    write_ties_recipe,
)

__all__ = [
    "NEEDS_STORE",
    "REPORTING",
    "RESULT_FIELDS",
    "STEPS",
    "STEP_HELP",
    "Engine",
    "PageCache",
    "Pair",
    "StepPlan",
    "StepResult",
    "StepRun",
    "bench_data",
    "bench_size",
    "ensure_pair",
    "format_table",
    "machine_info",
    "measured_run",
    "parse_steps",
    "plan_step",
    "read_roofline",
    "remove_pair",
    "resident_fraction",
    "roofline_seconds",
    "run_bench",
    "run_in_process",
    "run_step",
    "run_subprocess",
    "size_label",
    "steps_to_run",
    "store_files",
    "tree_bytes",
    "weight_files",
    "write_json",
    "write_plots",
    "write_roofline",
    "write_ties_recipe",
]
