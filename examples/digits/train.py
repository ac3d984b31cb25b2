"""The model, deterministic training, pre-training and fine-tuning."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from .config import Config
from .data import ALL_DIGITS, CONTROL, Digits, Task, stable_seed, task_arrays


class DigitsMLP(torch.nn.Module):
    """64 -> hidden -> hidden -> 10, ReLU. Tensor names: fc1.*, fc2.*, head.*."""

    n_outputs = 10

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TwoHeadMLP(DigitsMLP):
    """:class:`DigitsMLP` with a second, 2-way head (``head2.*``) for a label task.

    Outputs the 10 digit logits then the 2 label logits. ``head2`` is created last, so the
    trunk and digit head start from the same weights as a :class:`DigitsMLP` of that seed.
    """

    n_outputs = 12

    def __init__(self, hidden: int = 256) -> None:
        super().__init__(hidden)
        self.head2 = torch.nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return torch.cat([self.head(h), self.head2(h)], dim=1)


def class_mask(classes: Sequence[int], n_outputs: int = 10) -> torch.Tensor:
    """0 on the task's classes, -inf elsewhere: added to logits, restricts the head."""
    mask = torch.full((n_outputs,), float("-inf"))
    mask[list(classes)] = 0.0
    return mask


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
    net: Any,
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
    """Mini-batch training with cross-entropy over the classes ``digits`` (others masked)."""
    params = [p for n, p in net.named_parameters() if not (freeze_head and n.startswith("head."))]
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    mask = class_mask(digits, net.n_outputs)
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


def pretrain(
    config: Config, data: Digits, model: Callable[[int], torch.nn.Module] = DigitsMLP
) -> Any:
    """Upright training digits plus ``exposure`` of the training images in each exposure view.

    ``model(config.hidden)`` builds the network (a :class:`DigitsMLP` by default). Only the
    digit head is trained: a :class:`TwoHeadMLP`'s label head keeps its random
    initialisation (the pre-trained model has no label task).
    """
    torch.manual_seed(stable_seed(config.seed, "init"))
    net = model(config.hidden)
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


def finetune(
    config: Config,
    data: Digits,
    pretrained: DigitsMLP,
    task: Task,
    arrays: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DigitsMLP:
    """A copy of the pre-trained model fine-tuned on ``task``; the digit head stays frozen.

    A label task trains its own head (``head2``) with the trunk. ``arrays`` replaces the
    task's training images and classes (e.g. a poisoned training set).
    """
    net = copy.deepcopy(pretrained)
    x, y = task_arrays(data, task, "train") if arrays is None else arrays
    train(
        net,
        x,
        y,
        epochs=config.finetune_epochs,
        lr=config.finetune_lr,
        seed=stable_seed(config.seed, f"finetune-{task.name}"),
        batch_size=config.batch_size,
        optimizer="sgd",
        digits=task.classes,
        freeze_head=True,
    )
    return net
