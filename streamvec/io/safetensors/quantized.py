"""Quantized checkpoints: which ones streamvec can read, and a clear refusal for the rest.

Two signals say a checkpoint is quantized: ``quantization_config`` in its ``config.json``
(``quant_method``: ``fp8``, ``fbgemm_fp8``, ``gptq``, ``awq``, ``bitsandbytes``,
``compressed-tensors``...) and the tensor names the formats use (``qweight``/``qzeros`` for
GPTQ and AWQ, ``SCB`` and ``absmax`` for bitsandbytes, ``weight_packed`` for
compressed-tensors). FP8 weights with their scales are read dequantized (see
:mod:`streamvec.io.safetensors.fp8`); every other format is refused with the tensor and the format
named,
because arithmetic on packed integers or on 8-bit numbers with separate scales gives a wrong
model, and passing them through from the base would drop the fine-tune's edit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamvec.errors import StreamvecError
from streamvec.io.blocks import FileStamp, SafetensorsReader
from streamvec.io.safetensors.fp8 import FP8_DTYPES, Fp8Reader, Fp8Scheme, infer_scheme
from streamvec.io.safetensors.header import TensorInfo


class QuantizationError(StreamvecError):
    """A checkpoint is quantized in a format streamvec cannot compute with."""


# quant_method values whose weights streamvec dequantizes (FP8 with float scales).
FP8_METHODS = ("fp8", "fbgemm_fp8")
# Tensor-name endings that only quantized formats use, and the format they mean.
QUANTIZED_NAME_ENDINGS = {
    ".qweight": "GPTQ/AWQ packed int4",
    ".qzeros": "GPTQ/AWQ packed int4",
    ".g_idx": "GPTQ",
    ".SCB": "bitsandbytes int8",
    ".weight_format": "bitsandbytes int8",
    ".absmax": "bitsandbytes 4-bit",
    ".quant_map": "bitsandbytes 4-bit",
    ".nested_absmax": "bitsandbytes 4-bit",
    ".quant_state.bitsandbytes__nf4": "bitsandbytes nf4",
    ".quant_state.bitsandbytes__fp4": "bitsandbytes fp4",
    ".weight_packed": "compressed-tensors packed int",
    ".weight_zero_point": "compressed-tensors int",
}
# Calibrated activation scales (static FP8 activation schemes): not weights, and not
# recomputable from the weights.
ACTIVATION_SCALE_ENDINGS = (".input_scale", ".activation_scale")
SCALE_SUFFIXES = ("_scale_inv", "_scale")


@dataclass(frozen=True)
class QuantizationInfo:
    """What a checkpoint's ``config.json`` says about quantization.

    Attributes:
        method: ``quant_method`` (``""`` when the checkpoint is not declared quantized).
        block: ``weight_block_size`` of a block-scaled FP8 checkpoint.
        config: the whole ``quantization_config``.
    """

    method: str = ""
    block: tuple[int, int] | None = None
    config: dict[str, Any] | None = None


def read_quantization_info(root: Path) -> QuantizationInfo:
    """The ``quantization_config`` of the ``config.json`` in ``root``, if any."""
    config_path = root / "config.json"
    if not config_path.is_file():
        return QuantizationInfo()
    try:
        doc = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return QuantizationInfo()  # not ours to validate; tensor names still decide
    qc = doc.get("quantization_config") if isinstance(doc, dict) else None
    if not isinstance(qc, dict):
        qc = doc.get("compression_config") if isinstance(doc, dict) else None
    if not isinstance(qc, dict):
        return QuantizationInfo()
    method = str(qc.get("quant_method", "unknown"))
    raw_block = qc.get("weight_block_size")
    block = None
    if (
        isinstance(raw_block, list)
        and len(raw_block) == 2
        and all(isinstance(b, int) for b in raw_block)
    ):
        block = (int(raw_block[0]), int(raw_block[1]))
    return QuantizationInfo(method, block, qc)


def _refuse(where: str, tensor: str, fmt: str) -> QuantizationError:
    return QuantizationError(
        f"{where}: tensor {tensor!r} is quantized ({fmt}), which streamvec cannot dequantize; "
        "use the unquantized (bf16/fp16) release, or dequantize it first, e.g. with "
        "transformers' from_pretrained(...).dequantize() then save_pretrained"
    )


def _scale_of(name: str, tensors: dict[str, TensorInfo]) -> TensorInfo | None:
    for suffix in SCALE_SUFFIXES:
        scale = tensors.get(name + suffix)
        if scale is not None:
            return scale
    return None


def quantized_tensors(
    root: Path,
    tensors: dict[str, TensorInfo],
    label: str,
    stamps: Mapping[Path, FileStamp | None] | None = None,
) -> tuple[dict[str, Fp8Reader], set[str], QuantizationInfo]:
    """Find the FP8 weights of a checkpoint and refuse formats streamvec cannot read.

    Args:
        root: the checkpoint directory (where ``config.json`` is).
        tensors: every tensor of the checkpoint.
        label: the checkpoint as the user named it, for messages.
        stamps: each shard's version when its header was read (readers refuse others).

    Returns:
        ``(fp8, scales, info)``: a dequantizing reader per FP8 weight that has a scale, the
        names of those scale tensors (never operands), and the config's declaration.

    Raises:
        QuantizationError: the checkpoint holds a format streamvec cannot dequantize (named
            with its first such tensor), or an FP8 scale whose shape fits no known layout.
    """
    info = read_quantization_info(root)
    for name in tensors:
        for ending, fmt in QUANTIZED_NAME_ENDINGS.items():
            if name.endswith(ending):
                raise _refuse(label, name, fmt)
    if info.method and info.method not in FP8_METHODS:
        # Under a method whose conventions streamvec does not know, any integer or 8-bit
        # float tensor may be a quantized weight. A checkpoint holding none (a dequantized
        # model whose config kept the entry) has nothing to dequantize.
        first = next(
            (
                n
                for n, t in tensors.items()
                if t.dtype in FP8_DTYPES or not _is_float_dtype(t.dtype)
            ),
            None,
        )
        if first is not None:
            raise _refuse(label, first, f"quantization_config.quant_method {info.method!r}")
    fp8: dict[str, Fp8Reader] = {}
    scales: set[str] = set()
    for name, t in tensors.items():
        if t.dtype not in FP8_DTYPES:
            continue
        scale = _scale_of(name, tensors)
        if scale is None:
            continue  # a plain float8 tensor (scale 1): read as it is
        scheme = infer_scheme(t.shape, t.dtype, scale.name, scale.shape, scale.dtype, info.block)
        if scheme is None or not _is_float_dtype(scale.dtype):
            raise QuantizationError(
                f"{label}: FP8 tensor {name!r} {list(t.shape)} has scale {scale.name!r} of "
                f"shape {list(scale.shape)} ({scale.dtype}), which fits no known layout (one "
                "scale, one per row, or one per weight_block_size tile); streamvec cannot "
                "dequantize it"
            )
        stamp = (stamps or {}).get
        weight_reader = SafetensorsReader(str(t.path), t.offset, t.shape, t.dtype, stamp(t.path))
        scale_reader = SafetensorsReader(
            str(scale.path), scale.offset, scale.shape, scale.dtype, stamp(scale.path)
        )
        fp8[name] = Fp8Reader(weight_reader, scale_reader, scheme)
        scales.add(scale.name)
    if fp8:
        for name in tensors:
            if name.endswith(ACTIVATION_SCALE_ENDINGS):
                raise QuantizationError(
                    f"{label}: tensor {name!r} is a calibrated FP8 activation scale (static "
                    "activation scheme), which cannot be recomputed from the weights; "
                    "streamvec reads FP8 checkpoints with dynamic activation scales only"
                )
    return fp8, scales, info


def _is_float_dtype(dtype: np.dtype) -> bool:
    from streamvec.dtypes import is_float

    return is_float(dtype)


__all__ = [
    "FP8_METHODS",
    "Fp8Scheme",
    "QuantizationError",
    "QuantizationInfo",
    "quantized_tensors",
    "read_quantization_info",
]
