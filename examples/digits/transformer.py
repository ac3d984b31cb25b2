"""Attention-only fine-tuning on a small vision transformer (Jin et al.; Ortiz-Jimenez et al.).

Jin et al. report that fine-tuning only the attention modules' linear layers makes task vectors
more disentangled; Ortiz-Jimenez et al. (2023, *Task arithmetic in the tangent space*) measure
disentanglement with the *weight disentanglement error* and find that fine-tuning the
NTK-linearised model gives the most disentangled vectors. A small ViT over 2x2 patches of the
8x8 digits (:mod:`examples.digits.vit`) is pre-trained on upright digits (plus 10% of four
views, as in the MLP experiment), then fine-tuned per task in four arms:

- ``full``: every tensor but the head; ``attention``: q/k/v/o projections only; ``mlp``: the
  MLPs' two matrices only, a size-matched control (as many weights as the projections);
  ``linearised``: every tensor but the head, of ``f(theta0) + J (theta - theta0)``.

Per arm: single-task accuracy, addition of all task vectors (absolute and normalised),
negation (target and control), the weight disentanglement error
``xi(a1, a2) = sum_t E_{x in task t} [pred(theta0 + a_t tau_t) != pred(theta0 + a1 tau1 + a2
tau2)]`` over a grid (heat maps), and the distance from the linear regime (how far the
fine-tuned network's outputs are from its linearisation's at the same weights). The
linearised arm is evaluated as the linear model. Task vectors are ``streamvec diff``
(``--include`` the arm's tensors), edited models ``streamvec combine [--include ...]``; sweeps
and the grid stream ``base + sum a_i tau_i`` into a module.

Run ``python -m examples.digits.transformer --out DIR [--seeds 0-4]``.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamvec.engine.into_torch import load_into, sweep
from streamvec.model.algebra import Model

from . import seeds
from .config import Config
from .data import CONTROL, Task, load_digits_splits, stable_seed, task_arrays
from .report import md_table, pct
from .runner import Context, new_context
from .train import class_mask, deterministic_torch, pretrain
from .vit import ARMS, DigitsViT, Linearised, arm_names, train_vit


def _grid(lo: float, hi: float, step: float) -> tuple[float, ...]:
    return tuple(round(lo + step * i, 4) for i in range(round((hi - lo) / step) + 1))


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes and schedules (the same for every arm: nothing is tuned per arm)."""

    # hidden is the ViT's width; pre-training uses the base's epochs, lr and exposure views.
    base: Config = field(default_factory=lambda: Config(hidden=32))
    finetune_epochs: int = 5
    finetune_lr: float = 1e-3
    tasks: tuple[str, ...] = ("mirror", "rot270", "invert")
    negation_targets: tuple[str, ...] = ("mirror", "invert")
    alphas: tuple[float, ...] = _grid(-2.0, 2.0, 0.5)
    arms: tuple[str, ...] = tuple(ARMS)

    @classmethod
    def reduced(cls, seed: int = 0) -> TransformerConfig:
        """What the test runs: two tasks, one negation target, a 4x4 grid (-1..2)."""
        return cls(
            base=replace(Config(hidden=32), seed=seed),
            tasks=("mirror", "rot270"),
            negation_targets=("mirror",),
            alphas=_grid(-1.0, 2.0, 1.0),
        )


class Scorer:
    """Logits of an arm's model (the linear model for ``linearised``) and accuracies."""

    def __init__(self, ctx: Context, pretrained: torch.nn.Module) -> None:
        self.ctx = ctx
        self.lin = Linearised(pretrained, dict(pretrained.named_parameters()))
        self._cache: dict[tuple[Task, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def arrays(self, task: Task, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if (task, split) not in self._cache:
            self._cache[task, split] = task_arrays(self.ctx.data, task, split)
        return self._cache[task, split]

    def logits(self, arm: str, net: torch.nn.Module, task: Task, split: str) -> torch.Tensor:
        x, _ = self.arrays(task, split)
        with torch.no_grad():
            out = self.lin.at(x, net) if arm == "linearised" else net(x)
        return out + class_mask(task.classes, out.shape[1])

    def predict(self, arm: str, net: torch.nn.Module, task: Task, split: str) -> torch.Tensor:
        return self.logits(arm, net, task, split).argmax(1)

    def accuracy(self, arm: str, net: torch.nn.Module, task: Task, split: str) -> float:
        _, y = self.arrays(task, split)
        return float((self.predict(arm, net, task, split) == y).float().mean())


def _finetune(
    config: TransformerConfig, ctx: Context, pre: DigitsViT, arm: str, task: Task
) -> None:
    net = copy.deepcopy(pre)
    x, y = task_arrays(ctx.data, task, "train")
    train_vit(
        net,
        x,
        y,
        names=arm_names(net, arm),
        epochs=config.finetune_epochs,
        lr=config.finetune_lr,
        seed=stable_seed(config.base.seed, f"finetune-{task.name}"),
        batch_size=config.base.batch_size,
        linearised=arm == "linearised",
    )
    include = ARMS[arm] if arm in ("attention", "mlp") else ()
    ctx.add_finetune(f"{arm}-{task.name}", net, include)


def _combine(ctx: Context, arm: str, output: str, scale: float, terms: Sequence[str]) -> Any:
    include = ARMS[arm] if arm in ("attention", "mlp") else ()
    filters = [arg for glob in include for arg in ("--include", glob)]
    return ctx.combine(output, scale, *filters, *terms)


def _arm(
    config: TransformerConfig, ctx: Context, score: Scorer, pre: DigitsViT, arm: str
) -> dict[str, Any]:
    """Every measurement of one arm."""
    cfg = config.base
    tasks = [Task(n, n) for n in config.tasks]
    tau: dict[str, Model] = {t.name: ctx.tau(f"{arm}-{t.name}") for t in tasks}
    vec = {t.name: str(ctx.vector(f"{arm}-{t.name}")) for t in tasks}
    ft_nets = {t.name: ctx.load(ctx.model(f"ft-{arm}-{t.name}")) for t in tasks}
    ft = {
        t.name: {s: score.accuracy(arm, ft_nets[t.name], t, s) for s in ("val", "test")}
        for t in tasks
    }
    out: dict[str, Any] = {"finetuned": {n: v["test"] for n, v in ft.items()}}

    # Addition of all task vectors, lambda on mean normalised validation accuracy.
    def added(net: torch.nn.Module) -> float:
        return float(
            np.mean([score.accuracy(arm, net, t, "val") / ft[t.name]["val"] for t in tasks])
        )

    total = sum((tau[t.name] for t in tasks[1:]), start=tau[tasks[0].name])
    lam = sweep(ctx.net, ctx.base, total, added, cfg.lambdas).best_lambda
    net = _combine(ctx, arm, f"add-{arm}", lam, list(vec.values()))
    acc = {t.name: score.accuracy(arm, net, t, "test") for t in tasks}
    out["addition"] = {
        "lambda": lam,
        "accuracy": acc,
        "normalized": {n: acc[n] / ft[n]["test"] for n in acc},
    }

    # Negation: lambda in 0..2 minimising target val accuracy, control >= 95% of pre-trained.
    control_min = cfg.control_ratio * score.accuracy("full", pre, CONTROL, "val")
    out["negation"] = {}
    for name in config.negation_targets:
        target = Task(name, name)
        seen: list[float] = []

        def forgot(m: torch.nn.Module, target: Task = target, seen: list[float] = seen) -> float:
            seen.append(score.accuracy(arm, m, CONTROL, "val"))
            return score.accuracy(arm, m, target, "val")

        def allowed(_: torch.nn.Module, seen: list[float] = seen) -> bool:
            return seen[-1] >= control_min

        lam = sweep(
            ctx.net,
            ctx.base,
            -1.0 * tau[name],
            forgot,
            cfg.negation_lambdas,
            maximize=False,
            constraint=allowed,
        ).best_lambda
        net = _combine(ctx, arm, f"negate-{arm}-{name}", lam, [f"{vec[name]}:-1"])
        out["negation"][name] = {
            "lambda": lam,
            "target": score.accuracy(arm, net, target, "test"),
            "control": score.accuracy(arm, net, CONTROL, "test"),
        }

    out["disentanglement"] = _disentanglement(config, ctx, score, arm, tasks[:2], tau)
    out["linear_distance"] = {
        t.name: _linear_distance(score, ft_nets[t.name], pre, t) for t in tasks
    }
    return out


def _disentanglement(
    config: TransformerConfig,
    ctx: Context,
    score: Scorer,
    arm: str,
    pair: Sequence[Task],
    tau: Mapping[str, Model],
) -> list[list[float]]:
    """``xi(a1, a2)`` on the two tasks' test images; rows a1, columns a2."""
    t1, t2 = pair

    def predictions(edit: Model) -> tuple[torch.Tensor, torch.Tensor]:
        load_into(ctx.net, ctx.base + edit)
        return score.predict(arm, ctx.net, t1, "test"), score.predict(arm, ctx.net, t2, "test")

    alphas = config.alphas
    single1 = {a: predictions(a * tau[t1.name])[0] for a in alphas}
    single2 = {a: predictions(a * tau[t2.name])[1] for a in alphas}
    grid = []
    for a1 in alphas:
        row = []
        for a2 in alphas:
            p1, p2 = predictions(a1 * tau[t1.name] + a2 * tau[t2.name])
            err = (p1 != single1[a1]).float().mean() + (p2 != single2[a2]).float().mean()
            row.append(float(err))
        grid.append(row)
    return grid


def _linear_distance(
    score: Scorer, net: torch.nn.Module, pre: torch.nn.Module, task: Task
) -> dict[str, float]:
    """How far ``f(theta_ft)`` is from ``f_lin(theta_ft)`` on the task's test images.

    ``relative``: ``||f - f_lin|| / ||f_lin - f(theta0)||`` over the logits (0 in the linear
    regime); ``disagreement``: share of images whose predicted class differs.
    """
    x, _ = score.arrays(task, "test")
    with torch.no_grad():
        f, f_lin, f0 = net(x), score.lin.at(x, net), pre(x)
    return {
        "relative": float((f - f_lin).norm() / (f_lin - f0).norm()),
        "disagreement": float((f.argmax(1) != f_lin.argmax(1)).float().mean()),
    }


def run(config: TransformerConfig, out: Path) -> dict[str, Any]:
    """One seed: pre-train the ViT, fine-tune every arm on every task, measure each arm.

    Args:
        config: settings (``config.base.seed`` is the seed).
        out: output directory (models, task vectors, ``results.md``, ``commands.sh``).

    Returns:
        The results (also written to ``out/results.json``).
    """
    started = time.perf_counter()
    cfg = config.base
    data = load_digits_splits(cfg.seed)
    with deterministic_torch():
        pre = pretrain(cfg, data, DigitsViT)
        ctx = new_context(cfg, out, data, pre, DigitsViT)
        score = Scorer(ctx, pre)
        for arm in config.arms:
            for name in config.tasks:
                _finetune(config, ctx, pre, arm, Task(name, name))
        views = [CONTROL, *(Task(n, n) for n in config.tasks)]
        results: dict[str, Any] = {
            "config": asdict(config),
            "command": f"python -m examples.digits.transformer --seeds {cfg.seed}",
            "trained": {arm: len(arm_names(pre, arm)) for arm in config.arms},
            "trained_weights": {
                arm: sum(dict(pre.named_parameters())[n].numel() for n in arm_names(pre, arm))
                for arm in config.arms
            },
            "pretrained": {t.name: score.accuracy("full", pre, t, "test") for t in views},
            "arms": {arm: _arm(config, ctx, score, pre, arm) for arm in config.arms},
        }
    results["streamvec_commands"] = len(ctx.streamvec.commands)
    results["seconds"] = time.perf_counter() - started
    ctx.write(results, format_summary([results]))
    return results


def _summaries(r: Mapping[str, Any], arm: str) -> dict[str, float]:
    a = r["arms"][arm]
    return {
        "single": float(np.mean(list(a["finetuned"].values()))),
        "add_abs": float(np.mean(list(a["addition"]["accuracy"].values()))),
        "add_norm": float(np.mean(list(a["addition"]["normalized"].values()))),
        "neg_target": float(np.mean([v["target"] for v in a["negation"].values()])),
        "neg_control": float(np.mean([v["control"] for v in a["negation"].values()])),
        "xi": float(np.mean(a["disentanglement"])),
        "lin_rel": float(np.mean([v["relative"] for v in a["linear_distance"].values()])),
        "lin_dis": float(np.mean([v["disagreement"] for v in a["linear_distance"].values()])),
    }


COLUMNS: dict[str, tuple[str, float]] = {
    "single": ("Single-task accuracy", 100.0),
    "add_abs": ("Addition: accuracy", 100.0),
    "add_norm": ("Addition: normalised", 100.0),
    "neg_target": ("Negation: target", 100.0),
    "neg_control": ("Negation: control", 100.0),
    "xi": ("Mean disentanglement error", 1.0),
    "lin_rel": ("Distance from linear: relative", 1.0),
    "lin_dis": ("Distance from linear: disagreement", 100.0),
}


def format_summary(all_results: Sequence[Mapping[str, Any]]) -> str:
    """Per arm: each measure's spread over seeds (one seed: its value)."""
    first = all_results[0]
    seeds_run = [r["config"]["base"]["seed"] for r in all_results]
    lines = [
        f"# Attention-only fine-tuning on a small ViT, seeds {seeds_run}",
        "",
        "Pre-trained test accuracy (seed "
        f"{seeds_run[0]}): "
        + ", ".join(f"{k} {pct(v)}" for k, v in first["pretrained"].items())
        + ". Trained weights per arm: "
        + ", ".join(f"{k} {v}" for k, v in first["trained_weights"].items())
        + ".",
        "",
    ]
    body = []
    for arm in first["arms"]:
        values = [_summaries(r, arm) for r in all_results]
        row = [arm]
        for key, (_, scale) in COLUMNS.items():
            digits = 1 if scale == 100.0 else 3
            row.append(seeds.spread([v[key] for v in values], scale=scale, digits=digits))
        body.append(row)
    lines += md_table(["Arm", *(c for c, _ in COLUMNS.values())], body)
    if len(all_results) > 1:
        lines += ["", "Attention-only minus the MLP-only control, per seed:", ""]
        diffs = []
        for key, (title, scale) in COLUMNS.items():
            d = [_summaries(r, "attention")[key] - _summaries(r, "mlp")[key] for r in all_results]
            diffs.append([title, seeds.spread(d, scale=scale, digits=1 if scale == 100 else 3)])
        lines += md_table(["Measure", "attention - mlp"], diffs)
    return "\n".join(lines) + "\n"


def write_heatmaps(all_results: Sequence[Mapping[str, Any]], path: Path) -> None:
    """The disentanglement error per arm, averaged over seeds, as one row of heat maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = all_results[0]
    alphas = first["config"]["alphas"]
    arms = list(first["arms"])
    fig, axes = plt.subplots(1, len(arms), figsize=(2.6 * len(arms) + 1.0, 2.8), squeeze=False)
    pair = first["config"]["tasks"][:2]
    for ax, arm in zip(axes[0], arms, strict=True):
        grid = np.mean([r["arms"][arm]["disentanglement"] for r in all_results], axis=0)
        image = ax.imshow(
            grid,
            origin="lower",
            vmin=0,
            vmax=2,
            cmap="viridis",
            extent=(alphas[0], alphas[-1], alphas[0], alphas[-1]),
        )
        ax.set(title=f"{arm} (mean {grid.mean():.2f})", xlabel=f"alpha ({pair[1]})")
    axes[0][0].set_ylabel(f"alpha ({pair[0]})")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="disentanglement error (0..2)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m examples.digits.transformer --out DIR [--seeds 0-4]``."""
    return seeds.main(
        argv,
        prog="python -m examples.digits.transformer",
        description="A small ViT on the digits, fine-tuned full, attention-only, MLP-only "
        "(size-matched) and linearised: accuracy, addition, negation, weight disentanglement "
        "error heat maps, distance from the linear regime.",
        run=lambda seed, out: run(
            TransformerConfig(base=replace(Config(hidden=32), seed=seed)), out
        ),
        report=format_summary,
        figures=lambda results, out: write_heatmaps(results, out / "disentanglement.png"),
    )


if __name__ == "__main__":
    sys.exit(main())
