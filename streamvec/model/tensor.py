"""A lazy tensor: one output tensor described as a weighted sum of row-block readers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from streamvec.compute.kernel import BlockOp, Kernel, apply_op, combine_blocks
from streamvec.io.blocks import BlockReader, matrix_shape, read_block
from streamvec.io.read_buffers import BufferLease

if TYPE_CHECKING:
    from streamvec.io.safetensors.fp8 import Fp8Scheme

# Row blocks target this many bytes of float32 work when nothing else decides: large enough
# that per-task overhead is noise, small enough that many fit in memory at once.
DEFAULT_BLOCK_BYTES = 32 << 20


def rows_per_block(shape: tuple[int, ...], block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so a float32 block of this tensor is about ``block_bytes``."""
    rows, cols = matrix_shape(shape)
    return max(1, min(rows, block_bytes // (4 * max(cols, 1))))


def row_ranges(rows: int, block_rows: int) -> list[tuple[int, int]]:
    """``[(0, b), (b, 2b), ...]`` covering ``rows`` (one empty range for zero rows)."""
    if rows == 0:
        return [(0, 0)]
    return [(r, min(r + block_rows, rows)) for r in range(0, rows, block_rows)]


@dataclass(frozen=True)
class LazyTensor:
    """One tensor of a lazy model: nothing is read until a block is asked for.

    Attributes:
        name: tensor name.
        shape: tensor shape.
        dtype: dtype of the result.
        terms: (coefficient, reader) pairs; the value is ``sum(c * upcast(x))`` rounded once
            to ``dtype``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    terms: tuple[tuple[float, BlockReader], ...]
    # A non-linear block operation replacing the weighted sum (merge methods); None: the sum.
    op: BlockOp | None = None
    # Per term, whether it is a checkpoint: the sum is then evaluated in the delta form
    # relative to the first of them (see streamvec.compute.kernel); empty: no term is.
    points: tuple[bool, ...] = ()
    # Stored as FP8 with fresh scales of this layout (the float32 result is re-quantized
    # when written); None: stored as ``dtype``.
    requantize: Fp8Scheme | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the result."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def input_nbytes(self) -> int:
        """Bytes read from the inputs to compute the whole tensor."""
        n = math.prod(self.shape)
        return sum(n * np.dtype(r.dtype).itemsize for _, r in self.terms)

    def astype(self, dtype: np.dtype) -> LazyTensor:
        """The same tensor rounded to another dtype (stored as that dtype, not re-quantized)."""
        return LazyTensor(self.name, self.shape, np.dtype(dtype), self.terms, self.op, self.points)

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` as a ``(r1 - r0, cols)`` array."""
        return self.evaluate(self.read_operands(r0, r1), r0, r1)

    def read_operands(
        self, r0: int, r1: int, lease: BufferLease | None = None
    ) -> list[tuple[float, np.ndarray]]:
        """Every term's rows ``[r0, r1)`` as stored, with its coefficient (the read stage).

        ``lease``: safetensors rows are read into buffers borrowed from a run's pool, valid
        until the lease is closed.
        """
        return [(c, read_block(reader, r0, r1, lease)) for c, reader in self.terms]

    def evaluate(
        self,
        operands: Sequence[tuple[float, np.ndarray]],
        r0: int,
        r1: int,
        kernel: Kernel | None = None,
        lease: BufferLease | None = None,
    ) -> np.ndarray:
        """Rows ``[r0, r1)`` from operands read by :meth:`read_operands` (the compute stage).

        ``kernel`` runs the weighted sum elsewhere (``--device cuda``); non-linear operations
        (merge methods) always run here on the CPU, upcasting their operands into maps
        borrowed from ``lease`` when given (the result is then valid until it is closed).
        """
        if self.op is not None:
            return apply_op(self.op, self.name, operands, r0, r1, self.dtype, lease)
        if kernel is not None:
            return kernel(operands, self.dtype, self.points)
        return combine_blocks(operands, self.dtype, self.points)

    def compute(self) -> np.ndarray:
        """The whole tensor in memory (for small tensors and tests)."""
        rows, _ = matrix_shape(self.shape)
        return self.read_rows(0, rows).reshape(self.shape)

    def to_dask(self, block_rows: int | None = None):  # -> dask.array.Array
        """A ``dask.array`` of this tensor chunked in row blocks along axis 0.

        Each chunk is one task that reads its rows from every input and combines them, so
        computing the array streams through the inputs.

        Example:
            >>> tv = sv.open("ft") - sv.open("base")  # doctest: +SKIP
            >>> tv["model.norm.weight"].to_dask().sum().compute()  # doctest: +SKIP
        """
        import dask.array as da
        from dask.base import tokenize

        rows, _ = matrix_shape(self.shape)
        block_rows = block_rows or rows_per_block(self.shape)
        name = "streamvec-" + tokenize(
            self.name, self.shape, str(self.dtype), self.terms, self.op, self.points, block_rows
        )  # requantize is left out: to_dask gives the float32 values, not the stored bytes
        graph: dict[tuple[Any, ...], tuple[Any, ...]]
        if not self.shape:
            graph = {(name,): (_scalar_block, self)}
            return da.Array(graph, name, chunks=(), dtype=self.dtype)
        ranges = row_ranges(rows, block_rows)
        tail = self.shape[1:]
        zeros = (0,) * len(tail)
        graph = {(name, i, *zeros): (_row_block, self, r0, r1) for i, (r0, r1) in enumerate(ranges)}
        chunks = (tuple(r1 - r0 for r0, r1 in ranges), *((d,) for d in tail))
        return da.Array(graph, name, chunks=chunks, dtype=self.dtype)


def _row_block(t: LazyTensor, r0: int, r1: int) -> np.ndarray:
    return t.read_rows(r0, r1).reshape((r1 - r0, *t.shape[1:]))


def _scalar_block(t: LazyTensor) -> np.ndarray:
    return t.read_rows(0, 1).reshape(())
