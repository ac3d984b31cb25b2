"""Planted shared structure: does ``streamvec decompose`` find it, and does adding it help?

The classic experiment's views share no directions (0 shared dimensions at every seed), so it
cannot tell whether the decomposition works. Here a common component is planted: every task
of the *planted* set sees its view **and** faded ink (grey ink on grey paper, ``0.35 + 0.4 x``,
which no pre-training image has), while the *control* set has the same views without it.

1. ``streamvec decompose`` (defaults: rank 16, threshold 0.85) of each set: the shared
   dimensions per matrix and the share of each task vector's norm they hold; shared
   directions should appear in the planted set and not in the control.
2. Multi-task merging (Damirchi et al.): ``pre + lambda (sum tau_i + sum shared_i)`` against
   the plain sum ``pre + lambda sum tau_i``, lambda (0..1) maximising mean normalised
   validation accuracy over the set's tasks; scored on every task, and on a held-out view with
   the same common component (upright digits, faded), which no task vector saw.

Run ``python -m examples.digits.planted --out DIR [--seeds 0-4]``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import streamvec as sv
from streamvec.engine.into_torch import sweep
from streamvec.model.algebra import Model

from . import seeds
from .classic import decompose_vectors
from .config import Config
from .data import Task, load_digits_splits
from .report import md_table, pct
from .runner import Context, fmt, new_context
from .train import DigitsMLP, deterministic_torch, finetune, pretrain


@dataclass(frozen=True)
class PlantedConfig:
    """The views of both sets, the common component and the held-out view."""

    base: Config = field(default_factory=Config)
    views: tuple[str, ...] = ("mirror", "flipud", "rot180", "rot270")
    # A view composed after each task's own (e.g. "faded"), or "shift": every label moved to
    # the next digit, which the frozen head can only follow through the trunk.
    common: str = "faded"
    held_out: str = "upright"
    probe_thresholds: tuple[float, ...] = (0.8, 0.7)


def _task(name: str) -> Task:
    """``view+view...``; a trailing ``+shift`` is the label corruption, not a view."""
    view, plus, last = name.rpartition("+")
    if plus and last == "shift":
        return Task(name, view, label="shift")
    return Task(name, name)


def _merge(
    ctx: Context,
    names: Sequence[str],
    tau: Model,
    terms: Sequence[str],
    output: str,
    ft_val: Mapping[str, float],
    extra: Sequence[Task],
) -> dict[str, Any]:
    """Sweep ``pre + lambda tau`` (mean normalised val accuracy), write it, score tasks+extra."""
    tasks = [_task(n) for n in names]

    def metric(net: torch.nn.Module) -> float:
        return float(np.mean([ctx.evaluate(net, t, "val") / ft_val[t.name] for t in tasks]))

    result = sweep(ctx.net, ctx.base, tau, metric, ctx.config.lambdas)
    net = ctx.combine(output, result.best_lambda, *terms)
    return {
        "lambda": result.best_lambda,
        "test": {t.name: ctx.evaluate(net, t, "test") for t in [*tasks, *extra]},
    }


def run(config: PlantedConfig, out: Path) -> dict[str, Any]:
    """One seed: fine-tune both sets, decompose each, merge with and without shared parts.

    Args:
        config: settings (``config.base.seed`` is the seed).
        out: output directory (models, task vectors, components, ``results.md``).

    Returns:
        The results (also written to ``out/results.json``).
    """
    started = time.perf_counter()
    cfg = config.base
    data = load_digits_splits(cfg.seed)
    common = config.common
    sets = {
        "planted": [f"{v}+{common}" for v in config.views],
        "control": list(config.views),
    }
    held_out = _task(f"{config.held_out}+{common}")
    with deterministic_torch():
        pretrained = pretrain(cfg, data)
        ctx = new_context(cfg, out, data, pretrained, DigitsMLP)
        ft: dict[str, dict[str, float]] = {}
        for name in [*sets["planted"], *sets["control"], held_out.name]:
            task = _task(name)
            net = finetune(cfg, data, pretrained, task)
            ctx.add_finetune(name, net)
            ft[name] = {s: ctx.evaluate(net, task, s) for s in ("val", "test")}
        pre = {
            name: ctx.evaluate(pretrained, _task(name), "test")
            for name in [*sets["planted"], *sets["control"], held_out.name]
        }
        found: dict[str, Any] = {}
        for label, names in sets.items():
            parts = ctx.out / "parts" / label
            dec = decompose_vectors(ctx, names, parts, cfg.decompose_rank, cfg.decompose_threshold)
            # Fewer directions pass a looser overlap threshold: how far each set is from it.
            dec["dims_at"] = {
                fmt(th): decompose_vectors(
                    ctx, names, parts.with_name(f"{label}-{th}"), cfg.decompose_rank, th
                )["shared_dims"]
                for th in config.probe_thresholds
            }
            ft_val = {n: ft[n]["val"] for n in names}
            extra = [held_out] if label == "planted" else []
            plain = sum((ctx.tau(n) for n in names[1:]), start=ctx.tau(names[0]))
            shared = [parts / f"{n}.shared.zarr" for n in names]
            with_shared = sum((sv.open(p) for p in shared), start=plain)
            vectors = [str(ctx.vector(n)) for n in names]
            dec["plain"] = _merge(ctx, names, plain, vectors, f"add-{label}", ft_val, extra)
            dec["with_shared"] = _merge(
                ctx,
                names,
                with_shared,
                [*vectors, *(str(p) for p in shared)],
                f"add-{label}+shared",
                ft_val,
                extra,
            )
            dec["tasks"] = names
            found[label] = dec
    results = {
        "config": asdict(config),
        "command": f"python -m examples.digits.planted --seeds {cfg.seed}",
        "held_out": held_out.name,
        "pretrained": pre,
        "finetuned": ft,
        "sets": found,
        "streamvec_commands": len(ctx.streamvec.commands),
        "seconds": time.perf_counter() - started,
    }
    ctx.write(results, format_seed(results))
    return results


def _normalised(results: Mapping[str, Any], label: str, arm: str) -> float:
    s = results["sets"][label]
    return float(np.mean([s[arm]["test"][n] / results["finetuned"][n]["test"] for n in s["tasks"]]))


def format_seed(results: Mapping[str, Any]) -> str:
    """One seed: shared dimensions, and the merges task by task (test accuracy, %)."""
    seed = results["config"]["base"]["seed"]
    lines = [f"# Planted shared structure, seed {seed}", ""]
    body = []
    for label, s in results["sets"].items():
        dims = ", ".join(f"{k} {v}" for k, v in s["shared_dims"].items())
        share = np.mean(list(s["shared_share"].values()))
        body.append([label, dims, pct(share)])
    lines += md_table(["Set", "Shared dims", "Shared % of norm^2 (mean)"], body)
    for label, s in results["sets"].items():
        names = list(s["plain"]["test"])
        lines += [
            "",
            f"{label}: plain sum (lambda {fmt(s['plain']['lambda'])}) vs + shared "
            f"(lambda {fmt(s['with_shared']['lambda'])})",
            "",
        ]
        rows = [
            [
                n,
                pct(results["pretrained"][n]),
                pct(results["finetuned"][n]["test"]),
                pct(s["plain"]["test"][n]),
                pct(s["with_shared"]["test"][n]),
            ]
            for n in names
        ]
        lines += md_table(["Task", "Pre-trained", "Fine-tuned", "Sum", "Sum + shared"], rows)
    return "\n".join(lines) + "\n"


def format_summary(all_results: Sequence[Mapping[str, Any]]) -> str:
    """Per-seed tables and the spread over seeds."""
    lines = [format_seed(r) for r in all_results]
    lines += ["# Over all seeds", ""]
    first = all_results[0]
    held = first["held_out"]
    body = []
    for label in first["sets"]:
        tensors = list(first["sets"][label]["shared_dims"])
        dims = "; ".join(
            f"{t} {min(r['sets'][label]['shared_dims'][t] for r in all_results)}.."
            f"{max(r['sets'][label]['shared_dims'][t] for r in all_results)}"
            for t in tensors
        )
        share = [np.mean(list(r["sets"][label]["shared_share"].values())) for r in all_results]
        plain = [_normalised(r, label, "plain") for r in all_results]
        shared = [_normalised(r, label, "with_shared") for r in all_results]
        gain = [b - a for a, b in zip(plain, shared, strict=True)]
        worst = [
            min(
                r["sets"][label]["with_shared"]["test"][n] - r["sets"][label]["plain"]["test"][n]
                for n in r["sets"][label]["tasks"]
            )
            for r in all_results
        ]
        row = [label, dims, seeds.spread(share), seeds.spread(plain), seeds.spread(shared)]
        row += [seeds.spread(gain), seeds.spread(worst)]
        if label == "planted":
            h_pre = [r["pretrained"][held] for r in all_results]
            h_plain = [r["sets"][label]["plain"]["test"][held] for r in all_results]
            h_shared = [r["sets"][label]["with_shared"]["test"][held] for r in all_results]
            h_ft = [r["finetuned"][held]["test"] for r in all_results]
            row += [
                f"{seeds.spread(h_pre)} / {seeds.spread(h_plain)} / {seeds.spread(h_shared)} "
                f"/ {seeds.spread(h_ft)}"
            ]
        else:
            row += ["-"]
        body.append(row)
    probe = [
        [
            label,
            th,
            "; ".join(
                f"{t} {min(r['sets'][label]['dims_at'][th][t] for r in all_results)}.."
                f"{max(r['sets'][label]['dims_at'][th][t] for r in all_results)}"
                for t in first["sets"][label]["shared_dims"]
            ),
        ]
        for label in first["sets"]
        for th in first["sets"][label]["dims_at"]
    ]
    header = [
        "Set",
        "Shared dims (min..max)",
        "Shared % of norm^2",
        "Sum: mean normalised",
        "Sum + shared: mean normalised",
        "Gain (points)",
        "Worst task change (points)",
        f"Held-out {held}: pre-trained / sum / sum + shared / fine-tuned",
    ]
    lines += md_table(header, body)
    lines += ["", "Shared dims at looser thresholds (min..max over seeds):", ""]
    lines += md_table(["Set", "Threshold", "Shared dims"], probe)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m examples.digits.planted --out DIR [--seeds 0-4]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    common = "faded"
    if "--common" in args:  # the one option of this experiment beyond seeds.main's
        i = args.index("--common")
        common = args[i + 1]
        del args[i : i + 2]
    return seeds.main(
        args,
        prog="python -m examples.digits.planted [--common faded|shift]",
        description="Tasks sharing a planted component (faded ink) and a control set without "
        "it: streamvec decompose's shared directions, and merging with the shared parts added.",
        run=lambda seed, out: run(PlantedConfig(base=Config(seed=seed), common=common), out),
        report=format_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
