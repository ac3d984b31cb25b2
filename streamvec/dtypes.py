"""Names and numpy types of the element types streamvec reads and writes.

safetensors names dtypes like ``BF16``; users and Zarr speak ``bfloat16``. bf16 has no
numpy builtin, so it goes through ``ml_dtypes`` (about twice as fast as torch at
bf16 -> f32 on this class of machine).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from streamvec.errors import StreamvecError

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# safetensors dtype tag -> numpy dtype. Every tag the format defines that numpy can hold.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": BFLOAT16,
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_TAG_BY_DTYPE = {dt: tag for tag, dt in SAFETENSORS_DTYPES.items()}

# User-facing names (CLI --dtype, store attrs) -> numpy dtype.
OUTPUT_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": BFLOAT16,
    "float64": np.dtype(np.float64),
}

FLOAT_TAGS = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


def round_once(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` correctly rounded to ``dtype`` (round to nearest, ties to even), in one rounding.

    ml_dtypes before 0.7.0 converts float64 to bfloat16 through float32, rounding twice: a
    value just above a bfloat16 tie can become the tie in float32 and then round the wrong way
    (about one element in 65,000 of a random float64 array). Rounding to float32 *to odd*
    first (an inexact result keeps an odd last bit) makes the following round-to-nearest-even
    the correct single rounding, whatever the ml_dtypes version. The torch kernel does the
    same (``streamvec.compute.torch_kernel``).

    Example:
        >>> x = np.array([1 + 2.0**-8 + 2.0**-30])  # just above the tie 1 + 2**-8
        >>> int(round_once(x, BFLOAT16).view(np.uint16)[0])  # rounds up, to 1 + 2**-7
        16257
    """
    dtype = np.dtype(dtype)
    x = np.asarray(x)
    if x.dtype != np.float64 or dtype != BFLOAT16:
        return x.astype(dtype)  # numpy's float64 -> float16 already rounds once
    r = x.astype(np.float32)
    bits = r.view(np.uint32)
    with np.errstate(invalid="ignore"):
        back = r.astype(np.float64)
        # inexact, finite in float32 and even: move one float32 step toward x (NaN != NaN, but
        # a NaN's float32 is not finite)
        fix = (back != x) & np.isfinite(r) & ((bits & 1) == 0)
    if fix.any():
        step = np.where(np.abs(x[fix]) > np.abs(back[fix]), 1, -1).astype(np.int64)
        bits[fix] = (bits[fix].astype(np.int64) + step).astype(np.uint32)
    return r.astype(dtype)


def safetensors_tag(dtype: np.dtype) -> str:
    """The safetensors tag (``"BF16"``...) of a numpy dtype."""
    try:
        return _TAG_BY_DTYPE[np.dtype(dtype)]
    except KeyError:
        raise StreamvecError(f"dtype {dtype} cannot be stored in safetensors") from None


def dtype_name(dtype: np.dtype) -> str:
    """A stable user-facing name: ``bfloat16``, ``float32``, ``int64``..."""
    return "bfloat16" if np.dtype(dtype) == BFLOAT16 else np.dtype(dtype).name


def parse_output_dtype(name: str | None) -> np.dtype | None:
    """Parse a ``--dtype`` value; ``None`` means "keep the default"."""
    if name is None:
        return None
    try:
        return OUTPUT_DTYPES[name.lower()]
    except KeyError:
        choices = ", ".join(OUTPUT_DTYPES)
        raise StreamvecError(f"unknown dtype {name!r}: choose one of {choices}") from None


def is_float(dtype: np.dtype) -> bool:
    """True for the floating-point types task arithmetic applies to (bf16 included)."""
    dt = np.dtype(dtype)
    return dt == BFLOAT16 or dt.kind == "f" or _TAG_BY_DTYPE.get(dt) in FLOAT_TAGS
