"""The layout of a sharded safetensors checkpoint (Hugging Face), computed before any data.

A tensor is a :class:`TensorSpec` (name, dtype, shape). :func:`plan_shards` groups tensors
into shards the way ``save_pretrained`` does, :func:`shard_file_names` and
:func:`index_name` name the files, and :func:`encode_header` lays out one shard's header
byte for byte as the reference implementation does, with each tensor's offsets, so that a
writer can create every file at its final size up front
(:class:`streamvec.io.safetensors.writer.ShardedSafetensorsWriter`).

Example:
    >>> specs = [TensorSpec("w", np.dtype(np.float32), (4, 2))]
    >>> [[s.name for s in shard] for shard in plan_shards(specs, 2**30)]
    [['w']]
    >>> shard_file_names(2)
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
"""

from __future__ import annotations

import json
import math
import operator
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from streamvec.dtypes import safetensors_tag
from streamvec.errors import StreamvecError

INDEX_NAME = "model.safetensors.index.json"
# The reference reader refuses headers over 100 MB; a file it cannot open is useless.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor to be written.

    Args:
        name: tensor name as it will appear in the header (``/`` and ``.`` are fine).
        dtype: numpy dtype; anything :func:`streamvec.dtypes.safetensors_tag` knows.
        shape: tensor shape; ``()`` for a scalar, a 0 anywhere for an empty tensor.

    Example:
        >>> TensorSpec("lm_head.weight", np.dtype("float16"), (32000, 4096)).nbytes
        262144000
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        # Normalize so that specs built from numpy scalars or lists compare and hash sanely.
        try:
            object.__setattr__(self, "dtype", np.dtype(self.dtype))
        except TypeError:
            raise StreamvecError(f"tensor {self.name!r}: {self.dtype!r} is not a dtype") from None
        try:
            shape = tuple(operator.index(d) for d in self.shape)
        except TypeError:
            raise StreamvecError(
                f"tensor {self.name!r}: shape {self.shape!r} is not a tuple of integers"
            ) from None
        if any(d < 0 for d in shape):
            raise StreamvecError(f"tensor {self.name!r}: negative dimension in shape {shape}")
        object.__setattr__(self, "shape", shape)
        if not isinstance(self.name, str):
            raise StreamvecError(f"tensor name {self.name!r} is not a string")
        try:
            safetensors_tag(self.dtype)  # fail now, not after hours of compute
        except StreamvecError as exc:
            raise StreamvecError(f"tensor {self.name!r}: {exc}") from None

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes.

        Returns:
            ``itemsize * prod(shape)`` (``itemsize`` for a 0-d tensor, 0 for an empty one).

        Example:
            >>> TensorSpec("step", np.dtype("int64"), ()).nbytes
            8
        """
        return self.dtype.itemsize * math.prod(self.shape)


def plan_shards(specs: Sequence[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors into shards greedily, in the given order (like transformers).

    A new shard starts when adding the next tensor would take the current one past
    ``shard_size`` bytes; a tensor larger than ``shard_size`` therefore gets a shard of its
    own. Order is kept across and within shards, and no shard is empty.

    Args:
        specs: tensors in the order they should be stored.
        shard_size: maximum bytes of tensor data per shard (headers not counted), > 0.

    Returns:
        The shards, each a non-empty list of specs; ``[]`` for no specs.

    Example:
        >>> [[s.name for s in shard] for shard in plan_shards(specs, 10 * 2**30)]
        [['embed', 'layers.0.w'], ['layers.1.w']]
    """
    if shard_size <= 0:
        raise StreamvecError(f"shard size must be a positive number of bytes, got {shard_size}")
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_size = 0
    for spec in specs:
        if current and current_size + spec.nbytes > shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(spec)
        current_size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(n: int, stem: str = "model") -> list[str]:
    """Hugging Face shard file names for ``n`` shards.

    Args:
        n: number of shards (0 gives ``[]``).
        stem: ``model`` (transformers) or ``diffusion_pytorch_model`` (diffusers).

    Returns:
        ``["model-00001-of-00003.safetensors", ...]``.

    Example:
        >>> shard_file_names(2)
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    if n < 0:
        raise StreamvecError(f"number of shards must be >= 0, got {n}")
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def index_name(stem: str = "model") -> str:
    """The index file name that goes with shards of ``stem`` (``model.safetensors.index.json``)."""
    return f"{stem}.safetensors.index.json"


def encode_header(
    specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[tuple[int, int]]]:
    """The on-disk header of one shard, exactly as the reference implementation lays it out.

    Args:
        specs: the shard's tensors, in storage order.
        metadata: string pairs for ``"__metadata__"``; omitted when empty or ``None``.

    Returns:
        ``(prefix, offsets)``: the 8-byte length plus padded JSON, and each tensor's
        ``(begin, end)`` relative to the data area.

    Example:
        >>> prefix, offsets = encode_header([TensorSpec("w", np.dtype("f4"), (2,))], None)
        >>> offsets
        [(0, 8)]
    """
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    offsets = []
    pos = 0
    for spec in specs:
        offsets.append((pos, pos + spec.nbytes))
        header[spec.name] = {
            "dtype": safetensors_tag(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [pos, pos + spec.nbytes],
        }
        pos += spec.nbytes
    # Compact, non-ASCII kept as UTF-8, padded with spaces to 8 bytes: what serde_json and
    # the reference writer produce, and it keeps the data area 8-byte aligned.
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
