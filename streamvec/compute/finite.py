"""The finite check every output block gets: NaN or inf is never written silently.

A block is checked right after it is computed, while it is still warm in the cache. The
common case (all finite) takes one cheap pass: the float sum of a block is finite only if
every element is (a NaN or an inf poisons the sum; a sum that overflows is rechecked
exactly), and 16-bit blocks are tested on their exponent bits without conversion. Only a
block that fails is examined element by element, and only then are its inputs looked at, to
say whether the NaN/inf came with them or was made by the arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from streamvec.dtypes import BFLOAT16, is_float
from streamvec.errors import StreamvecError

# Bit patterns of 16-bit floats whose exponent is all ones (inf or NaN): positive ones are
# at least this as int16, negative ones at least ``0x8000 | this`` as uint16.
_EXPONENT_ALL_ONES = {BFLOAT16: 0x7F80, np.dtype(np.float16): 0x7C00}
_SLAB = 1 << 16  # elements per slab of the 16-bit test: both reductions read it from cache


class NonFiniteError(StreamvecError):
    """A result holds NaN or infinite values (nothing was written under the output name)."""


def _maybe_nonfinite(block: np.ndarray) -> bool:
    """False only if every element is finite; True may be a false alarm (sum overflow)."""
    dt = block.dtype
    flat = block.reshape(-1)
    if flat.size == 0:
        return False
    ones = _EXPONENT_ALL_ONES.get(dt)
    if ones is not None:
        # Two reductions and no temporary: a negative inf/NaN is the largest as uint16, a
        # positive one the largest as int16 (cheaper than masking the exponent first).
        unsigned, signed = flat.view(np.uint16), flat.view(np.int16)
        for s0 in range(0, flat.size, _SLAB):
            if unsigned[s0 : s0 + _SLAB].max() >= 0x8000 | ones:
                return True
            if signed[s0 : s0 + _SLAB].max() >= ones:
                return True
        return False
    if dt.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum is rechecked
            return not bool(np.isfinite(np.add.reduce(flat)))
    return True  # float8 and others: the exact test below is cheap enough for them


def nonfinite_rows(block: np.ndarray) -> tuple[int, int]:
    """Count the NaN/inf values of a ``(rows, cols)`` block.

    Args:
        block: a computed block of any dtype (integer and bool blocks are always finite).

    Returns:
        ``(count, first_row)``: how many elements are NaN or infinite, and the first row
        (relative to the block) holding one; ``(0, -1)`` when all are finite.
    """
    if not is_float(block.dtype) or not _maybe_nonfinite(block):
        return 0, -1
    finite = np.isfinite(block.astype(np.float32, copy=False))
    if finite.all():
        return 0, -1
    bad_rows = np.flatnonzero(~finite.all(axis=1))
    return int((~finite).sum()), int(bad_rows[0])


def nonfinite_inputs(paths: Sequence[str], operands: Sequence[np.ndarray]) -> str:
    """The inputs (by file) whose rows already hold NaN/inf, ``", "``-joined; ``""`` if none."""
    found = [p for p, x in zip(paths, operands, strict=True) if nonfinite_rows(x)[0]]
    return ", ".join(dict.fromkeys(found))


def raise_if_nonfinite(bad: dict[str, tuple[int, int, str]]) -> None:
    """Raise one :class:`NonFiniteError` for every tensor with NaN/inf values.

    Args:
        bad: tensor name -> (count, first row, inputs that already held NaN/inf there).
    """
    if not bad:
        return
    parts = []
    for name, (count, first, inputs) in list(bad.items())[:5]:
        origin = (
            f"the input {inputs} already holds NaN/inf there"
            if inputs
            else "every input was finite: the arithmetic overflowed the output dtype"
        )
        parts.append(f"{name}: {count} values, first at row {first} ({origin})")
    more = f"; and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
    if any(inputs for _, _, inputs in bad.values()):
        fix = "repair the input or leave the tensor out with --exclude"
    else:
        fix = "use smaller weights or --scale, or a wider --dtype such as float32"
    raise NonFiniteError(
        f"NaN or infinite values in the result, nothing written: {'; '.join(parts)}{more}; "
        f"{fix}, or pass --no-check-finite to write the values anyway"
    )
