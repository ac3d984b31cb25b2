"""The digits, their views and tasks, and the train/val/test splits."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

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
LABEL_CLASSES = (10, 11)


def view(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The view called ``name``; ``a+b`` applies view ``a``, then ``b`` (e.g. ``mirror+faded``)."""
    steps = [VIEWS[part] for part in name.split("+")]

    def apply(x: np.ndarray) -> np.ndarray:
        for step in steps:
            x = step(x)
        return x

    return apply


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
    # "digit": the 10-way digit head (logits 0-9); "shift": the same head, every label moved
    # to the next digit (9 -> 0), a corruption of the labels. A label task ("parity":
    # even/odd, "high": digit > 4) has a head of its own, logits 10-11 of a two-head model.
    label: str = "digit"

    @property
    def classes(self) -> tuple[int, ...]:
        """The logits this task is scored on."""
        return self.digits if self.label in ("digit", "shift") else LABEL_CLASSES

    def targets(self, digits: np.ndarray) -> np.ndarray:
        """The class index of each image from its digit."""
        if self.label == "digit":
            return digits
        if self.label == "shift":
            return (digits + 1) % 10
        if self.label == "parity":
            return LABEL_CLASSES[0] + digits % 2
        if self.label == "high":
            return LABEL_CLASSES[0] + (digits > 4).astype(digits.dtype)
        raise ValueError(f"unknown label task {self.label!r}: expected digit, parity or high")


CONTROL = Task("upright", "upright")


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
    x = np.ascontiguousarray(view(task.view)(data.images[idx]), dtype=np.float32)
    y = task.targets(data.labels[idx])
    return torch.from_numpy(x.reshape(len(idx), 64)), torch.from_numpy(y)


def stable_seed(seed: int, name: str) -> int:
    """A per-purpose seed that does not shift when other tasks are added or removed."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)
