"""Row-block readers of what a PEFT LoRA adapter stands for, without a dense matrix.

A LoRA target's task vector is ``scaling * B @ A`` (``B`` out x r, ``A`` r x in), or its
transpose for layers whose weight is stored (in, out) (GPT-2's ``Conv1D``, PEFT's
``fan_in_fan_out``) and for embeddings (PEFT's ``lora_embedding_A`` is r x num_embeddings,
``lora_embedding_B`` dim x r, and the update is ``(B @ A).T``). Either way the tensor is a
product ``L @ R`` of a tall ``L`` (rows, k) and a wide ``R`` (k, cols), the same shape of
problem as :class:`~streamvec.io.zarr.lowrank.LowRankReader`'s ``U S Vh``: each read forms only the
requested rows, in float64, rounded once to float32.

:class:`DifferenceReader` reads ``a - b`` row by row: a tensor an adapter saves whole
(``modules_to_save``) stands for its value minus the base's.

Like every :class:`~streamvec.io.blocks.BlockReader` these hold paths and offsets only.

**Working set.** A read holds more than the rows it returns: the factors in float64, the
float64 product slab, the operands of a sum or difference (and what the readers inside them
hold, such as the 8-bit rows of an FP8 weight). Each reader says how much, for the engine's
block planner: ``resident_bytes_per_element`` (bytes per element of the block, beyond the
rows returned) and ``resident_bytes`` (bytes whatever the block size: whole factors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streamvec.io.blocks import BlockReader, SafetensorsReader, matrix_shape
from streamvec.io.zarr.lowrank import SLAB_ELEMENTS

# float32 rows read, plus their float64 copy: what a factor costs while it is converted.
_FACTOR_BYTES = 4 + 8


def held_by(*readers: BlockReader) -> tuple[int, int]:
    """``(per element, fixed)`` bytes that reads of ``readers`` hold beyond their rows.

    Readers that declare nothing (plain file readers) hold nothing more.
    """
    per = sum(int(getattr(r, "resident_bytes_per_element", 0)) for r in readers)
    fixed = sum(int(getattr(r, "resident_bytes", 0)) for r in readers)
    return per, fixed


__all__ = ["DifferenceReader", "LoraProductReader", "SumReader", "held_by"]


@dataclass(frozen=True)
class LoraProductReader:
    """Rows ``[r0, r1)`` of ``scale * B @ A`` (or of its transpose) from an adapter file.

    Attributes:
        a: reader of ``A`` (k, in) as stored in the adapter file.
        b: reader of ``B`` (out, k).
        scale: PEFT's scaling of this target (``alpha / r``, or ``alpha / sqrt(r)``).
        transpose: True when the task vector is ``(B @ A).T`` (fan_in_fan_out, embeddings).
        shape: the task vector's shape (the checkpoint tensor's).
        dtype: dtype of the rows returned (float32).

    Example:
        >>> r = LoraProductReader(a, b, 2.0, False, (4096, 4096))  # doctest: +SKIP
        >>> r.read(0, 512).shape  # doctest: +SKIP
        (512, 4096)
    """

    a: SafetensorsReader
    b: SafetensorsReader
    scale: float
    transpose: bool
    shape: tuple[int, ...]
    dtype: np.dtype = field(default=np.dtype(np.float32))

    @property
    def rank(self) -> int:
        """``k``, the adapter rank of this target."""
        return int(self.a.shape[0])

    @property
    def resident_bytes_per_element(self) -> int:
        """Bytes per element of a block beyond its float32 rows.

        The float64 product slab (at most a block's rows, 8 bytes each) and the block's
        rows of the tall factor (b x k: read, float64, scaled), spread over the columns.
        """
        _, cols = matrix_shape(self.shape)
        return 8 + -(-(_FACTOR_BYTES + 8) * self.rank // max(cols, 1))

    @property
    def resident_bytes(self) -> int:
        """Bytes a read holds whatever its size: the wide factor in float32 and float64.

        Transposed (embeddings, Conv1D), the whole of ``A`` is read too, to slice its columns.
        """
        rows, cols = matrix_shape(self.shape)
        wide = _FACTOR_BYTES * self.rank * cols
        return wide + (_FACTOR_BYTES * self.rank * rows if self.transpose else 0)

    def factors(
        self, r0: int | None = None, r1: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(L[r0:r1], R)`` in float64 with ``tensor = L @ R`` and the scale folded into ``L``.

        Args:
            r0: first row of the tensor (default 0).
            r1: one past the last row (default all rows).

        Returns:
            ``L`` rows (r1 - r0, k) and ``R`` (k, cols), float64.
        """
        rows, _ = matrix_shape(self.shape)
        r0 = 0 if r0 is None else r0
        r1 = rows if r1 is None else r1
        k = self.rank
        if self.transpose:
            # tensor = scale * A.T @ B.T: rows of the tensor are columns of A.
            a = self.a.read(0, k).astype(np.float64)  # (k, rows)
            left = self.scale * a[:, r0:r1].T  # (b, k)
            right = self.b.read(0, self.b.shape[0]).astype(np.float64).T  # (k, cols)
        else:
            left = self.scale * self.b.read(r0, r1).astype(np.float64)  # (b, k)
            right = self.a.read(0, k).astype(np.float64)  # (k, cols)
        return left, right

    def read(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of the ``(rows, cols)`` matrix view, as float32.

        Raises:
            IndexError: the range is outside the tensor.
        """
        rows, cols = matrix_shape(self.shape)
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"rows [{r0}, {r1}) outside 0..{rows}")
        out = np.empty((r1 - r0, cols), self.dtype)
        if r1 == r0:
            return out
        left, right = self.factors(r0, r1)
        step = max(1, SLAB_ELEMENTS // max(cols, 1))
        for s in range(0, r1 - r0, step):
            e = min(s + step, r1 - r0)
            out[s:e] = left[s:e] @ right  # float64 product, one rounding
        return out


@dataclass(frozen=True)
class DifferenceReader:
    """Rows of ``a - b`` in float32, each operand upcast before subtracting.

    Attributes:
        a: the minuend (e.g. a tensor an adapter saves whole).
        b: the subtrahend (the base's tensor).
    """

    a: BlockReader
    b: BlockReader
    dtype: np.dtype = field(default=np.dtype(np.float32))

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape."""
        return self.a.shape

    @property
    def resident_bytes_per_element(self) -> int:
        """Both operands as read and as float32 copies, and what their readers hold."""
        per, _ = held_by(self.a, self.b)
        return self.a.dtype.itemsize + self.b.dtype.itemsize + 8 + per

    @property
    def resident_bytes(self) -> int:
        """What the operands' readers hold whatever the block size."""
        return held_by(self.a, self.b)[1]

    def read(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of ``a - b``."""
        return self.a.read(r0, r1).astype(np.float32) - self.b.read(r0, r1).astype(np.float32)


@dataclass(frozen=True)
class SumReader:
    """Rows of ``model + delta`` in float32: a checkpoint tensor with an adapter applied.

    Used for mergekit's ``MODEL+LORA`` entries, which stand for the checkpoint with the adapter
    merged in.

    Attributes:
        model: the checkpoint tensor.
        delta: the adapter's task vector of it.
    """

    model: BlockReader
    delta: BlockReader
    dtype: np.dtype = field(default=np.dtype(np.float32))

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape."""
        return self.model.shape

    @property
    def resident_bytes_per_element(self) -> int:
        """The model's rows as read and as float32, the delta's rows, and what both hold."""
        per, _ = held_by(self.model, self.delta)
        return self.model.dtype.itemsize + 4 + self.delta.dtype.itemsize + per

    @property
    def resident_bytes(self) -> int:
        """What the operands' readers hold whatever the block size."""
        return held_by(self.model, self.delta)[1]

    def read(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of ``model + delta``."""
        return self.model.read(r0, r1).astype(np.float32) + self.delta.read(r0, r1)
