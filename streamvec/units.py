"""Parsing and printing sizes and counts.

Numbers are parsed into exact Decimals (floats would make "1.1GB" inexact).
"""

from __future__ import annotations

import re
from decimal import Decimal

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
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")


def _parse_scaled(text: str | int, units: dict[str, int], what: str, forms: str) -> Decimal:
    """Parse ``<number><unit>`` into an exact Decimal (floats would make "1.1GB" inexact)."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise StreamvecError(f"invalid {what} {text!r}: expected {forms}")
    if isinstance(text, int):
        value = Decimal(text)
    else:
        match = _NUMBER_UNIT.fullmatch(text.lower())
        if match is None or match.group(2) not in units:
            raise StreamvecError(f"invalid {what} {text!r}: expected {forms}")
        value = Decimal(match.group(1)) * units[match.group(2)]
    if value < 0:
        raise StreamvecError(f"invalid {what} {text!r}: must not be negative")
    return value


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``"5GB"``, ``"512MiB"`` or ``1048576``.

    Decimal units (``kB``/``K``, ``MB``/``M``, ``GB``/``G``, ``TB``/``T``) are powers of 1000,
    binary units (``KiB``, ``MiB``, ``GiB``, ``TiB``) powers of 1024, ``B`` or no unit means
    bytes. Units are case-insensitive, the number may have a fraction (``"1.5GB"``).

    Args:
        text: the size as text, or a plain non-negative number of bytes.

    Returns:
        The size in bytes.

    Raises:
        StreamvecError: the text is not a size or is not a whole number of bytes.

    Example::

        >>> parse_size("512MiB"), parse_size("1.5GB"), parse_size(100)
        (536870912, 1500000000, 100)
    """
    forms = "a byte count like 1000000, 100MB, 1.5GB or 512MiB (units B, kB, MB, GB, TB, KiB..TiB)"
    value = _parse_scaled(text, _SIZE_UNITS, "size", forms)
    if value != value.to_integral_value():
        raise StreamvecError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def parse_param_count(text: str | int) -> int:
    """Parse a parameter count such as ``"0.1B"``, ``"300M"``, ``"2.5k"`` or ``7_000_000``.

    Suffixes (case-insensitive): ``k`` thousand, ``M`` million, ``B`` billion, ``T`` trillion.
    Fractional results are rounded to the nearest whole parameter.

    Args:
        text: the count as text, or a plain positive int.

    Returns:
        The number of parameters (at least 1).

    Raises:
        StreamvecError: the text is not a count, or it is zero.

    Example::

        >>> parse_param_count("0.1B"), parse_param_count("2.5k")
        (100000000, 2500)
    """
    forms = "a parameter count like 300M, 0.1B, 1B, 2.5k or 1000000"
    count = int(_parse_scaled(text, _COUNT_UNITS, "parameter count", forms).to_integral_value())
    if count < 1:
        raise StreamvecError(f"invalid parameter count {text!r}: must be at least 1")
    return count


def format_bytes(n: float) -> str:
    """``1.5 GB`` style (powers of 10, as disks and throughput are quoted)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
