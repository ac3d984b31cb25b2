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
   process through :func:`streamvec.cli.main`, and recorded in ``OUT/commands.sh``), and
   lambda sweeps by streaming ``base + lambda * tau`` into a module with
   :func:`streamvec.into_torch.sweep`. Lambda is always chosen on the validation split, then
   the chosen model is written by ``streamvec combine``, loaded back and scored on the test
   split.

Run ``python -m streamvec.experiments.digits --out DIR [--seed S] [--quick]``; the tables are
printed and written to ``DIR/results.md`` and ``DIR/results.json`` (with a plot,
``DIR/lambda.png``, when matplotlib is installed). ``docs/tutorial-digits.md`` walks through it.
Needs torch and scikit-learn (not dependencies of streamvec itself).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import streamvec as sv
from streamvec.algebra import Model
from streamvec.cli import main as streamvec_main
from streamvec.into_torch import PAPER_LAMBDAS, sweep

__all__ = [
    "VIEWS",
    "Config",
    "DigitsMLP",
    "Task",
    "load_checkpoint",
    "main",
    "run_experiment",
    "save_checkpoint",
]

# Each view is a fixed transformation of the 8x8 images (axis 0 is the sample).
VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "upright": lambda x: x,
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "mirror": lambda x: x[:, :, ::-1],
    "flipud": lambda x: x[:, ::-1, :],
    "invert": lambda x: 1.0 - x,
    # Grey ink on grey paper: a faded scan (contrast 0.4, background 0.35).
    "faded": lambda x: 0.35 + 0.4 * x,
}
ALL_DIGITS = tuple(range(10))
LOW, HIGH = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
INDEX = "model.safetensors.index.json"


def _grid(stop: float, step: float) -> tuple[float, ...]:
    return tuple(round(step * i, 4) for i in range(round(stop / step) + 1))


@dataclass(frozen=True)
class Task:
    """Digits seen through ``view``, classified among ``digits`` only.

    A task over a subset of the digits is scored, and fine-tuned, with the logits of the other
    digits masked out: the paper's per-task classification heads, which cover only that
    task's classes.
    """

    name: str
    view: str
    digits: tuple[int, ...] = ALL_DIGITS


CONTROL = Task("upright", "upright")


@dataclass(frozen=True)
class Config:
    """Everything that decides the numbers; recorded in ``results.json``."""

    seed: int = 0
    quick: bool = False
    hidden: int = 256
    pretrain_epochs: int = 30
    pretrain_lr: float = 1e-3
    # Fraction of the training images of each exposure view mixed into pre-training: the
    # pre-trained model is partly competent on those views (it has something to forget) and
    # has never seen rot270 or the analogies' views (rot90, faded).
    exposure: float = 0.1
    exposure_views: tuple[str, ...] = ("invert", "mirror", "flipud", "rot180")
    finetune_epochs: int = 10
    finetune_lr: float = 0.01
    batch_size: int = 32
    tasks: tuple[str, ...] = ("invert", "mirror", "flipud", "rot180", "rot270")
    negation_targets: tuple[str, ...] = ("invert", "mirror", "flipud", "rot180")
    # Relations for the analogies: a rotation, and a fading (the views never seen before).
    analogy_views: tuple[str, ...] = ("rot90", "faded")
    analogy_both_ways: bool = True
    # The paper's grid for addition and analogies (0..1 by 0.05). Negation scans to 2: a short
    # fine-tune gives a short task vector, and the control constraint rather than the grid
    # should stop the edit (for inverted ink it often still holds at 2; see the tutorial).
    lambdas: tuple[float, ...] = PAPER_LAMBDAS
    negation_lambdas: tuple[float, ...] = _grid(2.0, 0.05)
    control_ratio: float = 0.95
    random_baseline: bool = True
    decompose: bool = True
    # streamvec decompose's defaults, and a looser setting for the all-task merge (where
    # nothing is shared at the defaults: see the tutorial).
    decompose_rank: int = 16
    decompose_threshold: float = 0.85
    loose_rank: int = 32
    loose_threshold: float = 0.5
    # Several shards per checkpoint (the models are ~340 kB), as a large model would have.
    shard_size: str = "128KB"
    # Tensors of a few hundred kB: worker threads cost more than they save.
    scheduler: str = "sync"

    @classmethod
    def preset(cls, *, seed: int = 0, quick: bool = False) -> Config:
        """The full run, or ``quick``: 3 tasks, 2 negation targets, one analogy per relation,
        no random baseline and no decompositions (what the test runs)."""
        full = cls(seed=seed)
        if not quick:
            return full
        return replace(
            full,
            quick=True,
            tasks=("invert", "mirror", "rot270"),
            negation_targets=("invert", "mirror"),
            analogy_both_ways=False,
            random_baseline=False,
            decompose=False,
        )


# -- data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    """The images (n, 8, 8) in [0, 1], labels, and stratified train/val/test indices."""

    images: np.ndarray
    labels: np.ndarray
    splits: Mapping[str, np.ndarray]


def load_digits_splits(seed: int) -> Digits:
    """scikit-learn's digits, split 60/20/20 per class with ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "this experiment needs scikit-learn for its bundled digits: pip install scikit-learn"
        ) from exc
    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).astype(np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for digit in ALL_DIGITS:
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_train, n_val = round(0.6 * len(idx)), round(0.2 * len(idx))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    splits = {k: np.sort(np.concatenate(v)) for k, v in parts.items()}
    return Digits(images, labels, splits)


def task_arrays(
    data: Digits, task: Task, split: str, indices: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened view images and labels of ``task`` on a split (or on given indices)."""
    idx = data.splits[split] if indices is None else indices
    idx = idx[np.isin(data.labels[idx], task.digits)]
    x = np.ascontiguousarray(VIEWS[task.view](data.images[idx])).reshape(len(idx), 64)
    return torch.from_numpy(x), torch.from_numpy(data.labels[idx])


# -- model and training -------------------------------------------------------------------


class DigitsMLP(torch.nn.Module):
    """64 -> hidden -> hidden -> 10, ReLU. Tensor names: fc1.*, fc2.*, head.*."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def class_mask(digits: Sequence[int]) -> torch.Tensor:
    """0 on the task's classes, -inf elsewhere: added to logits, restricts the head."""
    mask = torch.full((10,), float("-inf"))
    mask[list(digits)] = 0.0
    return mask


def stable_seed(seed: int, name: str) -> int:
    """A per-purpose seed that does not shift when other tasks are added or removed."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


@contextmanager
def deterministic_torch(threads: int = 1) -> Iterator[None]:
    """Bit-reproducible torch on CPU: deterministic kernels and a fixed thread count.

    Restores the previous settings and the global random state afterwards (the test suite
    shares the process).
    """
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_deterministic)


def train(
    net: DigitsMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int,
    optimizer: str,
    digits: Sequence[int] = ALL_DIGITS,
    freeze_head: bool = False,
) -> None:
    """Mini-batch training with cross-entropy over ``digits`` (other logits masked)."""
    params = [p for n, p in net.named_parameters() if not (freeze_head and n.startswith("head."))]
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    mask = class_mask(digits)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[batch]) + mask, y[batch])
            loss.backward()
            opt.step()
    net.eval()


def pretrain(config: Config, data: Digits) -> DigitsMLP:
    """Upright training digits plus ``exposure`` of the training images in each exposure view."""
    torch.manual_seed(stable_seed(config.seed, "init"))
    net = DigitsMLP(config.hidden)
    x, y = task_arrays(data, CONTROL, "train")
    xs, ys = [x], [y]
    train_idx = data.splits["train"]
    for view in config.exposure_views:
        rng = np.random.default_rng(stable_seed(config.seed, f"exposure-{view}"))
        some = np.sort(rng.permutation(train_idx)[: round(config.exposure * len(train_idx))])
        x, y = task_arrays(data, Task(view, view), "train", some)
        xs.append(x)
        ys.append(y)
    train(
        net,
        torch.cat(xs),
        torch.cat(ys),
        epochs=config.pretrain_epochs,
        lr=config.pretrain_lr,
        seed=stable_seed(config.seed, "pretrain"),
        batch_size=config.batch_size,
        optimizer="adam",
    )
    return net


def finetune(config: Config, data: Digits, pretrained: DigitsMLP, task: Task) -> DigitsMLP:
    """A copy of the pre-trained model fine-tuned on ``task``; the head stays frozen."""
    net = DigitsMLP(config.hidden)
    net.load_state_dict(pretrained.state_dict())
    x, y = task_arrays(data, task, "train")
    train(
        net,
        x,
        y,
        epochs=config.finetune_epochs,
        lr=config.finetune_lr,
        seed=stable_seed(config.seed, f"finetune-{task.name}"),
        batch_size=config.batch_size,
        optimizer="sgd",
        digits=task.digits,
        freeze_head=True,
    )
    return net


# -- checkpoints --------------------------------------------------------------------------


def save_checkpoint(
    state: Mapping[str, torch.Tensor],
    path: Path,
    *,
    shard_bytes: int,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``state`` as sharded safetensors in the Hugging Face layout (replacing ``path``).

    Tensors are packed in order into shards of at most ``shard_bytes`` (a larger tensor gets a
    shard of its own), named ``model-0000i-of-0000N.safetensors``, with
    ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``) and, when given,
    ``config.json``, which ``streamvec combine`` copies into its outputs.
    """
    import safetensors.torch

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: state[n].detach().contiguous() for n in names}
        safetensors.torch.save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    if config is not None:
        (path / "config.json").write_text(json.dumps(dict(config), indent=1) + "\n")
    return path


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF-layout sharded checkpoint (as written by streamvec combine)."""
    import safetensors.torch

    index = json.loads((path / INDEX).read_text())
    state: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        state.update(safetensors.torch.load_file(str(path / fname)))
    return state


class Streamvec:
    """Runs ``streamvec`` commands in this process and records them for ``commands.sh``.

    :func:`streamvec.cli.main` is what the console script runs, so this is the command line
    without a Python start-up per command. Paths under ``root`` are recorded relative to it.
    """

    def __init__(self, root: Path, flags: Sequence[str]) -> None:
        self.root = root
        self.flags = list(flags)
        self.commands: list[str] = []
        self.seconds = 0.0

    def __call__(self, *argv: str | Path) -> None:
        args = [str(a) for a in argv] + self.flags
        shown = shlex.join(["streamvec", *(self.relative(a) for a in args)])
        started = time.perf_counter()
        code = streamvec_main(args)
        self.seconds += time.perf_counter() - started
        self.commands.append(shown)
        if code != 0:
            raise RuntimeError(f"`{shown}` failed with exit code {code} (message above)")

    def relative(self, arg: str) -> str:
        """``arg`` with the output directory's prefix removed (also inside ``PATH:WEIGHT``)."""
        return arg.replace(str(self.root) + os.sep, "")


# -- evaluation ---------------------------------------------------------------------------


class Evaluator:
    """Accuracy of a module on a task's split, with the inputs built once."""

    def __init__(self, data: Digits) -> None:
        self.data = data
        self._cache: dict[tuple[Task, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, net: torch.nn.Module, task: Task, split: str) -> float:
        key = (task, split)
        if key not in self._cache:
            self._cache[key] = task_arrays(self.data, task, split)
        x, y = self._cache[key]
        with torch.no_grad():
            predicted = (net(x) + class_mask(task.digits)).argmax(1)
        return float((predicted == y).float().mean())


def _fmt(lam: float) -> str:
    return f"{lam:g}"


@dataclass
class Context:
    """What every stage needs: config, paths, data, the streamvec runner, the sweep module."""

    config: Config
    out: Path
    data: Digits
    evaluate: Evaluator
    streamvec: Streamvec
    net: DigitsMLP
    pretrained_path: Path
    base: Model
    shard_bytes: int

    def vector(self, name: str) -> Path:
        return self.out / "vectors" / f"{name}.zarr"

    def model(self, name: str) -> Path:
        return self.out / "models" / name

    def tau(self, name: str) -> Model:
        """``ft - pre`` formed on the fly from the fine-tuned checkpoint, for sweeps.

        The same task vector ``streamvec diff`` stored, but read from memory-mapped
        safetensors, which is several times faster per lambda than reading the Zarr store.
        """
        return sv.open(self.model(f"ft-{name}")) - self.base

    def load(self, path: Path) -> DigitsMLP:
        """A fresh module holding the checkpoint at ``path``."""
        net = DigitsMLP(self.config.hidden)
        net.load_state_dict(load_checkpoint(path))
        net.eval()
        return net

    def combine(self, output: str, scale: float, *terms: str) -> DigitsMLP:
        """``streamvec combine --base PRETRAINED`` into ``models/output``; loads it back."""
        path = self.model(output)
        self.streamvec(
            "combine",
            "--base",
            self.pretrained_path,
            "-o",
            path,
            "--scale",
            _fmt(scale),
            "--shard-size",
            self.config.shard_size,
            *terms,
        )
        return self.load(path)


# -- the experiments ----------------------------------------------------------------------


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


def _shared_share(shared: Model, tau: Model) -> float:
    """Fraction of ``tau``'s squared Frobenius norm (all tensors) in its shared part."""
    num = sum(float(np.sum(np.square(shared[t].compute(), dtype=np.float64))) for t in tau)
    den = sum(float(np.sum(np.square(tau[t].compute(), dtype=np.float64))) for t in tau)
    return num / den if den > 0 else 0.0


def _decompose(
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
        _fmt(threshold),
    )
    manifest = json.loads((output / "decomposition.json").read_text())
    return {
        "rank": rank,
        "threshold": threshold,
        # The head is frozen, so every task vector is zero there: whatever directions the
        # decomposition reports for it carry nothing. Only the trained matrices are listed.
        "shared_dims": {k: v for k, v in manifest["shared_dims"].items() if k.startswith("fc")},
        "shared_share": {
            n: _shared_share(sv.open(output / f"{n}.shared.zarr"), sv.open(ctx.vector(n)))
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
        found = _decompose(ctx, names, parts, rank, threshold)
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
        found = _decompose(
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
    runner = Streamvec(out, ["--quiet", "--overwrite", "--scheduler", config.scheduler])
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
    return f"python -m streamvec.experiments.digits --seed {config.seed}{quick}"


# -- reporting ----------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def format_report(results: Mapping[str, Any]) -> str:
    """The results as Markdown tables (accuracies in %, on the test split)."""
    cfg = results["config"]
    neg = results["negation"]
    lines = [
        f"# Task arithmetic on digits: `{results['command']}`",
        "",
        f"Test accuracy in % (train/val/test = {results['data']['train']}/"
        f"{results['data']['val']}/{results['data']['test']} images per view). Lambda is "
        "always chosen on the validation split.",
        "",
        f"## Negation (control: upright digits; lambda in 0..{cfg['negation_lambdas'][-1]:g} "
        f"keeping validation control accuracy >= {cfg['control_ratio']:.0%} of the "
        "pre-trained model's)",
        "",
    ]
    names = {"pretrained": "Pre-trained", "finetuned": "Fine-tuned", "random": "Random vector"}
    names["negated"] = "Negative task vector"
    lines += _table(
        ["Method", "Target (avg)", "Control (avg)"],
        [[names[m], _pct(v["target"]), _pct(v["control"])] for m, v in neg["summary"].items()],
    )
    lines.append("")
    header = ["Target", "Pre-trained", "Fine-tuned", "Negated: lambda", "target", "control"]
    if cfg["random_baseline"]:
        header += ["Random: lambda", "target", "control"]
    rows = []
    for r in neg["rows"]:
        row = [
            r["target"],
            f"{_pct(r['pretrained']['target'])} / {_pct(r['pretrained']['control'])}",
            f"{_pct(r['finetuned']['target'])} / {_pct(r['finetuned']['control'])}",
            _fmt(r["negated"]["lambda"]),
            _pct(r["negated"]["target"]),
            _pct(r["negated"]["control"]),
        ]
        if cfg["random_baseline"]:
            rnd = r["random"]
            row += [_fmt(rnd["lambda"]), _pct(rnd["target"]), _pct(rnd["control"])]
        rows.append(row)
    lines += ["(Pre-trained and fine-tuned columns: target / control.)", ""]
    lines += _table(header, rows)

    add = results["addition"]
    lines += ["", "## Addition (normalised accuracy = accuracy / fine-tuned accuracy)", ""]
    lines += _table(
        ["Tasks added", "Subsets", "Mean accuracy", "Mean normalised", "Worst normalised"],
        [
            [
                str(s["tasks"]),
                str(s["subsets"]),
                _pct(s["mean_accuracy"]),
                _pct(s["mean_normalized"]),
                _pct(s["min_normalized"]),
            ]
            for s in add["by_size"]
        ],
    )
    all_tasks = add["all"]
    lines += ["", f"All {len(all_tasks['tasks'])} tasks, lambda = {_fmt(all_tasks['lambda'])}:", ""]
    lines += _table(
        ["Task", "Pre-trained", "Fine-tuned", "Multi-task", "Normalised"],
        [
            [
                n,
                _pct(results["pretrained"][f"{n}_test"]),
                _pct(results["finetuned"][n]["test"]),
                _pct(all_tasks["accuracy"][n]),
                _pct(all_tasks["normalized"][n]),
            ]
            for n in all_tasks["tasks"]
        ],
    )

    lines += [
        "",
        "## Analogy (tau_D ~ tau_C + (tau_B - tau_A); no D data used; lambda chosen on B and "
        "C validation)",
        "",
    ]
    lines += _table(
        [
            "A : B :: C : D",
            "Chance",
            "Pre-trained",
            "Analogy (lambda)",
            "tau_B alone",
            "Fine-tuned on D",
        ],
        [
            [
                f"{r['A']} : {r['B']} :: {r['C']} : {r['D']}",
                _pct(r["chance"]),
                _pct(r["pretrained"]),
                f"{_pct(r['analogy'])} ({_fmt(r['lambda'])})",
                _pct(r["b_only"]),
                _pct(r["finetuned_on_d"]),
            ]
            for r in results["analogy"]
        ],
    )

    dec = results["decomposition"]
    lines += ["", "## Shared/unique decomposition (`streamvec decompose`)", ""]
    if dec is None:
        lines.append("Not run in this mode (`--quick`).")
    else:
        lines += [
            "Multi-task merging: the shared components of all task vectors added as extra "
            "task vectors (`pre + lambda (sum tau_i + sum shared_i)`), against the plain sum.",
            "",
        ]
        plain = dec["tasks_only"]
        table = [
            [
                "sum of tau_i",
                "",
                "",
                _fmt(plain["lambda"]),
                _pct(plain["mean_normalized"]),
                _pct(min(plain["normalized"].values())),
            ]
        ]
        for m in dec["merge"]:
            x = m["with_shared"]
            dims = ", ".join(f"{k} {v}" for k, v in m["shared_dims"].items())
            share = np.mean(list(m["shared_share"].values()))
            table.append(
                [
                    f"+ sum of shared_i (rank {m['rank']}, threshold {_fmt(m['threshold'])})",
                    dims,
                    _pct(share),
                    _fmt(x["lambda"]),
                    _pct(x["mean_normalized"]),
                    _pct(min(x["normalized"].values())),
                ]
            )
        lines += _table(
            [
                "All tasks added",
                "Shared dims",
                "Shared % of norm^2",
                "lambda",
                "Mean normalised",
                "Worst normalised",
            ],
            table,
        )
        lines += [
            "",
            "Forgetting: each target's vector decomposed with the vector of a fine-tune on the "
            "control task (upright digits; rank 16, threshold 0.85); only the unique part "
            "negated, under the same control constraint.",
            "",
        ]
        lines += _table(
            [
                "Negated",
                "Shared dims",
                "Shared % of norm^2",
                "Full tau: lambda",
                "target",
                "control",
                "Unique only: lambda",
                "target",
                "control",
            ],
            [
                [
                    r["target"],
                    ", ".join(f"{k} {v}" for k, v in r["shared_dims"].items()),
                    _pct(r["shared_share"]),
                    _fmt(r["full"]["lambda"]),
                    _pct(r["full"]["target"]),
                    _pct(r["full"]["control"]),
                    _fmt(r["unique"]["lambda"]),
                    _pct(r["unique"]["target"]),
                    _pct(r["unique"]["control"]),
                ]
                for r in dec["negation"]
            ],
        )
    secs = results["seconds"]
    lines += [
        "",
        f"{results['streamvec_commands']} streamvec commands ({secs['streamvec_commands']:.1f} s); "
        f"total {secs['total']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def write_plot(results: Mapping[str, Any], path: Path) -> str | None:
    """Accuracy against lambda (test split) for each operation; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for row in results["negation"]["rows"]:
        lams = [p["lambda"] for p in row["curve"]]
        (line,) = ax.plot(lams, [100 * p["target_test"] for p in row["curve"]], label=row["target"])
        ax.plot(lams, [100 * p["control_test"] for p in row["curve"]], "--", color=line.get_color())
        ax.axvline(row["negated"]["lambda"], color=line.get_color(), alpha=0.3, lw=1)
    ax.set(title="Negation: target (solid), control (dashed)", xlabel="lambda", ylabel="accuracy %")
    ax.legend(fontsize=8)
    ax = axes[1]
    all_tasks = results["addition"]["all"]
    for n in all_tasks["tasks"]:
        curve = all_tasks["curve"]
        ax.plot([p["lambda"] for p in curve], [100 * p[n] for p in curve], label=n)
    ax.axvline(all_tasks["lambda"], color="grey", alpha=0.5, lw=1)
    ax.set(
        title=f"Addition of all {len(all_tasks['tasks'])} task vectors",
        xlabel="lambda",
        ylabel="normalised accuracy %",
    )
    ax.legend(fontsize=8)
    ax = axes[2]
    for row in results["analogy"]:
        curve = row["curve"]
        (line,) = ax.plot(
            [p["lambda"] for p in curve],
            [100 * p["d_test"] for p in curve],
            label=f"D = {row['D']}",
        )
        ax.axhline(100 * row["finetuned_on_d"], color=line.get_color(), ls=":", lw=1)
        ax.axvline(row["lambda"], color=line.get_color(), alpha=0.3, lw=1)
    ax.axhline(100 * results["analogy"][0]["chance"], color="grey", ls="--", lw=1, label="chance")
    ax.set(title="Analogy C + (B - A): accuracy on D", xlabel="lambda", ylabel="accuracy %")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streamvec.experiments.digits [--out DIR] [--seed S] [--quick]``."""
    parser = argparse.ArgumentParser(
        prog="python -m streamvec.experiments.digits",
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
