"""Integer and bool tensors: no arithmetic, and never a silently dropped change.

Task arithmetic applies to floating-point weights. Integer and bool tensors (position ids,
masks, counters, int8 weights without a known scale convention) pass through from the base
when every checkpoint agrees on them. When a fine-tune changed one, taking the base's value
would drop that edit without a word, so it is an error naming the tensor unless the user
chooses (``--int-tensors``):

- ``error`` (default): refuse, naming the tensor, the two checkpoints and the first row;
- ``base``: keep the base's value (the fine-tune's change is dropped, knowingly);
- ``finetune``: take the fine-tunes' value wherever one differs from the base; two
  fine-tunes that changed the same element to different values are still an error.

Checking costs a read of the tensor in every checkpoint (done block by block inside the
run for model outputs, and before the run for task vectors, which store no such tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from streamvec.dtypes import dtype_name
from streamvec.errors import MismatchError
from streamvec.io.blocks import BlockReader, matrix_shape

IntPolicy = Literal["error", "base", "finetune"]
INT_POLICIES: tuple[IntPolicy, ...] = ("error", "base", "finetune")


class NonFloatChangedError(MismatchError):
    """A fine-tune changed an integer or bool tensor and no --int-tensors policy was given."""


@dataclass(frozen=True)
class NonFloatReader:
    """Rows of a non-float tensor, checked across checkpoints under a policy (picklable).

    Attributes:
        name: the tensor's name (for messages).
        base: the base's reader.
        base_label: the base as the user named it.
        others: ``(label, reader)`` of every other checkpoint of the expression.
        policy: what to do where they differ.
    """

    name: str
    base: BlockReader
    base_label: str
    others: tuple[tuple[str, BlockReader], ...]
    policy: IntPolicy = "error"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def path(self) -> str:
        return str(getattr(self.base, "path", self.base_label))

    def read(self, r0: int, r1: int) -> np.ndarray:
        base = self.base.read(r0, r1)
        if self.policy == "base":
            return base
        out = base
        taken: np.ndarray | None = None  # where a fine-tune's value was taken
        for label, reader in self.others:
            other = reader.read(r0, r1)
            if _same_bytes(base, other):
                continue
            differ = other != base
            if not differ.any():
                continue
            if self.policy == "error":
                raise self._changed(label, r0 + int(np.flatnonzero(differ.any(axis=1))[0]))
            if out is base:
                out, taken = base.copy(), np.zeros(base.shape, bool)
            assert taken is not None
            clash = taken & differ & (out != other)
            if clash.any():
                row = r0 + int(np.flatnonzero(clash.any(axis=1))[0])
                raise NonFloatChangedError(
                    f"tensor {self.name!r} ({dtype_name(self.dtype)}): two fine-tunes changed "
                    f"the same element to different values (first at row {row}, {label} is "
                    "one); --int-tensors finetune cannot choose: use --int-tensors base, or "
                    "leave one of them out with --exclude"
                )
            out[differ] = other[differ]
            taken |= differ
        return out

    def _changed(self, label: str, row: int) -> NonFloatChangedError:
        return NonFloatChangedError(
            f"tensor {self.name!r} ({dtype_name(self.dtype)}) differs between the base "
            f"{self.base_label} and {label} (first at row {row}); integer and bool tensors "
            "take no arithmetic, and keeping the base's would drop the change: pass "
            "--int-tensors base to keep the base's value or --int-tensors finetune to take "
            "the fine-tune's"
        )


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality, 8 bytes at a time where the layout allows (3x faster)."""
    if a.nbytes % 8 == 0 and a.flags.c_contiguous and b.flags.c_contiguous:
        return not bool((a.reshape(-1).view(np.uint64) != b.reshape(-1).view(np.uint64)).any())
    return bool(np.array_equal(a, b))


def check_unchanged(readers: Sequence[NonFloatReader], block_elements: int = 1 << 22) -> None:
    """Read every row of each tensor under its policy (raises where ``error`` forbids a change).

    For task vectors, which leave non-float tensors out: a change there would otherwise be
    lost without a word when the task vector is added back to a base.
    """
    for r in readers:
        if r.policy != "error":
            continue
        rows, cols = matrix_shape(r.shape)
        step = max(1, block_elements // max(cols, 1))
        for r0 in range(0, rows, step):
            r.read(r0, min(rows, r0 + step))
