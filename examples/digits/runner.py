"""Checkpoints in the Hugging Face layout, streamvec commands, evaluation, the shared context."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import streamvec as sv
from streamvec.cli.main import main as streamvec_main
from streamvec.model.algebra import Model

from .config import Config
from .data import Digits, Task, task_arrays
from .train import DigitsMLP, class_mask

INDEX = "model.safetensors.index.json"


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

    :func:`streamvec.cli.main.main` is what the console script runs, so this is the command line
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
            logits = net(x)
            predicted = (logits + class_mask(task.classes, logits.shape[1])).argmax(1)
        return float((predicted == y).float().mean())


def fmt(lam: float) -> str:
    return f"{lam:g}"


@dataclass
class Context:
    """What every stage needs: config, paths, data, the streamvec runner, the sweep module."""

    config: Config
    out: Path
    data: Digits
    evaluate: Evaluator
    streamvec: Streamvec
    net: torch.nn.Module
    pretrained_path: Path
    base: Model
    shard_bytes: int
    # Builds the network from ``config.hidden`` (DigitsMLP, TwoHeadMLP, DigitsViT).
    model_class: Any = DigitsMLP

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

    def load(self, path: Path) -> Any:
        """A fresh module holding the checkpoint at ``path``."""
        net = self.model_class(self.config.hidden)
        net.load_state_dict(load_checkpoint(path))
        net.eval()
        return net

    def combine(self, output: str, scale: float, *terms: str) -> Any:
        """``streamvec combine --base PRETRAINED`` into ``models/output``; loads it back."""
        path = self.model(output)
        self.streamvec(
            "combine",
            "--base",
            self.pretrained_path,
            "-o",
            path,
            "--scale",
            fmt(scale),
            "--shard-size",
            self.config.shard_size,
            *terms,
        )
        return self.load(path)

    def add_finetune(self, name: str, net: torch.nn.Module, include: Sequence[str] = ()) -> Path:
        """Save a fine-tune as ``models/ft-NAME`` and ``streamvec diff`` it into ``vectors/``.

        ``include``: ``--include`` globs, for a fine-tune that trained only those tensors.
        """
        path = save_checkpoint(
            net.state_dict(),
            self.model(f"ft-{name}"),
            shard_bytes=self.shard_bytes,
            config=model_config(self.config),
        )
        filters = [arg for glob in include for arg in ("--include", glob)]
        self.streamvec("diff", self.pretrained_path, path, "-o", self.vector(name), *filters)
        return path

    def write(self, results: Mapping[str, Any], report: str) -> None:
        """``results.json``, ``results.md`` and ``commands.sh`` (every streamvec command run)."""
        (self.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (self.out / "results.md").write_text(report)
        script = [
            "#!/bin/sh",
            "# The streamvec commands the experiment ran, in order (paths relative to this file).",
            "set -e",
            'cd "$(dirname "$0")"',
            *self.streamvec.commands,
        ]
        (self.out / "commands.sh").write_text("\n".join(script) + "\n")


def runner_flags(config: Config) -> list[str]:
    """Flags appended to every streamvec command.

    An explicit ``--memory-limit``: the default is half of the memory available at the time,
    which on a shared machine can fall below what this process already holds (torch, the
    data), and the run would then be refused for reasons that have nothing to do with it.
    """
    return ["--quiet", "--overwrite", "--scheduler", config.scheduler, "--memory-limit", "2GB"]


def model_config(config: Config) -> dict[str, Any]:
    """The ``config.json`` written next to each checkpoint (streamvec copies it along)."""
    return {"model_type": "streamvec-digits-mlp", "input_size": 64, "hidden_size": config.hidden}


def new_context(
    config: Config, out: Path, data: Digits, pretrained: torch.nn.Module, model_class: Any
) -> Context:
    """Save ``pretrained`` under ``out/models`` and return the context the stages share."""
    from streamvec.units import parse_size

    out = out.resolve()
    for sub in ("models", "vectors", "parts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    shard_bytes = parse_size(config.shard_size)
    pre_path = save_checkpoint(
        pretrained.state_dict(),
        out / "models" / "pretrained",
        shard_bytes=shard_bytes,
        config=model_config(config),
    )
    return Context(
        config=config,
        out=out,
        data=data,
        evaluate=Evaluator(data),
        streamvec=Streamvec(out, runner_flags(config)),
        net=model_class(config.hidden),
        pretrained_path=pre_path,
        base=sv.open(pre_path),
        shard_bytes=shard_bytes,
        model_class=model_class,
    )
