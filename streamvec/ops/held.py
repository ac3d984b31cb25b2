"""Read a whole matrix once, with the digests of its inputs taken on the way.

The SVD commands factor a matrix that fits in memory from one read of its files (the exact
method, and the held randomized passes). ``streamvec svd`` also logs the digests of every
tensor's inputs so that ``--resume`` can refuse an input that changed; taking them in a second
read cost more than the factorization itself (a 0.1B store: 17.5 s of a 29 s run, because the
digest read goes 256 kB at a time and decodes each compressed chunk several times). Here the
operands are read in row blocks, hashed as read and evaluated into the matrix, so the files
are read and decoded once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
import xxhash

from streamvec.io.blocks import ZarrReader, matrix_shape
from streamvec.model.tensor import DEFAULT_BLOCK_BYTES, LazyTensor, row_ranges, rows_per_block

__all__ = ["HeldMatrix", "read_matrix"]


@dataclass(frozen=True)
class HeldMatrix:
    """A tensor's matrix view in memory and the digests of its inputs.

    Attributes:
        name: the tensor's name.
        values: (m, n) array in the tensor's dtype, equal to ``t.read_rows(0, m)``.
        digests: one xxh3-128 hex digest per term, equal to
            :func:`streamvec.engine.jobs.tensor_input_digests` over all rows.
    """

    name: str
    values: np.ndarray
    digests: list[str]


def read_matrix(
    t: LazyTensor, block_bytes: int = DEFAULT_BLOCK_BYTES, out: np.ndarray | None = None
) -> HeldMatrix:
    """Read ``t``'s matrix view whole, in row blocks, digesting its inputs as they are read.

    Each block is evaluated by the tensor's own kernel into its rows of the result, so the
    values are those of one ``t.read_rows(0, m)`` (the kernel is element-wise), and the
    streamed digests equal one digest of all rows (xxh3 streams). Memory: the result plus one
    block of operands.

    Args:
        t: the tensor (>= 2 axes).
        block_bytes: target float32 bytes of a block of rows.
        out: a C-contiguous ``(m, n)`` array of ``t.dtype`` to fill (memory the caller
            reuses from matrix to matrix); None: fresh memory.

    Returns:
        The :class:`HeldMatrix`.

    Example:
        >>> held = read_matrix(tv["model.layers.0.mlp.up_proj.weight"])  # doctest: +SKIP
        >>> held.values.shape, len(held.digests)  # doctest: +SKIP
        ((2752, 1024), 1)
    """
    rows, cols = matrix_shape(t.shape)
    (coef, reader), *more = t.terms
    if t.op is None and not more and coef == 1.0 and _decodes_in_place(reader, t.dtype):
        # A store's task vector as stored: each chunk decoded straight into the matrix. Read
        # in blocks, every block went to fresh memory (its pages faulted in) and was copied
        # into the matrix: about half of a 1B store's `svd` read time.
        matrix = np.empty((rows, cols), t.dtype) if out is None else out
        reader.read_into(0, rows, matrix)
        whole = xxhash.xxh3_128(matrix.reshape(-1).view(np.uint8).data)
        return HeldMatrix(t.name, matrix, [whole.hexdigest()])
    ranges = row_ranges(rows, rows_per_block(t.shape, block_bytes))
    hashes = [xxhash.xxh3_128() for _ in t.terms]
    # (m, n): ``out``, else allocated only when there are several blocks
    values: np.ndarray | None = out
    for r0, r1 in ranges:
        operands = t.read_operands(r0, r1)
        for h, (_, block) in zip(hashes, operands, strict=True):
            h.update(np.ascontiguousarray(block).reshape(-1).view(np.uint8).data)
        (c0, first), *others = operands
        if t.op is None and not others and c0 == 1.0 and first.dtype == t.dtype:
            # The rows as read (another reader's, e.g. an SVD store's): read without a lease,
            # they are this call's own memory, so the kernel's pass-through copy is skipped
            # (0.35 s of a 0.1B store's 3.3 s `svd` before stores were decoded in place).
            rows_i = first.reshape(r1 - r0, cols)
        else:
            rows_i = t.evaluate(operands, r0, r1).reshape(r1 - r0, cols)
        del operands
        if len(ranges) == 1 and values is None:
            values = rows_i  # one block: the kernel's result is the matrix, no copy
        else:
            if values is None:
                values = np.empty((rows, cols), dtype=rows_i.dtype)
            values[r0:r1] = rows_i
    assert values is not None
    return HeldMatrix(t.name, values, [h.hexdigest() for h in hashes])


def _decodes_in_place(reader: object, dtype: np.dtype) -> TypeGuard[ZarrReader]:
    return isinstance(reader, ZarrReader) and reader.dtype == dtype
