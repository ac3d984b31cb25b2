"""Counter-based random numbers: the same draw for an element whatever the block partition.

A randomised merge (DARE, DELLA) draws one uniform per element of each task vector. The draw
of an element depends only on ``(seed, tensor name, model index, purpose)`` (hashed into a
128-bit Philox key) and on the element's flat (C-order) index in the tensor (the position in
the Philox stream), never on which block or worker computes it: rows ``[0, r)`` then ``[r, n)``
give exactly the draws of ``[0, n)``. Results are therefore identical for any scheduler, worker
count or memory budget.

Each 64-bit Philox output gives two 32-bit uniforms (low half first), so element ``j`` reads
output ``j // 2``; Philox4x64 produces four outputs per counter value, so the stream for
elements ``[s, e)`` starts at counter ``(s // 2) // 4``. A keep decision ``u < p`` compares the
32-bit integer with ``p * 2**32``: probabilities are resolved to 2^-32.
"""

from __future__ import annotations

import hashlib

import numpy as np

# Purposes mixed into keys so two randomised decisions never share a stream.
PURPOSE_DROP = "drop"

_U32 = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


def philox_key(seed: int, name: str, model: int, purpose: str = PURPOSE_DROP) -> tuple[int, int]:
    """The 128-bit Philox key of one tensor of one model, as two 64-bit integers.

    Example:
        >>> philox_key(0, "w", 0) == philox_key(0, "w", 0) != philox_key(1, "w", 0)
        True
    """
    text = f"streamvec-merge\0{int(seed)}\0{name}\0{int(model)}\0{purpose}".encode()
    digest = hashlib.blake2b(text, digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def uniform_u32(key: tuple[int, int], start: int, count: int) -> np.ndarray:
    """32-bit uniform integers for flat element indices ``[start, start + count)``.

    Args:
        key: from :func:`philox_key`.
        start: flat index of the first element.
        count: number of elements.

    Returns:
        ``uint32`` array of ``count`` draws; element ``j`` always gets the same draw.

    Example:
        >>> k = philox_key(0, "w", 0)
        >>> bool((np.concatenate([uniform_u32(k, 0, 5), uniform_u32(k, 5, 6)])
        ...       == uniform_u32(k, 0, 11)).all())
        True
    """
    if count <= 0:
        return np.empty(0, np.uint32)
    first = start // 2  # first 64-bit output needed
    last = (start + count - 1) // 2
    skip = first % 4  # outputs before `first` in its 4-output counter block
    gen = np.random.Philox(
        key=np.array(key, dtype=np.uint64),
        counter=np.array([first // 4, 0, 0, 0], dtype=np.uint64),
    )
    raw = gen.random_raw(last - first + 1 + skip)[skip:]
    # Interleave halves explicitly (not a byte view) so the stream is endian-independent.
    halves = np.empty(2 * raw.size, np.uint32)
    halves[0::2] = raw & _U32
    halves[1::2] = raw >> _SHIFT
    offset = start - 2 * first
    return halves[offset : offset + count]


def keep_threshold(probability: float) -> int:
    """The integer ``t`` with ``P(u32 < t) = probability`` (to 2^-32), clamped to [0, 2^32].

    Example:
        >>> keep_threshold(0.5), keep_threshold(1.0), keep_threshold(-1.0)
        (2147483648, 4294967296, 0)
    """
    return int(min(max(round(float(probability) * 2.0**32), 0), 2**32))
