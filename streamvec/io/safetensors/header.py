"""Parse and fully validate a safetensors header before any byte of data is mapped.

The format: an 8-byte little-endian length N, N bytes of UTF-8 JSON, then the data area.
The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the data area) plus an optional ``"__metadata__"`` of string pairs. A file from the
internet is untrusted: every field is checked, and nothing is allocated beyond the header size,
which is itself bounded by the file size and by :data:`MAX_HEADER_BYTES`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamvec.dtypes import SAFETENSORS_DTYPES
from streamvec.errors import HeaderError

# The reference implementation refuses headers over 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000
# Tensor ranks above this are not model weights; refusing them bounds the work per entry.
MAX_RANK = 16


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to read it without opening anything else.

    Attributes:
        name: tensor name as stored.
        dtype: numpy dtype (bf16 through ml_dtypes).
        shape: tensor shape.
        path: the shard file.
        offset: absolute byte offset of the tensor's first element in ``path``.
        nbytes: size of the tensor's data in bytes.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def tag(self) -> str:
        """The safetensors dtype tag, e.g. ``"BF16"``."""
        return next(t for t, d in SAFETENSORS_DTYPES.items() if d == self.dtype)


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in data-offset order, plus the free-form metadata."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(value: Any) -> bool:
    # JSON booleans parse as Python bools, which are ints; a shape of [true] is not a shape.
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(name: str, entry: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    if not isinstance(entry, dict):
        raise HeaderError(f"tensor {name!r}: entry is not a JSON object")
    unknown = set(entry) - {"dtype", "shape", "data_offsets"}
    missing = {"dtype", "shape", "data_offsets"} - set(entry)
    if missing:
        raise HeaderError(f"tensor {name!r}: missing field(s) {sorted(missing)}")
    if unknown:
        raise HeaderError(f"tensor {name!r}: unknown field(s) {sorted(unknown)}")
    tag = entry["dtype"]
    if not isinstance(tag, str) or tag not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        raise HeaderError(f"tensor {name!r}: unknown dtype {tag!r} (known: {known})")
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise HeaderError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} ints")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise HeaderError(f"tensor {name!r}: shape {shape} has a negative or non-integer size")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise HeaderError(f"tensor {name!r}: data_offsets must be two non-negative integers")
    begin, end = offsets
    dtype = SAFETENSORS_DTYPES[tag]
    # Python ints do not overflow; compare the exact product with the declared span.
    expected = math.prod(shape) * dtype.itemsize
    if end < begin or end - begin != expected:
        raise HeaderError(
            f"tensor {name!r}: data_offsets {offsets} span {end - begin} bytes but "
            f"shape {shape} of {tag} needs {expected}"
        )
    return dtype, tuple(shape), begin, end


def parse_header(raw: bytes, data_size: int, path: Path) -> Header:
    """Validate header JSON bytes against a data area of ``data_size`` bytes.

    Args:
        raw: the header bytes (without the 8-byte length prefix).
        data_size: bytes in the file after the header.
        path: the file, for messages and for the returned :class:`TensorInfo` entries.

    Returns:
        The validated :class:`Header`.

    Raises:
        HeaderError: on any inconsistency, naming the tensor and the problem.
    """
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except HeaderError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HeaderError(f"header is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise HeaderError("header is not a JSON object")
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderError("__metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    spans: list[tuple[int, int, str, np.dtype, tuple[int, ...]]] = []
    for name, entry in doc.items():
        if not name:
            raise HeaderError("a tensor has an empty name")
        dtype, shape, begin, end = _parse_entry(name, entry)
        spans.append((begin, end, name, dtype, shape))
    spans.sort(key=lambda s: (s[0], s[1]))
    cursor = 0
    tensors: dict[str, TensorInfo] = {}
    for begin, end, name, dtype, shape in spans:
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
            raise HeaderError(f"tensor {name!r}: data_offsets [{begin}, {end}] {what}")
        if end > data_size:
            raise HeaderError(
                f"tensor {name!r}: data ends at byte {end} but the data area holds "
                f"{data_size} (file truncated?)"
            )
        cursor = end
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    if cursor != data_size:
        raise HeaderError(
            f"data area holds {data_size} bytes but tensors cover {cursor} (trailing bytes or "
            "truncated file)"
        )
    return Header(path=path, tensors=tensors, metadata=metadata, data_start=data_start)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of a ``.safetensors`` file; reads the header bytes only.

    Args:
        path: the file.

    Returns:
        The validated :class:`Header`.

    Raises:
        HeaderError: the file is not a valid safetensors file (message names the file).

    Example:
        >>> hdr = read_header("model-00001-of-00002.safetensors")  # doctest: +SKIP
        >>> hdr.tensors["model.norm.weight"].shape  # doctest: +SKIP
        (4096,)
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise HeaderError(f"{p}: {size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise HeaderError(
                    f"{p}: header length {n} is beyond the file's {size} bytes (truncated or "
                    "not a safetensors file)"
                )
            if n > MAX_HEADER_BYTES:
                raise HeaderError(f"{p}: header length {n} exceeds {MAX_HEADER_BYTES} bytes")
            raw = f.read(n)
    except IsADirectoryError:
        raise HeaderError(f"{p}: is a directory, expected a .safetensors file") from None
    except OSError as exc:
        raise HeaderError(f"{p}: cannot read ({exc.strerror})") from None
    if len(raw) != n:
        raise HeaderError(f"{p}: file shrank while reading its header")
    try:
        return parse_header(raw, size - 8 - n, p)
    except HeaderError as exc:
        if str(exc).startswith(str(p)):
            raise
        raise HeaderError(f"{p}: {exc}") from None
