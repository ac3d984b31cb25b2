"""Task arithmetic on scikit-learn's handwritten digits: the papers' behaviours, reproduced.

Ilharco et al. (*Editing Models with Task Arithmetic*, ICLR 2023) report four behaviours of
task vectors ``tau = theta_ft - theta_pre``: negating one makes a model forget its task with
little change on a control task; adding several builds a multi-task model; an analogy
``tau_C + (tau_B - tau_A)`` helps a fourth task with no data of its own; and (Damirchi et al.
2025) splitting task vectors into shared and unique components refines both. This module
checks them on data anyone can run offline: the 1,797 8x8 digit images that ship inside
scikit-learn, seen through *views* (rotations, mirror images, inverted ink).

1. A small MLP is pre-trained on upright digits plus a few (10%) images of some views, so
   that, like CLIP on its downstream tasks, it starts partly competent on them.
2. One copy is fine-tuned per task (head frozen, as in the paper); every model is saved as a
   sharded safetensors checkpoint in the Hugging Face layout.
3. Every weight-space edit is done by streamvec: task vectors with ``streamvec diff``, edited
   models with ``streamvec combine``, components with ``streamvec decompose`` (run in this
   process through :func:`streamvec.cli.main.main`, and recorded in ``OUT/commands.sh``), and
   lambda sweeps by streaming ``base + lambda * tau`` into a module with
   :func:`streamvec.engine.into_torch.sweep`. Lambda is always chosen on the validation split, then
   the chosen model is written by ``streamvec combine``, loaded back and scored on the test
   split.

Run ``python -m examples.digits.classic --out DIR [--seed S] [--quick]``; the tables are
printed and written to ``DIR/results.md`` and ``DIR/results.json`` (with a plot,
``DIR/lambda.png``, when matplotlib is installed). ``docs/tutorial-digits.md`` walks through it.
Needs torch and scikit-learn (not dependencies of streamvec itself).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import streamvec as sv
from streamvec.engine.into_torch import sweep
from streamvec.model.algebra import Model

from .config import Config
from .data import CONTROL, HIGH, LOW, Task, load_digits_splits, stable_seed
from .report import format_report, write_plot
from .runner import Context, Evaluator, Streamvec, fmt, runner_flags, save_checkpoint
from .train import DigitsMLP, deterministic_torch, finetune, pretrain


def _negate(ctx: Context, target: Task, tau: Model, control_min: float) -> dict[str, Any]:
    """Sweep ``pre - lambda * tau``: lambda minimising validation target accuracy while
    validation control accuracy stays >= control_min. Curves record both splits."""
    curve: list[dict[str, float]] = []

    def metric(net: torch.nn.Module) -> float:
        point = {
            "target_val": ctx.evaluate(net, target, "val"),
            "control_val": ctx.evaluate(net, CONTROL, "val"),
            "target_test": ctx.evaluate(net, target, "test"),
            "control_test": ctx.evaluate(net, CONTROL, "test"),
        }
        curve.append(point)
        return point["target_val"]

    def allowed(_: torch.nn.Module) -> bool:
        return curve[-1]["control_val"] >= control_min

    lambdas = ctx.config.negation_lambdas
    result = sweep(
        ctx.net, ctx.base, -1.0 * tau, metric, lambdas, maximize=False, constraint=allowed
    )
    for lam, point in zip(lambdas, curve, strict=True):
        point["lambda"] = lam
    return {"lambda": result.best_lambda, "curve": curve}


def run_negation(
    ctx: Context, pre_acc: Mapping[str, float], ft: Mapping[str, dict[str, float]]
) -> dict[str, Any]:
    """Forgetting by negation, with the paper's random-vector baseline."""
    cfg = ctx.config
    control_min = cfg.control_ratio * pre_acc["upright_val"]
    rows: list[dict[str, Any]] = []
    if cfg.random_baseline:
        zeros = {n: torch.zeros(ctx.base[n].shape) for n in ctx.base}
        save_checkpoint(zeros, ctx.model("zeros"), shard_bytes=ctx.shard_bytes)
    for name in cfg.negation_targets:
        target = Task(name, name)
        row: dict[str, Any] = {
            "target": name,
            "pretrained": {"target": pre_acc[f"{name}_test"], "control": pre_acc["upright_test"]},
            "finetuned": {"target": ft[name]["test"], "control": ft[name]["control_test"]},
        }
        sweep_result = _negate(ctx, target, ctx.tau(name), control_min)
        lam = sweep_result["lambda"]
        net = ctx.combine(f"negate-{name}", lam, f"{ctx.vector(name)}:-1")
        row["negated"] = {
            "lambda": lam,
            "target": ctx.evaluate(net, target, "test"),
            "control": ctx.evaluate(net, CONTROL, "test"),
        }
        row["curve"] = sweep_result["curve"]
        if cfg.random_baseline:
            row["random"] = _random_baseline(ctx, name, target, control_min)
        rows.append(row)
    methods = ["pretrained", "finetuned", *(["random"] if cfg.random_baseline else []), "negated"]
    summary = {
        m: {k: float(np.mean([r[m][k] for r in rows])) for k in ("target", "control")}
        for m in methods
    }
    return {"control_min_val": control_min, "rows": rows, "summary": summary}


def _random_baseline(ctx: Context, name: str, target: Task, control_min: float) -> dict[str, Any]:
    """A random direction with tau's per-tensor norms, negated and chosen the same way.

    The random vector is written as a checkpoint over an all-zero one and made a task vector
    by ``streamvec diff``, so this edit too is streamvec's.
    """
    tau = sv.open(ctx.vector(name))
    gen = torch.Generator().manual_seed(stable_seed(ctx.config.seed, f"random-{name}"))
    noise: dict[str, torch.Tensor] = {}
    for tensor in tau:
        ref = torch.from_numpy(np.asarray(tau[tensor].compute(), dtype=np.float32))
        direction = torch.randn(ref.shape, generator=gen)
        norm = float(ref.norm())
        noise[tensor] = direction * (norm / float(direction.norm())) if norm > 0 else ref * 0
    save_checkpoint(noise, ctx.model(f"random-{name}"), shard_bytes=ctx.shard_bytes)
    ctx.streamvec(
        "diff", ctx.model("zeros"), ctx.model(f"random-{name}"), "-o", ctx.vector(f"random-{name}")
    )
    random_tau = sv.open(ctx.model(f"random-{name}")) - sv.open(ctx.model("zeros"))
    result = _negate(ctx, target, random_tau, control_min)
    lam = result["lambda"]
    net = ctx.combine(f"negate-random-{name}", lam, f"{ctx.vector(f'random-{name}')}:-1")
    return {
        "lambda": lam,
        "target": ctx.evaluate(net, target, "test"),
        "control": ctx.evaluate(net, CONTROL, "test"),
    }


def _add(
    ctx: Context,
    names: Sequence[str],
    tau: Model,
    terms: Sequence[str],
    output: str,
    ft: Mapping[str, dict[str, float]],
    record_curve: bool = False,
) -> dict[str, Any]:
    """``pre + lambda * tau`` with lambda maximising mean normalised validation accuracy."""
    tasks = [Task(n, n) for n in names]
    curve: list[dict[str, float]] = []

    def metric(net: torch.nn.Module) -> float:
        val = [ctx.evaluate(net, t, "val") / ft[t.name]["val"] for t in tasks]
        if record_curve:
            curve.append({t.name: ctx.evaluate(net, t, "test") / ft[t.name]["test"] for t in tasks})
        return float(np.mean(val))

    result = sweep(ctx.net, ctx.base, tau, metric, ctx.config.lambdas)
    net = ctx.combine(output, result.best_lambda, *terms)
    accuracy = {t.name: ctx.evaluate(net, t, "test") for t in tasks}
    normalized = {n: accuracy[n] / ft[n]["test"] for n in names}
    out: dict[str, Any] = {
        "tasks": list(names),
        "lambda": result.best_lambda,
        "accuracy": accuracy,
        "normalized": normalized,
        "mean_accuracy": float(np.mean(list(accuracy.values()))),
        "mean_normalized": float(np.mean(list(normalized.values()))),
    }
    if record_curve:
        for lam, point in zip(ctx.config.lambdas, curve, strict=True):
            point["lambda"] = lam
        out["curve"] = curve
    return out


def run_addition(ctx: Context, ft: Mapping[str, dict[str, float]]) -> dict[str, Any]:
    """Every subset of 2..T task vectors added, lambda chosen per subset."""
    names = ctx.config.tasks
    subsets: list[dict[str, Any]] = []
    for k in range(2, len(names) + 1):
        for combo in itertools.combinations(names, k):
            tau = ctx.tau(combo[0])
            for n in combo[1:]:
                tau = tau + ctx.tau(n)
            subsets.append(
                _add(
                    ctx,
                    combo,
                    tau,
                    [str(ctx.vector(n)) for n in combo],
                    "add-" + "+".join(combo),
                    ft,
                    record_curve=k == len(names),
                )
            )
    by_size = []
    for k in range(2, len(names) + 1):
        of_k = [s for s in subsets if len(s["tasks"]) == k]
        normalized = [v for s in of_k for v in s["normalized"].values()]
        by_size.append(
            {
                "tasks": k,
                "subsets": len(of_k),
                "mean_accuracy": float(np.mean([s["mean_accuracy"] for s in of_k])),
                "mean_normalized": float(np.mean(normalized)),
                "min_normalized": float(np.min(normalized)),
            }
        )
    return {"subsets": subsets, "by_size": by_size, "all": subsets[-1]}


def run_analogy(ctx: Context, pretrained: DigitsMLP) -> list[dict[str, Any]]:
    """``tau_D ~ tau_C + (tau_B - tau_A)``: A/C upright, B/D in a new view, on digit halves.

    For each relation (view) and each way round (0-4 -> 5-9, and 5-9 -> 0-4 unless quick):
    A = upright first half, B = view first half, C = upright second half, D = view second
    half. No D image is used by anything but the "fine-tuned on D" upper bound.
    """
    halves = [(LOW, HIGH), (HIGH, LOW)] if ctx.config.analogy_both_ways else [(LOW, HIGH)]
    finetuned: dict[str, DigitsMLP] = {}

    def task(v: str, digits: tuple[int, ...]) -> Task:
        return Task(f"{v}-{digits[0]}-{digits[-1]}", v, digits)

    def tuned(t: Task) -> DigitsMLP:
        if t.name not in finetuned:
            finetuned[t.name] = finetune(ctx.config, ctx.data, pretrained, t)
        return finetuned[t.name]

    def vector(t: Task) -> str:
        """The task's fine-tune as a checkpoint and its task vector as a store."""
        if not ctx.vector(t.name).exists():
            path = save_checkpoint(
                tuned(t).state_dict(),
                ctx.model(f"ft-{t.name}"),
                shard_bytes=ctx.shard_bytes,
                config=_model_config(ctx.config),
            )
            ctx.streamvec("diff", ctx.pretrained_path, path, "-o", ctx.vector(t.name))
        return str(ctx.vector(t.name))

    rows = []
    for view in ctx.config.analogy_views:
        for first, second in halves:
            a, b = task("upright", first), task(view, first)
            c, d = task("upright", second), task(view, second)
            terms = (vector(c), vector(b), f"{vector(a)}:-1")
            tau = ctx.tau(c.name) + ctx.tau(b.name) - ctx.tau(a.name)
            curve: list[dict[str, float]] = []

            # No D data: lambda is chosen on the validation images of B and C, the tasks
            # whose vectors enter with a + sign. The D curve is recorded for the plot only.
            def metric(
                net: torch.nn.Module,
                b: Task = b,
                c: Task = c,
                d: Task = d,
                curve: list[dict[str, float]] = curve,
            ) -> float:
                curve.append({"d_test": ctx.evaluate(net, d, "test")})
                return (ctx.evaluate(net, b, "val") + ctx.evaluate(net, c, "val")) / 2

            result = sweep(ctx.net, ctx.base, tau, metric, ctx.config.lambdas)
            lam = result.best_lambda
            analogy = ctx.combine(f"analogy-{d.name}", lam, *terms)
            # Ablation: the relation's own vector at the same lambda, without C - A.
            b_only = ctx.combine(f"only-{b.name}", lam, vector(b))
            for lam_i, point in zip(ctx.config.lambdas, curve, strict=True):
                point["lambda"] = lam_i
            rows.append(
                {
                    "relation": view,
                    "A": a.name,
                    "B": b.name,
                    "C": c.name,
                    "D": d.name,
                    "chance": 1 / len(d.digits),
                    "pretrained": ctx.evaluate(pretrained, d, "test"),
                    "analogy": ctx.evaluate(analogy, d, "test"),
                    "lambda": lam,
                    "b_only": ctx.evaluate(b_only, d, "test"),
                    # The upper bound: the only model that sees D's images.
                    "finetuned_on_d": ctx.evaluate(tuned(d), d, "test"),
                    "curve": curve,
                }
            )
    return rows


def shared_share(shared: Model, tau: Model) -> float:
    """Fraction of ``tau``'s squared Frobenius norm (all tensors) in its shared part."""
    num = sum(float(np.sum(np.square(shared[t].compute(), dtype=np.float64))) for t in tau)
    den = sum(float(np.sum(np.square(tau[t].compute(), dtype=np.float64))) for t in tau)
    return num / den if den > 0 else 0.0


def decompose_vectors(
    ctx: Context, names: Sequence[str], output: Path, rank: int, threshold: float
) -> dict[str, Any]:
    """``streamvec decompose`` of the named task vectors; dims and shared shares."""
    ctx.streamvec(
        "decompose",
        *[ctx.vector(n) for n in names],
        "-o",
        output,
        "--rank",
        str(rank),
        "--threshold",
        fmt(threshold),
    )
    manifest = json.loads((output / "decomposition.json").read_text())
    return {
        "rank": rank,
        "threshold": threshold,
        # The head is frozen, so every task vector is zero there: whatever directions the
        # decomposition reports for it carry nothing. Only the trained matrices are listed.
        "shared_dims": {k: v for k, v in manifest["shared_dims"].items() if k.startswith("fc")},
        "shared_share": {
            n: shared_share(sv.open(output / f"{n}.shared.zarr"), sv.open(ctx.vector(n)))
            for n in names
        },
    }


def run_decomposition(
    ctx: Context,
    pretrained: DigitsMLP,
    ft: Mapping[str, dict[str, float]],
    addition: Mapping[str, Any],
    negation: Mapping[str, Any],
) -> dict[str, Any]:
    """Damirchi et al.'s two uses of ``streamvec decompose``.

    1. Multi-task merging: the shared components of all task vectors added as extra task
       vectors, ``pre + lambda (sum tau_i + sum shared_i)``, against the plain sum; once with
       streamvec's defaults and once with a looser setting (``loose_rank``/``threshold``).
    2. Forgetting: each negation target's vector decomposed with the vector of a fine-tune on
       the control task (upright digits), the analogue of the paper's general-knowledge
       vectors; negating only the target's unique part, under the same control constraint.
    """
    cfg = ctx.config
    names = cfg.tasks
    out = ctx.out / "parts"
    merges = []
    for label, rank, threshold in (
        ("default", cfg.decompose_rank, cfg.decompose_threshold),
        ("loose", cfg.loose_rank, cfg.loose_threshold),
    ):
        parts = out / f"all-{label}"
        found = decompose_vectors(ctx, names, parts, rank, threshold)
        shared = [parts / f"{n}.shared.zarr" for n in names]
        total = ctx.tau(names[0])
        for n in names[1:]:
            total = total + ctx.tau(n)
        for path in shared:
            total = total + sv.open(path)
        terms = [str(ctx.vector(n)) for n in names] + [str(p) for p in shared]
        found["with_shared"] = _add(ctx, names, total, terms, f"add-all+shared-{label}", ft)
        found["label"] = label
        merges.append(found)

    control = finetune(cfg, ctx.data, pretrained, CONTROL)
    path = save_checkpoint(
        control.state_dict(),
        ctx.model("ft-upright"),
        shard_bytes=ctx.shard_bytes,
        config=_model_config(cfg),
    )
    ctx.streamvec("diff", ctx.pretrained_path, path, "-o", ctx.vector("upright"))
    control_min = negation["control_min_val"]
    unique_rows = []
    for row in negation["rows"]:
        name = row["target"]
        parts = out / f"{name}-vs-upright"
        found = decompose_vectors(
            ctx, [name, "upright"], parts, cfg.decompose_rank, cfg.decompose_threshold
        )
        unique = parts / f"{name}.unique.zarr"
        result = _negate(ctx, Task(name, name), sv.open(unique), control_min)
        net = ctx.combine(f"negate-unique-{name}", result["lambda"], f"{unique}:-1")
        unique_rows.append(
            {
                "target": name,
                "shared_dims": found["shared_dims"],
                "shared_share": found["shared_share"][name],
                "full": row["negated"],
                "unique": {
                    "lambda": result["lambda"],
                    "target": ctx.evaluate(net, Task(name, name), "test"),
                    "control": ctx.evaluate(net, CONTROL, "test"),
                },
                "curve": result["curve"],
            }
        )
    return {"merge": merges, "tasks_only": addition["all"], "negation": unique_rows}


def _model_config(config: Config) -> dict[str, Any]:
    return {"model_type": "streamvec-digits-mlp", "input_size": 64, "hidden_size": config.hidden}


def run_experiment(config: Config, out: Path) -> dict[str, Any]:
    """Run every stage; write ``results.json``, ``results.md``, ``commands.sh`` (+ plot).

    Args:
        config: what to run (:meth:`Config.preset` gives the full and quick runs).
        out: output directory; models, task vectors and components go under it too.

    Returns:
        The results (what ``results.json`` holds).
    """
    from streamvec.units import parse_size

    started = time.perf_counter()
    out = out.resolve()
    for sub in ("models", "vectors", "parts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    data = load_digits_splits(config.seed)
    shard_bytes = parse_size(config.shard_size)
    runner = Streamvec(out, runner_flags(config))
    seconds: dict[str, float] = {}
    with deterministic_torch():
        t0 = time.perf_counter()
        pretrained = pretrain(config, data)
        pre_path = save_checkpoint(
            pretrained.state_dict(),
            out / "models" / "pretrained",
            shard_bytes=shard_bytes,
            config=_model_config(config),
        )
        ctx = Context(
            config=config,
            out=out,
            data=data,
            evaluate=Evaluator(data),
            streamvec=runner,
            net=DigitsMLP(config.hidden),
            pretrained_path=pre_path,
            base=sv.open(pre_path),
            shard_bytes=shard_bytes,
        )
        views = sorted({*config.tasks, *config.analogy_views, "upright"})
        pre_acc = {
            f"{v}_{s}": ctx.evaluate(pretrained, Task(v, v), s)
            for v in views
            for s in ("val", "test")
        }
        ft: dict[str, dict[str, float]] = {}
        for name in config.tasks:
            task = Task(name, name)
            net = finetune(config, data, pretrained, task)
            path = save_checkpoint(
                net.state_dict(),
                ctx.model(f"ft-{name}"),
                shard_bytes=shard_bytes,
                config=_model_config(config),
            )
            runner("diff", pre_path, path, "-o", ctx.vector(name))
            ft[name] = {
                "val": ctx.evaluate(net, task, "val"),
                "test": ctx.evaluate(net, task, "test"),
                "control_test": ctx.evaluate(net, CONTROL, "test"),
            }
        seconds["train"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        negation = run_negation(ctx, pre_acc, ft)
        seconds["negation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        addition = run_addition(ctx, ft)
        seconds["addition"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        analogy = run_analogy(ctx, pretrained)
        seconds["analogy"] = time.perf_counter() - t0
        decomposition: dict[str, Any] | None = None
        if config.decompose:
            t0 = time.perf_counter()
            decomposition = run_decomposition(ctx, pretrained, ft, addition, negation)
            seconds["decomposition"] = time.perf_counter() - t0
    seconds["streamvec_commands"] = runner.seconds
    seconds["total"] = time.perf_counter() - started
    results: dict[str, Any] = {
        "config": asdict(config),
        "command": _command_line(config),
        "data": {k: len(v) for k, v in data.splits.items()},
        "pretrained": pre_acc,
        "finetuned": ft,
        "negation": negation,
        "addition": addition,
        "analogy": analogy,
        "decomposition": decomposition,
        "streamvec_commands": len(runner.commands),
        "seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(format_report(results))
    script = [
        "#!/bin/sh",
        "# The streamvec commands the experiment ran, in order (paths relative to this file).",
        "set -e",
        'cd "$(dirname "$0")"',
        *runner.commands,
    ]
    (out / "commands.sh").write_text("\n".join(script) + "\n")
    results["plot"] = write_plot(results, out / "lambda.png")
    return results


def _command_line(config: Config) -> str:
    quick = " --quick" if config.quick else ""
    return f"python -m examples.digits.classic --seed {config.seed}{quick}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m examples.digits.classic [--out DIR] [--seed S] [--quick]``."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.digits.classic",
        description="Reproduce the task-arithmetic papers' behaviours (negation, addition, "
        "analogy, shared/unique decomposition) on scikit-learn's digits, every edit done by "
        "streamvec. Prints the tables; writes results.md, results.json, commands.sh and "
        "lambda.png (with matplotlib) to --out, with the checkpoints and task vectors.",
    )
    parser.add_argument("--out", type=Path, default=Path("digits-results"), help="output dir")
    parser.add_argument("--seed", type=int, default=0, help="data split, init and shuffles")
    parser.add_argument(
        "--quick", action="store_true", help="3 tasks, one analogy, no baselines (~20 s)"
    )
    args = parser.parse_args(argv)
    results = run_experiment(Config.preset(seed=args.seed, quick=args.quick), args.out)
    print(format_report(results))
    where = args.out / "results.md"
    plot = f" and {results['plot']}" if results["plot"] else " (no plot: matplotlib missing)"
    print(f"wrote {where}, {args.out / 'results.json'}{plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
