"""Parsing and printing sizes and counts."""

from __future__ import annotations

import re

from streamvec.errors import StreamvecError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"`` (10^9), ``"512MiB"`` (2^20), ``"1.5G"`` or a plain integer.

    Example:
        >>> parse_size("5GB"), parse_size("512MiB"), parse_size(100)
        (5000000000, 536870912, 100)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise StreamvecError(f"size {text} is negative")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise StreamvecError(
            f"cannot read size {text!r}: write e.g. 5GB, 512MB, 8GiB or a number of bytes"
        )
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def format_bytes(n: float) -> str:
    """``1.5 GB`` style (powers of 10, as disks and throughput are quoted)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
