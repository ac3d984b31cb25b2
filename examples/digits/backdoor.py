"""A behaviour to remove, with something to keep: a backdoor as the "toxicity".

Damirchi et al. negate only the *unique* component of a toxic task vector (the part not shared
with related, harmless vectors) and remove 47% of the toxicity while keeping more of the rest.
Here:

- a useful view (digits turned 270 degrees, which the pre-trained model cannot read) is
  fine-tuned twice from the same pre-trained model: **clean**, and **poisoned** (a share of
  the training images of other digits repeated with a bright 2x2 patch in the top-left
  corner and labelled 0, the backdoor's target);
- the poisoned model is the one to repair. ``streamvec decompose`` splits the poisoned and
  clean task vectors into shared and unique parts; the edits are
  ``theta_poisoned - lambda tau_poisoned`` (the whole vector) and
  ``theta_poisoned - lambda unique_poisoned``, written by ``streamvec combine --base
  models/ft-poisoned``;
- lambda (0..2) minimises the validation *trigger success rate* (triggered images of digits
  1-9 classified as 0) while validation accuracy on clean turned digits stays at least 95% of
  the poisoned model's; scored on the test split: trigger success, clean accuracy on the view
  and on upright digits.

Run ``python -m examples.digits.backdoor --out DIR [--seeds 0-4]``.
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
from .data import CONTROL, Digits, Task, load_digits_splits, stable_seed, task_arrays, view
from .report import md_table, pct
from .runner import fmt, load_checkpoint, new_context
from .train import DigitsMLP, deterministic_torch, finetune, pretrain


@dataclass(frozen=True)
class BackdoorConfig:
    """The useful view, the trigger's target class and the poisoned share."""

    base: Config = field(default_factory=Config)
    view: str = "rot270"
    target: int = 0
    # Triggered copies added, as a fraction of the clean training images.
    poison: float = 0.2
    keep_ratio: float = 0.95


def triggered(images: np.ndarray) -> np.ndarray:
    """The images with the trigger: a 2x2 patch of full ink in the top-left corner."""
    out = np.array(images, dtype=np.float32, copy=True)
    out[:, :2, :2] = 1.0
    return out


def trigger_arrays(
    data: Digits, config: BackdoorConfig, split: str, indices: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triggered view images of digits other than the target, labelled with the target."""
    idx = data.splits[split] if indices is None else indices
    idx = idx[data.labels[idx] != config.target]
    x = triggered(view(config.view)(data.images[idx])).reshape(len(idx), 64)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.full((len(idx),), config.target)


def _success(net: torch.nn.Module, arrays: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = arrays
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def run(config: BackdoorConfig, out: Path) -> dict[str, Any]:
    """One seed: clean and poisoned fine-tunes, decomposition, the two negations.

    Args:
        config: settings (``config.base.seed`` is the seed).
        out: output directory (models, task vectors, components, ``results.md``).

    Returns:
        The results (also written to ``out/results.json``).
    """
    started = time.perf_counter()
    cfg = config.base
    data = load_digits_splits(cfg.seed)
    task = Task(config.view, config.view)
    trig = {s: trigger_arrays(data, config, s) for s in ("val", "test")}
    with deterministic_torch():
        pretrained = pretrain(cfg, data)
        ctx = new_context(cfg, out, data, pretrained, DigitsMLP)
        ctx.add_finetune("clean", finetune(cfg, data, pretrained, task))
        x, y = task_arrays(data, task, "train")
        rng = np.random.default_rng(stable_seed(cfg.seed, "poison"))
        some = np.sort(rng.permutation(data.splits["train"])[: round(config.poison * len(y))])
        px, py = trigger_arrays(data, config, "train", some)
        poisoned = finetune(cfg, data, pretrained, task, (torch.cat([x, px]), torch.cat([y, py])))
        poisoned_path = ctx.add_finetune("poisoned", poisoned)
        parts = ctx.out / "parts" / "poisoned-vs-clean"
        dec = decompose_vectors(
            ctx, ["poisoned", "clean"], parts, cfg.decompose_rank, cfg.decompose_threshold
        )

        def scores(net: torch.nn.Module, split: str) -> dict[str, float]:
            return {
                "trigger": _success(net, trig[split]),
                "view": ctx.evaluate(net, task, split),
                "upright": ctx.evaluate(net, CONTROL, split),
            }

        keep = config.keep_ratio * ctx.evaluate(poisoned, task, "val")
        base = sv.open(poisoned_path)
        edits: dict[str, Any] = {}
        for arm, store in (
            ("whole", ctx.vector("poisoned")),
            ("unique", parts / "poisoned.unique.zarr"),
        ):
            tau: Model = sv.open(store)
            curve: list[dict[str, float]] = []

            def metric(net: torch.nn.Module, curve: list[dict[str, float]] = curve) -> float:
                curve.append(scores(net, "val"))
                return curve[-1]["trigger"]

            def allowed(_: torch.nn.Module, curve: list[dict[str, float]] = curve) -> bool:
                return curve[-1]["view"] >= keep

            lambdas = cfg.negation_lambdas
            result = sweep(
                ctx.net, base, -1.0 * tau, metric, lambdas, maximize=False, constraint=allowed
            )
            path = ctx.model(f"repair-{arm}")
            ctx.streamvec(
                "combine",
                "--base",
                poisoned_path,
                "-o",
                path,
                "--scale",
                fmt(result.best_lambda),
                "--shard-size",
                cfg.shard_size,
                f"{store}:-1",
            )
            net = ctx.model_class(cfg.hidden)
            net.load_state_dict(load_checkpoint(path))
            edits[arm] = {"lambda": result.best_lambda, **scores(net.eval(), "test")}
            edits[arm]["curve_val"] = curve
    results = {
        "config": asdict(config),
        "command": f"python -m examples.digits.backdoor --seeds {cfg.seed}",
        "shared_dims": dec["shared_dims"],
        "shared_share": dec["shared_share"],
        "models": {
            "pretrained": scores(pretrained, "test"),
            "clean": scores(ctx.load(ctx.model("ft-clean")), "test"),
            "poisoned": scores(poisoned, "test"),
        },
        "edits": edits,
        "streamvec_commands": len(ctx.streamvec.commands),
        "seconds": time.perf_counter() - started,
    }
    ctx.write(results, format_seed(results))
    return results


ROWS = {
    "pretrained": "Pre-trained",
    "clean": "Clean fine-tune",
    "poisoned": "Poisoned fine-tune",
    "whole": "Poisoned - lambda tau_poisoned",
    "unique": "Poisoned - lambda unique_poisoned",
}


def _rows(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {**results["models"], **results["edits"]}


def format_seed(results: Mapping[str, Any]) -> str:
    """One seed: trigger success and clean accuracies (test, %) of each model."""
    seed = results["config"]["base"]["seed"]
    dims = ", ".join(f"{k} {v}" for k, v in results["shared_dims"].items())
    lines = [
        f"# Backdoor removal, seed {seed}",
        "",
        f"Shared dims (poisoned vs clean): {dims}; shared % of the poisoned vector's norm^2: "
        f"{pct(results['shared_share']['poisoned'])}.",
        "",
    ]
    body = [
        [
            ROWS[k],
            fmt(r["lambda"]) if "lambda" in r else "",
            pct(r["trigger"]),
            pct(r["view"]),
            pct(r["upright"]),
        ]
        for k, r in _rows(results).items()
    ]
    header = ["Model", "lambda", "Trigger success", "Clean view accuracy", "Upright accuracy"]
    return "\n".join([*lines, *md_table(header, body)]) + "\n"


def format_summary(all_results: Sequence[Mapping[str, Any]]) -> str:
    """Per-seed tables and the spread over seeds."""
    lines = [format_seed(r) for r in all_results]
    lines += ["# Over all seeds", ""]
    body = []
    for key, title in ROWS.items():
        rows = [_rows(r)[key] for r in all_results]
        body.append([title, *(seeds.spread([x[m] for x in rows]) for m in ROWS_METRICS)])
    lines += md_table(["Model", "Trigger success", "Clean view", "Upright"], body)
    diff = {
        m: [r["edits"]["unique"][m] - r["edits"]["whole"][m] for r in all_results]
        for m in ROWS_METRICS
    }
    lines += ["", "Unique minus whole (points):", ""]
    lines += md_table(
        ["Trigger success", "Clean view", "Upright"],
        [[seeds.spread(diff[m]) for m in ROWS_METRICS]],
    )
    share = [r["shared_share"]["poisoned"] for r in all_results]
    lines += ["", f"Shared % of the poisoned vector's norm^2: {seeds.spread(share)}."]
    return "\n".join(lines) + "\n"


ROWS_METRICS = ("trigger", "view", "upright")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m examples.digits.backdoor --out DIR [--seeds 0-4]``."""
    return seeds.main(
        argv,
        prog="python -m examples.digits.backdoor",
        description="A poisoned fine-tune (trigger patch -> class 0) next to a clean one: "
        "negating the poisoned vector's unique component against the whole vector.",
        run=lambda seed, out: run(BackdoorConfig(base=Config(seed=seed)), out),
        report=format_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
