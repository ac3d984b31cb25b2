"""The page cache: warm, or cold (the inputs evicted before every timed read), checked with mincore.

The page cache is warm by default (the read roofline after one warm-up read). With ``cold``,
the inputs are evicted before every engine run and every read-roofline measurement, by
``/proc/sys/vm/drop_caches`` where writing it is permitted, else by
``posix_fadvise(POSIX_FADV_DONTNEED)`` per input file; ``mincore`` then checks how much of the
inputs is still cached, and a record is labelled cold only if that is at most 5%.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import mmap
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamvec.errors import StreamvecError

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# A cold measurement may find at most this fraction of its inputs still cached after a drop.
COLD_RESIDENT_MAX = 0.05
WARM = "warm"


def _drop_all_caches() -> bool:
    """Drop the whole page cache (needs root and a writable /proc/sys); False if refused."""
    os.sync()  # only clean pages are dropped
    try:
        DROP_CACHES.write_text("1")
    except OSError:
        return False
    return True


def _fadvise_dontneed(files: Sequence[Path]) -> None:
    """Ask the kernel to drop the files' clean, unmapped pages (no root needed)."""
    os.sync()  # dirty pages would stay
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise StreamvecError(f"--cold: posix_fadvise failed on {f}: {exc}") from None
        finally:
            os.close(fd)


@functools.cache
def _libc() -> Any:
    """libc with mmap/mincore/munmap typed for ctypes; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _cached_pages(libc: Any, path: Path, page: int) -> int | None:
    """Pages of ``path`` in the page cache (mincore on a fresh map, which faults nothing in)."""
    import numpy as np

    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)  # the mapping outlives the descriptor
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    try:
        vec = (ctypes.c_ubyte * -(-size // page))()
        if libc.mincore(addr, size, vec) != 0:
            return None
        # Only bit 0 of each byte is defined: page resident.
        return int(np.count_nonzero(np.frombuffer(bytes(vec), dtype=np.uint8) & 1))
    finally:
        libc.munmap(addr, size)


def resident_fraction(files: Sequence[Path]) -> float | None:
    """Fraction of the files' pages now in the page cache; None where it cannot be told."""
    libc = _libc()
    if libc is None:
        return None
    page = mmap.PAGESIZE
    pages = cached = 0
    for f in files:
        n = _cached_pages(libc, f, page)
        if n is None:
            return None
        cached += n
        pages += -(-f.stat().st_size // page)
    return cached / pages if pages else 0.0


class PageCache:
    """Warm (inputs left in the page cache) or cold (evicted before each timed read).

    ``method`` is None when warm, else ``"drop_caches"`` or ``"fadvise"``.
    """

    def __init__(self, method: str | None = None) -> None:
        self.method = method

    @classmethod
    def cold(cls) -> PageCache:
        """The first eviction method this machine permits (drop_caches is tried by doing it).

        Raises:
            StreamvecError: neither method is available: a cold measurement cannot be made.
        """
        if _drop_all_caches():
            return cls("drop_caches")
        if hasattr(os, "posix_fadvise"):
            return cls("fadvise")
        raise StreamvecError(
            f"--cold: cannot drop the page cache here (writing {DROP_CACHES} is not permitted "
            "and os.posix_fadvise is unavailable); run without --cold"
        )

    @property
    def is_cold(self) -> bool:
        return self.method is not None

    def setting(self) -> str:
        """The mode asked for, before any check: ``warm`` or ``cold (METHOD)``."""
        return f"cold ({self.method})" if self.method else WARM

    def drop(self, files: Sequence[Path]) -> float | None:
        """Evict ``files`` when cold; the fraction still cached right after (None: warm).

        Raises:
            StreamvecError: the method worked when chosen and fails now.
        """
        if self.method is None:
            return None
        gc.collect()  # in-process runs: release maps of inputs the engine no longer holds
        if self.method == "drop_caches":
            if not _drop_all_caches():
                raise StreamvecError(f"--cold: writing {DROP_CACHES} stopped being permitted")
        else:
            _fadvise_dontneed(files)
        return resident_fraction(files)

    def label(self, resident: float | None) -> str:
        """What a record may claim, given the most of its inputs found cached after a drop."""
        if self.method is None:
            return WARM
        if resident is not None and resident > COLD_RESIDENT_MAX:
            return f"not cold ({self.method} left {resident:.0%} of the inputs cached)"
        return f"cold ({self.method})"
