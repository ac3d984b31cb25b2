"""The classic experiment's settings (also the defaults the other experiments start from)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from streamvec.engine.into_torch import PAPER_LAMBDAS


def _grid(stop: float, step: float) -> tuple[float, ...]:
    return tuple(round(step * i, 4) for i in range(round(stop / step) + 1))


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
