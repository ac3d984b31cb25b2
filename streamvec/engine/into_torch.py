"""Stream an expression's tensors straight into a ``torch.nn.Module``, in place.

Choosing lambda means evaluating ``base + lambda * tau`` for many lambdas on held-out data;
writing a checkpoint per lambda is wasteful. :func:`load_into` copies each edited tensor into
the module's existing parameters and buffers, block by block (CPU or CUDA), so each lambda
costs one streaming pass and no disk writes. torch is imported only here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from streamvec.dtypes import BFLOAT16
from streamvec.errors import MismatchError
from streamvec.io.blocks import matrix_shape
from streamvec.model.tensor import row_ranges, rows_per_block

if TYPE_CHECKING:
    import torch

    from streamvec.model.algebra import Model


def _to_torch(block: np.ndarray) -> torch.Tensor:
    import torch

    if block.dtype == BFLOAT16:  # torch cannot take ml_dtypes arrays; reinterpret the bits
        return torch.from_numpy(np.ascontiguousarray(block).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(block))


def load_into(module: torch.nn.Module, model: Model, *, strict: bool = True) -> list[str]:
    """Copy every tensor of ``model`` into ``module``'s parameters/buffers of the same name.

    Blocks are computed one at a time and copied into the target (converted to its dtype and
    device), so memory stays at one block beyond the module itself.

    Args:
        module: e.g. a ``transformers`` model loaded from the base checkpoint.
        model: a streamvec expression whose tensor names are the module's state-dict keys.
        strict: require every expression tensor to exist in the module with the same shape.

    Returns:
        The names that were loaded.

    Raises:
        MismatchError: with ``strict``, names or shapes that do not match.

    Example:
        >>> net = AutoModelForCausalLM.from_pretrained("base")  # doctest: +SKIP
        >>> load_into(net, sv.open("base") + 0.3 * sv.open("tau.zarr"))  # doctest: +SKIP
    """
    import torch

    targets = dict(module.state_dict(keep_vars=True))
    loaded = []
    problems = []
    with torch.no_grad():
        for name in model:
            target = targets.get(name)
            lazy = model[name]
            if target is None or tuple(target.shape) != lazy.shape:
                got = "missing" if target is None else f"shape {list(target.shape)}"
                problems.append(f"{name} ({got} in the module, {list(lazy.shape)} in the model)")
                continue
            rows, _ = matrix_shape(lazy.shape)
            flat = target.data.reshape(rows, -1) if lazy.shape else target.data.reshape(1, 1)
            for r0, r1 in row_ranges(rows, rows_per_block(lazy.shape)):
                block = _to_torch(lazy.read_rows(r0, r1))
                flat[r0:r1].copy_(block.reshape(r1 - r0, -1), non_blocking=False)
            loaded.append(name)
    if problems and strict:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise MismatchError(f"the module does not match the model: {shown}")
    return loaded


# 0, 0.05, ..., 1: the grid the task-arithmetic paper scans on held-out data.
PAPER_LAMBDAS = tuple(round(0.05 * i, 2) for i in range(21))


@dataclass(frozen=True)
class SweepResult:
    """Scores per lambda and the best one."""

    scores: tuple[tuple[float, float], ...]
    best_lambda: float
    best_score: float


def sweep(
    module: torch.nn.Module,
    base: Model,
    tau: Model,
    metric: Callable[[torch.nn.Module], float],
    lambdas: Iterable[float] = PAPER_LAMBDAS,
    *,
    maximize: bool = True,
    constraint: Callable[[torch.nn.Module], bool] | None = None,
) -> SweepResult:
    """Evaluate ``base + lambda * tau`` for each lambda by loading it into ``module``.

    Args:
        module: a module with the base's architecture (its weights are overwritten).
        base: the base checkpoint (``sv.open(...)``).
        tau: the edit (a task vector or any combination of them).
        metric: scores the module on held-out data.
        lambdas: values to try (default 0, 0.05, ..., 1 as in the task-arithmetic paper).
        maximize: whether a larger metric is better.
        constraint: optional check a lambda must pass to be chosen (e.g. control accuracy
            within some margin of the base's); lambdas failing it are scored but not picked.

    Returns:
        A :class:`SweepResult`; the module is left holding the *last* lambda's weights.
    """
    scores: list[tuple[float, float]] = []
    best: tuple[float, float] | None = None
    for lam in lambdas:
        load_into(module, base + lam * tau)
        score = float(metric(module))
        scores.append((lam, score))
        allowed = constraint is None or constraint(module)
        better = best is None or (score > best[1] if maximize else score < best[1])
        if allowed and better:
            best = (lam, score)
    if best is None:
        raise MismatchError("no lambda satisfied the constraint; widen the lambdas or relax it")
    return SweepResult(tuple(scores), best[0], best[1])


def state_dict_of(model: Model, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Materialise (small) expressions as a torch state dict, e.g. for tests."""
    return {n: _to_torch(model[n].compute()) for n in (names or list(model))}
