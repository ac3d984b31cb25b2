"""An analogy where ``C - A`` is necessary: a label task with its own head, across two domains.

The classic analogy (``upright 0-4 : faded 0-4 :: upright 5-9 : faded 5-9``) passes for
``tau_B`` alone, because the pre-trained model already classifies upright 5-9: the relation's
own vector carries the gain, and ``C - A`` is not tested. Here the relation is a *label task*
the pre-trained model does not have at all:

- the model has two heads, the 10-way digit head and a 2-way label head (parity: even or
  odd; ``--label high``: digit > 4); pre-training (upright digits, as in the classic
  experiment) trains the digit head only, so the label head is random;
- A = digits, upright; B = parity, upright; C = digits in a new domain (turned 90 degrees, or
  faded), never seen in pre-training; D = parity in that domain.

``tau_B`` alone brings the label head, but for upright features; ``tau_C`` alone brings the
domain, but no label head; only ``tau_C + (tau_B - tau_A)`` can bring both. Each is compared
on D's test images (no D image used by anything but the "fine-tuned on D" upper bound), with
lambda chosen on the validation images of the tasks whose vectors enter with a plus sign. Every
edit is ``streamvec diff`` / ``streamvec combine``; sweeps stream ``base + lambda * tau`` into
a module.

Run ``python -m examples.digits.relation --out DIR [--seeds 0-4]``.
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

from streamvec.engine.into_torch import sweep

from . import seeds
from .config import Config
from .data import Task, load_digits_splits
from .report import md_table, pct
from .runner import Context, fmt, new_context
from .train import DigitsMLP, TwoHeadMLP, deterministic_torch, finetune, pretrain

# Each arm: its terms (task role, weight) and the roles whose validation accuracy picks lambda.
ARMS: dict[str, tuple[tuple[tuple[str, float], ...], tuple[str, ...]]] = {
    "analogy": ((("C", 1.0), ("B", 1.0), ("A", -1.0)), ("B", "C")),
    "tau_B": ((("B", 1.0),), ("B",)),
    "tau_C": ((("C", 1.0),), ("C",)),
    "tau_B + tau_C": ((("B", 1.0), ("C", 1.0)), ("B", "C")),
}


@dataclass(frozen=True)
class RelationConfig:
    """The label task, the domains, and the shared training settings."""

    base: Config = field(default_factory=Config)
    label: str = "parity"
    domains: tuple[str, ...] = ("rot90", "faded")


def _tasks(label: str, domain: str) -> dict[str, Task]:
    return {
        "A": Task("digits-upright", "upright"),
        "B": Task(f"{label}-upright", "upright", label=label),
        "C": Task(f"digits-{domain}", domain),
        "D": Task(f"{label}-{domain}", domain, label=label),
    }


def _arm(ctx: Context, arm: str, tasks: Mapping[str, Task]) -> dict[str, Any]:
    """Sweep one arm, write the chosen model with ``streamvec combine``, score it on D."""
    terms, chosen_on = ARMS[arm]
    tau = sum(
        (w * ctx.tau(tasks[role].name) for role, w in terms[1:]),
        start=terms[0][1] * ctx.tau(tasks[terms[0][0]].name),
    )
    d = tasks["D"]
    d_curve: list[float] = []

    def metric(net: torch.nn.Module) -> float:
        d_curve.append(ctx.evaluate(net, d, "test"))  # recorded for the plot, never chosen on
        return float(np.mean([ctx.evaluate(net, tasks[r], "val") for r in chosen_on]))

    result = sweep(ctx.net, ctx.base, tau, metric, ctx.config.lambdas)
    slug = arm.replace(" ", "").replace("+", "-plus-").replace("_", "")
    net = ctx.combine(
        f"{slug}-{d.name}",
        result.best_lambda,
        *[f"{ctx.vector(tasks[role].name)}:{fmt(w)}" for role, w in terms],
    )
    return {
        "lambda": result.best_lambda,
        "d": ctx.evaluate(net, d, "test"),
        # The best any lambda could do on D's *test* images: an oracle, as a ceiling.
        "d_oracle": max(d_curve),
        "d_curve": d_curve,
    }


def run(config: RelationConfig, out: Path) -> dict[str, Any]:
    """One seed: pre-train, fine-tune A, B and each domain's C and D, compare the arms.

    Args:
        config: settings (``config.base.seed`` is the seed).
        out: output directory (models, task vectors, ``results.md``, ``commands.sh``).

    Returns:
        The results (also written to ``out/results.json``).
    """
    started = time.perf_counter()
    cfg = config.base
    data = load_digits_splits(cfg.seed)
    rows = []
    with deterministic_torch():
        pretrained = pretrain(cfg, data, TwoHeadMLP)
        ctx = new_context(cfg, out, data, pretrained, TwoHeadMLP)
        tuned: dict[str, DigitsMLP] = {}

        def tune(task: Task) -> DigitsMLP:
            if task.name not in tuned:
                tuned[task.name] = finetune(cfg, data, pretrained, task)
                ctx.add_finetune(task.name, tuned[task.name])
            return tuned[task.name]

        for domain in config.domains:
            tasks = _tasks(config.label, domain)
            for task in tasks.values():
                tune(task)
            d = tasks["D"]
            row: dict[str, Any] = {
                "domain": domain,
                "tasks": {role: t.name for role, t in tasks.items()},
                "pretrained": ctx.evaluate(pretrained, d, "test"),
                "finetuned_on_d": ctx.evaluate(tuned[d.name], d, "test"),
                # Each fine-tune on its own task: the relation and the domain were learned.
                "own": {r: ctx.evaluate(tuned[t.name], t, "test") for r, t in tasks.items()},
            }
            row["arms"] = {arm: _arm(ctx, arm, tasks) for arm in ARMS}
            rows.append(row)
    results = {
        "config": asdict(config),
        "command": f"python -m examples.digits.relation --seeds {cfg.seed}",
        "rows": rows,
        "streamvec_commands": len(ctx.streamvec.commands),
        "seconds": time.perf_counter() - started,
    }
    ctx.write(results, format_seed(results))
    return results


def format_seed(results: Mapping[str, Any]) -> str:
    """One seed's table: accuracy on D (test, %) for each arm."""
    label = results["config"]["label"]
    lines = [
        f"# Analogy with a new label task ({label}), seed {results['config']['base']['seed']}",
        "",
        "Accuracy on D (test, %; 2 classes, chance 50). A = digits upright, B = "
        f"{label} upright, C = digits in the domain, D = {label} in the domain.",
        "",
    ]
    header = ["Domain", "Pre-trained", *[f"{a} (lambda)" for a in ARMS], "Fine-tuned on D"]
    body = []
    for r in results["rows"]:
        arms = [f"{pct(r['arms'][a]['d'])} ({fmt(r['arms'][a]['lambda'])})" for a in ARMS]
        body.append([r["domain"], pct(r["pretrained"]), *arms, pct(r["finetuned_on_d"])])
    return "\n".join([*lines, *md_table(header, body), ""])


def format_summary(all_results: Sequence[Mapping[str, Any]]) -> str:
    """Per-seed table and the spread over seeds, for each domain."""
    lines = [format_seed(r) for r in all_results]
    lines += ["# Over all seeds", ""]
    domains = [r["domain"] for r in all_results[0]["rows"]]
    header = [
        "Domain",
        "Pre-trained",
        *ARMS,
        "Fine-tuned on D",
        "analogy - max(pre-trained, tau_B, tau_C)",
        "analogy - (tau_B + tau_C)",
    ]
    body = []
    for i, domain in enumerate(domains):
        rows = [r["rows"][i] for r in all_results]
        margin = [
            x["arms"]["analogy"]["d"]
            - max(x["pretrained"], x["arms"]["tau_B"]["d"], x["arms"]["tau_C"]["d"])
            for x in rows
        ]
        minus_a = [x["arms"]["analogy"]["d"] - x["arms"]["tau_B + tau_C"]["d"] for x in rows]
        body.append(
            [
                domain,
                seeds.spread([x["pretrained"] for x in rows]),
                *[seeds.spread([x["arms"][a]["d"] for x in rows]) for a in ARMS],
                seeds.spread([x["finetuned_on_d"] for x in rows]),
                seeds.spread(margin),
                seeds.spread(minus_a),
            ]
        )
    lines += md_table(header, body)
    oracle = [
        [d, seeds.spread([r["rows"][i]["arms"]["tau_B"]["d_oracle"] for r in all_results])]
        for i, d in enumerate(domains)
    ]
    lines += ["", "tau_B alone with lambda chosen on D's test images (an oracle):", ""]
    lines += md_table(["Domain", "tau_B, best lambda on D"], oracle)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m examples.digits.relation --out DIR [--seeds 0-4]``."""
    return seeds.main(
        argv,
        prog="python -m examples.digits.relation",
        description="An analogy that needs C - A: a parity head learned upright, transferred "
        "to a new domain by tau_C + (tau_B - tau_A), against tau_B and tau_C alone.",
        run=lambda seed, out: run(RelationConfig(base=Config(seed=seed)), out),
        report=format_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
