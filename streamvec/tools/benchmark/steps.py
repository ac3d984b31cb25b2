"""The steps measured (:data:`STEPS`): what each reads and writes, run as a CLI or Python call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamvec.errors import StreamvecError
from streamvec.tools.benchmark.inputs import store_files, weight_files

# The operations measured, in the order they run; help texts say what each does.
STEPS = ("diff", "diff-raw", "combine", "combine-ckpt", "svd", "merge", "stats")
STEP_HELP = {
    "diff": "task vector FT - BASE into a Zarr store (float32, lz4); reads both checkpoints",
    "diff-raw": "the same with --compression none: twice the bytes written, no encoding (the "
    "I/O-bound case next to diff's CPU-bound one)",
    "combine": "edited model BASE + 0.5 * tau, tau read back from diff's store (safetensors)",
    "combine-ckpt": "the same edited model straight from the checkpoints (tau computed on the "
    "fly, no store): streamvec combine --base BASE FT:0.5",
    "svd": "rank-16 SVD of tau from diff's store (default method, auto) into an SVD store; "
    "several passes over the store",
    "merge": "TIES merge (density 0.5) of the fine-tune onto the base by a mergekit-style "
    "recipe; sparsifying makes extra passes over the inputs",
    "stats": "task-vector analytics of the fine-tune (norms, Gram, sign agreement, top-20% "
    "overlap) from the checkpoints: stats.json only, no plots; one pass (top-k thresholds "
    "sampled per tensor)",
}
# Steps that read the store diff writes: asking for one runs diff first.
NEEDS_STORE = frozenset({"combine", "svd"})
# Steps whose command writes the engine's RunReport (--report): time per stage, start-up.
REPORTING = frozenset({"diff", "diff-raw", "combine", "combine-ckpt"})
SVD_RANK = 16
TIES_DENSITY = 0.5
OUTPUT_NAMES = {
    "diff": "tau-{}.zarr",
    "diff-raw": "tau-raw-{}.zarr",
    "combine": "edited-{}",
    "combine-ckpt": "edited-ckpt-{}",
    "svd": "svd-{}.zarr",
    "merge": "merged-{}",
    "stats": "stats-{}",
}


@dataclass(frozen=True)
class Pair:
    """One size's synthetic checkpoints and where its steps write."""

    workdir: Path
    label: str
    base: Path
    ft: Path

    def output(self, step: str) -> Path:
        return self.workdir / OUTPUT_NAMES[step].format(self.label)

    @property
    def tau(self) -> Path:
        return self.output("diff")


@dataclass(frozen=True)
class Engine:
    """Engine settings every step gets, fixed for the whole run so that runs compare."""

    memory_limit: int
    workers: int | None

    def flags(self) -> list[str]:
        flags = ["-q", "--memory-limit", str(self.memory_limit)]
        return flags + (["--workers", str(self.workers)] if self.workers else [])

    def kwargs(self) -> dict[str, Any]:
        return {"memory_limit": self.memory_limit, "workers": self.workers, "progress": False}


@dataclass(frozen=True)
class StepPlan:
    """One step, ready to run either way: as ``streamvec`` arguments or as a Python call."""

    name: str
    inputs: tuple[Path, ...]  # the files it reads; the read roofline reads exactly these
    output: Path
    cli: tuple[str, ...]  # streamvec arguments, without the engine flags
    run_here: Callable[[], Any]  # the same through the Python API; returns its report
    reports: bool  # the engine's RunReport (time per stage) is available


def _plan_diff(name: str, pair: Pair, engine: Engine) -> StepPlan:
    out = pair.output(name)
    compression = "none" if name == "diff-raw" else "lz4"

    def here() -> Any:
        from streamvec.ops.task_vector import task_vector

        tv = task_vector(pair.base, pair.ft)
        return tv.save(out, description="diff", compression=compression, **engine.kwargs())

    cli = ("diff", str(pair.base), str(pair.ft), "-o", str(out), "--compression", compression)
    return StepPlan(name, tuple(weight_files(pair.base, pair.ft)), out, cli, here, True)


def _plan_edit(name: str, pair: Pair, engine: Engine) -> StepPlan:
    # base + 0.5 * tau, tau either from diff's store (the usual pipeline: diff once, combine
    # many; the store's read path) or from the fine-tuned checkpoint (no store at all).
    out = pair.output(name)
    term = pair.tau if name == "combine" else pair.ft
    inputs = weight_files(pair.base) + (
        store_files(term) if name == "combine" else weight_files(term)
    )

    def here() -> Any:
        from streamvec.ops.combine import TermSpec, combine_terms

        model = combine_terms([TermSpec(str(term), 0.5)], base=pair.base)
        return model.save(out, description="combine", **engine.kwargs())

    cli = ("combine", "--base", str(pair.base), f"{term}:0.5", "-o", str(out))
    return StepPlan(name, tuple(inputs), out, cli, here, True)


def _plan_svd(pair: Pair, engine: Engine) -> StepPlan:
    out = pair.output("svd")

    def here() -> Any:
        from streamvec.ops.svd import RunOptions, SVDOptions, svd

        return svd(
            pair.tau, out, options=SVDOptions(rank=SVD_RANK), run=RunOptions(**engine.kwargs())
        )

    cli = ("svd", str(pair.tau), "-o", str(out), "--rank", str(SVD_RANK))
    return StepPlan("svd", tuple(store_files(pair.tau)), out, cli, here, False)


def write_ties_recipe(pair: Pair) -> Path:
    """A mergekit-style TIES recipe merging the fine-tune onto the base, in the workdir."""
    import yaml

    recipe = {
        "merge_method": "ties",
        "base_model": str(pair.base),
        "models": [{"model": str(pair.ft), "parameters": {"weight": 1.0, "density": TIES_DENSITY}}],
        "parameters": {"normalize": True},
    }
    path = pair.workdir / f"ties-{pair.label}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _plan_merge(pair: Pair, engine: Engine) -> StepPlan:
    out = pair.output("merge")
    recipe = write_ties_recipe(pair)

    def here() -> Any:
        from streamvec.ops.merge.api import merge
        from streamvec.ops.merge.method import RunSettings

        return merge(recipe, out, settings=RunSettings(**engine.kwargs()))

    cli = ("merge", str(recipe), "-o", str(out))
    return StepPlan("merge", tuple(weight_files(pair.base, pair.ft)), out, cli, here, False)


def _plan_stats(pair: Pair, engine: Engine) -> StepPlan:
    out = pair.output("stats")

    def here() -> Any:
        from streamvec.ops.stats import stats
        from streamvec.ops.stats.report import write_json

        st = stats([pair.ft], base=pair.base, **engine.kwargs())
        out.mkdir(parents=True, exist_ok=True)
        return write_json(st, out / "stats.json")

    cli = ("stats", str(pair.ft), "--base", str(pair.base), "-o", str(out), "--no-plots")
    return StepPlan("stats", tuple(weight_files(pair.base, pair.ft)), out, cli, here, False)


def plan_step(name: str, pair: Pair, engine: Engine) -> StepPlan:
    """The plan of step ``name`` (store-reading steps list the store's files: plan after diff)."""
    if name in ("diff", "diff-raw"):
        return _plan_diff(name, pair, engine)
    if name in ("combine", "combine-ckpt"):
        return _plan_edit(name, pair, engine)
    if name == "svd":
        return _plan_svd(pair, engine)
    if name == "merge":
        return _plan_merge(pair, engine)
    if name == "stats":
        return _plan_stats(pair, engine)
    raise StreamvecError(f"unknown bench step {name!r}: choose from {', '.join(STEPS)}")


def steps_to_run(steps: Sequence[str]) -> list[str]:
    """The asked steps in run order, with diff added when a step reads its store."""
    wanted = set(steps) | ({"diff"} if NEEDS_STORE & set(steps) else set())
    return [s for s in STEPS if s in wanted]


def parse_steps(text: str) -> list[str]:
    """``--steps`` as a list; unknown names are a usage error (exit 2)."""
    steps = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise StreamvecError(
            f"--steps {text!r}: unknown step(s) {', '.join(bad) or '(none given)'}; "
            f"choose from {', '.join(STEPS)}"
        )
    return [s for s in STEPS if s in steps]
