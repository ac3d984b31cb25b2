"""FP8 weights with scales: read them dequantized, write them re-quantized.

An FP8 checkpoint stores a weight ``W`` as 8-bit floats ``q`` (``F8_E4M3`` or ``F8_E5M2``)
next to a float scale tensor ``s``; the real weight is ``q.float() * s`` with ``s`` broadcast
over one of three layouts:

- **block** (DeepSeek-V3, Qwen3-FP8: ``NAME_scale_inv``, shape ``ceil(m/bm) x ceil(n/bn)``,
  one scale per ``bm x bn`` tile, 128 x 128 in every release seen);
- **channel** (FBGEMM FP8: ``NAME_scale``, shape ``(m, 1)``, one scale per output row);
- **tensor** (one scale, shape ``()`` or ``(1,)``).

Arithmetic on the stored 8-bit numbers is meaningless when two checkpoints have different
scales, so :class:`Fp8Reader` hands the engine float32 rows, dequantized block by block, and
the scale tensors are never operands. An output in the base's format is re-quantized by
:class:`Fp8BlockWriter` with freshly computed scales of the base's layout: ``amax / fp8_max``
per tile (or row, or tensor), as the quantizers in transformers compute them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np

from streamvec.io.blocks import SafetensorsReader, matrix_shape
from streamvec.io.writeback import write_at

Granularity = Literal["block", "channel", "tensor"]

FLOAT8_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
FLOAT8_E5M2 = np.dtype(ml_dtypes.float8_e5m2)
FP8_DTYPES = (FLOAT8_E4M3, FLOAT8_E5M2)
FP8_MAX = {FLOAT8_E4M3: 448.0, FLOAT8_E5M2: 57344.0}


@dataclass(frozen=True)
class Fp8Scheme:
    """How one FP8 weight is stored: its 8-bit type and the layout of its scale tensor.

    Attributes:
        fp8: ``float8_e4m3fn`` or ``float8_e5m2``.
        scale_name: the scale tensor's name (``...weight_scale_inv`` or ``...weight_scale``).
        scale_shape: the scale tensor's shape.
        scale_dtype: the scale tensor's dtype (float32 in the releases seen).
        granularity: ``block``, ``channel`` or ``tensor``.
        block: ``(bm, bn)`` tile of a block layout; ``(1, cols)`` for channel, the whole
            matrix for tensor.
    """

    fp8: np.dtype
    scale_name: str
    scale_shape: tuple[int, ...]
    scale_dtype: np.dtype
    granularity: Granularity
    block: tuple[int, int]

    @property
    def row_align(self) -> int:
        """Row blocks must start on a multiple of this so each covers whole scale tiles."""
        return self.block[0] if self.granularity == "block" else 1


def infer_scheme(
    weight_shape: tuple[int, ...],
    fp8: np.dtype,
    scale_name: str,
    scale_shape: tuple[int, ...],
    scale_dtype: np.dtype,
    block: tuple[int, int] | None,
) -> Fp8Scheme | None:
    """The layout a scale tensor's shape implies for a weight, or None if none fits.

    Args:
        weight_shape: the FP8 weight's shape (2-D for a layout other than per tensor).
        fp8: the weight's 8-bit type.
        scale_name: name of the scale tensor.
        scale_shape: its shape.
        scale_dtype: its dtype.
        block: the tile from ``quantization_config.weight_block_size`` (default 128 x 128).

    Returns:
        The scheme, or None when the shapes fit no layout.
    """
    if int(np.prod(scale_shape, dtype=np.int64)) == 1 and len(scale_shape) <= 2:
        rows, cols = matrix_shape(weight_shape)
        return Fp8Scheme(fp8, scale_name, scale_shape, scale_dtype, "tensor", (rows, cols))
    if len(weight_shape) != 2:
        return None
    m, n = weight_shape
    if scale_shape in ((m, 1), (m,)):
        return Fp8Scheme(fp8, scale_name, scale_shape, scale_dtype, "channel", (1, n))
    bm, bn = block or (128, 128)
    if scale_shape == (-(-m // bm), -(-n // bn)):
        return Fp8Scheme(fp8, scale_name, scale_shape, scale_dtype, "block", (bm, bn))
    return None


def _scale_rows(scheme: Fp8Scheme, scale: np.ndarray, rows: int) -> np.ndarray:
    """A per-tensor or per-channel scale as a ``(1, 1)`` or ``(rows, 1)`` float32 array."""
    s = scale.astype(np.float32, copy=False)
    return s.reshape(1, 1) if scheme.granularity == "tensor" else s.reshape(rows, 1)


def scale_row_range(scheme: Fp8Scheme, r0: int, r1: int) -> tuple[int, int]:
    """Rows of the scale tensor that rows ``[r0, r1)`` of the weight use."""
    if scheme.granularity == "tensor":
        return 0, matrix_shape(scheme.scale_shape)[0]
    if scheme.granularity == "channel":
        return r0, r1
    bm = scheme.block[0]
    return r0 // bm, -(-r1 // bm) if r1 > r0 else r0 // bm


def dequantize_rows(
    scheme: Fp8Scheme, q: np.ndarray, scale: np.ndarray, r0: int, r1: int
) -> np.ndarray:
    """``q.float() * scale`` for rows ``[r0, r1)``: float32, one rounding per element.

    Args:
        scheme: the layout.
        q: the stored rows, ``(r1 - r0, cols)`` of an FP8 dtype.
        scale: the scale tensor's rows :func:`scale_row_range` names.
        r0: first weight row.
        r1: end row.

    Returns:
        ``(r1 - r0, cols)`` float32.
    """
    rows, cols = q.shape
    out = q.astype(np.float32)
    if rows == 0:
        return out
    if scheme.granularity == "block":
        bm, bn = scheme.block
        s = np.repeat(scale.astype(np.float32, copy=False), bm, axis=0)[r0 - (r0 // bm) * bm :]
        s = s[:rows]  # (rows, tiles)
        full = cols // bn
        if full:
            # Broadcast each tile's scale over its bn columns through a view: no (rows, cols)
            # temporary of scales.
            view = out[:, : full * bn].reshape(rows, full, bn)
            np.multiply(view, s[:, :full, None], out=view)
        if full * bn < cols:
            np.multiply(out[:, full * bn :], s[:, full : full + 1], out=out[:, full * bn :])
        return out
    np.multiply(out, _scale_rows(scheme, scale, rows), out=out)
    return out


def quantize_rows(
    scheme: Fp8Scheme, x: np.ndarray, r0: int, tensor_amax: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Re-quantize float rows with fresh scales of ``scheme``'s layout.

    The scale of a tile (row, tensor) is ``amax / fp8_max`` (1 for an all-zero tile, so
    zeros stay exact), and ``q = round(x / scale)`` saturates at ``+-fp8_max``: the same
    convention as transformers' FP8 quantizers, so the result loads in their FP8 path.

    Args:
        scheme: the layout to write.
        x: ``(rows, cols)`` float rows starting at weight row ``r0`` (a multiple of
            ``scheme.row_align``).
        r0: first row.
        tensor_amax: the whole tensor's max-abs (per-tensor layout only).

    Returns:
        ``(q, scale_rows)``: the FP8 rows and the scale tensor's rows for them.
    """
    fp8_max = FP8_MAX[scheme.fp8]
    rows, cols = x.shape
    x32 = x.astype(np.float32, copy=False)
    if scheme.granularity == "tensor":
        amax = np.float32(tensor_amax if tensor_amax is not None else np.abs(x32).max(initial=0))
        scale = np.where(amax > 0, amax / np.float32(fp8_max), np.float32(1)).astype(np.float32)
        scale_rows = scale.reshape(scheme.scale_shape)
        s_full = scale.reshape(1, 1)
    elif scheme.granularity == "channel":
        amax = np.abs(x32).max(axis=1, initial=0)  # (rows,)
        scale = np.where(amax > 0, amax / np.float32(fp8_max), np.float32(1)).astype(np.float32)
        scale_rows = scale.reshape((rows, 1) if len(scheme.scale_shape) == 2 else (rows,))
        s_full = scale.reshape(rows, 1)
    else:
        if r0 % scheme.block[0]:
            raise ValueError(f"block-scaled rows must start on a tile boundary, not row {r0}")
        bm, bn = scheme.block
        tr, tc = -(-rows // bm), -(-cols // bn)
        tiles = np.zeros((tr * bm, tc * bn), np.float32)  # zero padding leaves amax alone
        tiles[:rows, :cols] = x32
        view = tiles.reshape(tr, bm, tc, bn)
        amax = np.abs(view).max(axis=(1, 3))  # (tr, tc)
        scale = np.where(amax > 0, amax / np.float32(fp8_max), np.float32(1)).astype(np.float32)
        np.divide(view, scale[:, None, :, None], out=view)
        np.clip(tiles, -fp8_max, fp8_max, out=tiles)
        q = tiles[:rows, :cols].astype(scheme.fp8)
        return q, scale.astype(scheme.scale_dtype, copy=False)
    scaled = x32 / s_full
    np.clip(scaled, -fp8_max, fp8_max, out=scaled)
    q = scaled.astype(scheme.fp8)
    return q, scale_rows.astype(scheme.scale_dtype, copy=False)


@dataclass(frozen=True)
class Fp8Reader:
    """Rows of an FP8 weight, dequantized with its scales to float32 (picklable).

    Attributes:
        weight: the stored 8-bit rows.
        scale: the scale tensor.
        scheme: the layout.
    """

    weight: SafetensorsReader
    scale: SafetensorsReader
    scheme: Fp8Scheme
    # Beyond the float32 rows it returns, a read holds the 8-bit rows it dequantizes.
    resident_bytes_per_element = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def path(self) -> str:
        return self.weight.path

    @property
    def offset(self) -> int:
        return self.weight.offset

    def read(self, r0: int, r1: int) -> np.ndarray:
        q = self.weight.read(r0, r1)
        s0, s1 = scale_row_range(self.scheme, r0, r1)
        scale = self.scale.read(s0, s1)
        return dequantize_rows(self.scheme, q, scale, r0, r1)

    def prefetch(self, r0: int, r1: int) -> None:
        self.weight.prefetch(r0, r1)


@dataclass(frozen=True)
class Fp8BlockWriter:
    """Writes float rows of one weight as FP8 plus the rows of its fresh scale tensor.

    Blocks start on tile boundaries (the engine aligns them), so each block's scales are
    complete. After writing, ``block`` holds the values as stored (``q * scale``, what
    :class:`Fp8Reader` reads back), so the checksum the engine records is of what a reader
    gets, and ``streamvec verify`` recomputes it from the files.
    """

    path: str
    offset: int
    row_bytes: int
    scale_path: str
    scale_offset: int
    scale_row_bytes: int
    scheme: Fp8Scheme
    tensor_amax: float | None = None

    def write(self, r0: int, block: np.ndarray) -> float:
        import time

        started = time.perf_counter()
        q, scale_rows = quantize_rows(self.scheme, block, r0, self.tensor_amax)
        s0, _ = scale_row_range(self.scheme, r0, r0 + block.shape[0])
        decoded = dequantize_rows(self.scheme, q, scale_rows, r0, r0 + block.shape[0])
        encoding = time.perf_counter() - started
        write_at(self.path, self.offset + r0 * self.row_bytes, q)
        if self.scheme.granularity != "tensor" or r0 == 0:
            write_at(self.scale_path, self.scale_offset + s0 * self.scale_row_bytes, scale_rows)
        np.copyto(block, decoded, casting="unsafe")
        return encoding
