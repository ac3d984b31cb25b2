"""Model outputs of FP8 bases: keep the base's format, re-quantized with fresh scales.

An edited model keeps each tensor's base dtype; for an FP8 weight that means FP8 with a
scale tensor of the base's layout. A weight the edit does not change is copied as stored
(8-bit numbers and scales, bit for bit); a changed one is computed in float32 from the
dequantized inputs and re-quantized as it is written
(:class:`~streamvec.io.safetensors.fp8.Fp8BlockWriter`).
With an explicit ``--dtype`` the output is dequantized instead and the scales are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from streamvec.io.blocks import BlockReader, matrix_shape
from streamvec.io.safetensors.fp8 import FP8_DTYPES, Fp8Reader
from streamvec.model.tensor import LazyTensor, row_ranges


def fp8_outputs(
    name: str,
    base_reader: BlockReader,
    shape: tuple[int, ...],
    terms: tuple[tuple[float, BlockReader], ...],
    points: tuple[bool, ...] = (),
) -> dict[str, LazyTensor] | None:
    """The output tensors of an FP8 base weight in a model kept in the base's format.

    Args:
        name: the weight's name.
        base_reader: the base's reader for it.
        shape: its shape.
        terms: the collapsed weighted sum that computes it.
        points: per term, whether it is a checkpoint (the kernel's delta form).

    Returns:
        ``{name: weight, scale_name: scale}`` for an unchanged weight (copied as stored),
        ``{name: weight to re-quantize}`` for a changed one, or None when the base weight is
        not FP8 with scales.
    """
    if not isinstance(base_reader, Fp8Reader):
        return None
    scheme = base_reader.scheme
    if terms == ((1.0, base_reader),):
        return {
            name: LazyTensor(name, shape, scheme.fp8, ((1.0, base_reader.weight),)),
            scheme.scale_name: LazyTensor(
                scheme.scale_name,
                scheme.scale_shape,
                scheme.scale_dtype,
                ((1.0, base_reader.scale),),
            ),
        }
    return {
        name: LazyTensor(name, shape, np.dtype(np.float32), terms, points=points, requantize=scheme)
    }


def tensor_amax(t: LazyTensor, block_rows: int) -> float:
    """Max-abs of a whole tensor, computed block by block (a per-tensor scale needs it first).

    This is one extra pass over the tensor's inputs, in the calling thread; only FP8 weights
    with a single per-tensor scale need it.
    """
    rows, _ = matrix_shape(t.shape)
    amax = 0.0
    for r0, r1 in row_ranges(rows, block_rows):
        block = t.read_rows(r0, r1)
        if block.size:
            amax = max(amax, float(np.abs(block).max()))
    return amax


def aligned_rows(rows: int, most: int, align: int) -> int:
    """Rows per block: a multiple of ``align`` (whole scale tiles), at most ``most`` if it can."""
    if rows <= most:
        return max(rows, 1)
    return max(align, (most // align) * align)


def strip_quantization_config(config_path: Path) -> None:
    """Remove ``quantization_config`` from a copied ``config.json`` (dequantized outputs)."""
    try:
        doc = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(doc, dict) or "quantization_config" not in doc:
        return
    del doc["quantization_config"]
    config_path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def has_fp8(dtypes: list[np.dtype]) -> bool:
    """True if any stored dtype is an 8-bit float (the output stays quantized)."""
    return any(np.dtype(d) in FP8_DTYPES for d in dtypes)
