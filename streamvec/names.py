"""Tensor-name filters and the encoding of tensor names as Zarr array paths."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote

from streamvec.errors import StreamvecError

REGEX_PREFIX = "re:"
# Names with a meaning inside a Zarr group folder (and streamvec's temporaries).
RESERVED_PATHS = frozenset({"zarr.json", ".zattrs", ".zgroup", ".zarray", ".zmetadata", "c"})


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    if pattern.startswith(REGEX_PREFIX):
        try:
            return re.compile(pattern[len(REGEX_PREFIX) :])
        except re.error as exc:
            raise StreamvecError(f"bad regular expression {pattern!r}: {exc}") from None
    return re.compile(fnmatch.translate(pattern))


@dataclass(frozen=True)
class NameFilter:
    """Which tensors an operation touches.

    A name passes when it matches at least one ``include`` pattern (or there are none) and
    no ``exclude`` pattern. Patterns are shell globs matched against the whole name
    (``*.self_attn.*_proj.weight``), or regular expressions when written ``re:...``
    (searched anywhere in the name: ``re:layers\\.(0|1)\\.``).

    Example:
        >>> f = NameFilter(include=("*.self_attn.*",), exclude=("*.o_proj.*",))
        >>> f("model.layers.0.self_attn.q_proj.weight"), f("model.layers.0.self_attn.o_proj.weight")
        (True, False)
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # Further filters a name must also pass: how two filters intersect.
    also: tuple[NameFilter, ...] = ()

    def __post_init__(self) -> None:
        for p in (*self.include, *self.exclude):
            _compile(p)  # fail early on a bad regex

    def __call__(self, name: str) -> bool:
        def hit(p: str) -> bool:
            rx = _compile(p)
            return bool(rx.search(name) if p.startswith(REGEX_PREFIX) else rx.match(name))

        if self.include and not any(hit(p) for p in self.include):
            return False
        if any(hit(p) for p in self.exclude):
            return False
        return all(f(name) for f in self.also)

    def __and__(self, other: NameFilter) -> NameFilter:
        return NameFilter(also=(self, other))

    @classmethod
    def from_patterns(
        cls, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
    ) -> NameFilter | None:
        """A filter, or ``None`` when no pattern is given (everything passes)."""
        inc, exc = tuple(include or ()), tuple(exclude or ())
        return cls(inc, exc) if inc or exc else None

    def describe(self) -> str:
        """A short human description, e.g. ``include ['*.q_proj.*']``."""
        parts = [f"include {list(self.include)}"] if self.include else []
        parts += [f"exclude {list(self.exclude)}"] if self.exclude else []
        parts += [f"({f.describe()})" for f in self.also]
        return " and ".join(parts) or "all"


def combine_filters(a: NameFilter | None, b: NameFilter | None) -> NameFilter | None:
    """The intersection of two optional filters (``None`` passes everything)."""
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def encode_array_path(name: str) -> str:
    """The Zarr array path of a tensor name: ``%`` and ``/`` percent-encoded.

    A leading ``__`` (reserved by Zarr v3), names made only of dots, and names Zarr or
    streamvec give a meaning to inside a store folder (``zarr.json``, the v2 metadata names,
    ``c``) get their first character encoded: the array path
    differs, and the ``name`` attr keeps the real name.

    Example:
        >>> encode_array_path("model.layers.0.w"), encode_array_path("zarr.json")
        ('model.layers.0.w', '%7Aarr.json')
    """
    encoded = quote(name, safe="".join(c for c in map(chr, range(32, 127)) if c not in "%/"))
    if encoded.startswith("__"):
        encoded = "%5F" + encoded[1:]
    if set(encoded) <= {"."}:
        encoded = encoded.replace(".", "%2E")
    if encoded in RESERVED_PATHS:
        encoded = f"%{ord(encoded[0]):02X}{encoded[1:]}"
    return encoded


def decode_array_path(path: str) -> str:
    """Inverse of :func:`encode_array_path`."""
    return unquote(path)
