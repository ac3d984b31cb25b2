"""Reusable anonymous buffers for block reads, shared by the worker threads of one run.

A block read with ``pread`` needs somewhere to put the bytes. A fresh anonymous map per block
gives its memory back to the system at once, but each of its pages is zeroed and faulted in
on every read: reading into fresh maps took 5-6x the time of reading into memory that was
already mapped (docs/benchmarks.md). A run reads blocks of the same few sizes over and over,
so it keeps the maps it has used and reads the next blocks into them: the pages are faulted
once per run, and the memory held is what the run held at its busiest, never more.

A :class:`ReadBuffers` pool belongs to one run and travels with its block tasks. Pickled (to
another process or a cluster worker) it arrives empty, so each process has its own.
"""

from __future__ import annotations

import math
import mmap
import threading
from types import TracebackType

import numpy as np

_ANON_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)

# Sizes are rounded up to this, so blocks that differ by a few rows share buffers.
GRANULE = 64 << 10


def anonymous_map(nbytes: int) -> mmap.mmap:
    """A fresh private anonymous map of ``nbytes`` (at least 1), its pages faulted in now.

    Not the heap: a freed map goes back to the system at once, where malloc's per-thread
    arenas kept ~10 MB more resident under a tight budget; MAP_POPULATE faults its pages in
    one call (docs/reliability.md).
    """
    return mmap.mmap(-1, max(nbytes, 1), flags=_ANON_FLAGS)


class ReadBuffers:
    """A pool of anonymous maps that block reads borrow through a :class:`BufferLease`.

    The pool never holds more maps than were borrowed at the same time: when no free map is
    large enough for a request, one free map is dropped before a larger one is made.

    Example:
        >>> pool = ReadBuffers()
        >>> with pool.lease() as lease:
        ...     area = lease.take(1000)  # read into it; done with it when the block is
        >>> len(pool)
        1
    """

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Free maps held."""
        return len(self._free)

    def __reduce__(self) -> tuple[type[ReadBuffers], tuple[()]]:
        return (ReadBuffers, ())  # maps do not travel: another process starts empty

    def lease(self) -> BufferLease:
        """A lease for one block task: the maps it takes come back when it is closed."""
        return BufferLease(self)

    def _take(self, nbytes: int) -> mmap.mmap:
        with self._lock:
            fits = [m for m in self._free if len(m) >= nbytes]
            if fits:
                area = min(fits, key=len)
                self._free.remove(area)
                return area
            if self._free:
                # none is large enough: drop the largest, so the count stays bounded
                self._free.remove(max(self._free, key=len))
        return anonymous_map(-(-nbytes // GRANULE) * GRANULE)

    def _give(self, areas: list[mmap.mmap]) -> None:
        with self._lock:
            self._free.extend(areas)


def lease_from(pool: ReadBuffers | None) -> BufferLease:
    """A block task's lease on its run's pool, or, with None (a run whose tasks go to other
    processes), on a pool of its own whose maps are freed with it."""
    return (ReadBuffers() if pool is None else pool).lease()  # `is None`: an empty pool is falsy


class BufferLease:
    """The maps one block task borrowed; a context manager that gives them back on exit.

    Whatever was read into them must not be used after the lease is closed: the next block
    task reads into the same memory.
    """

    def __init__(self, pool: ReadBuffers) -> None:
        self._pool = pool
        self._taken: list[mmap.mmap] = []

    def take(self, nbytes: int) -> mmap.mmap:
        """A map of at least ``nbytes`` bytes (its contents are whatever was last read)."""
        area = self._pool._take(nbytes)
        self._taken.append(area)
        return area

    def array(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype`` in a map from :meth:`take`.

        Args:
            shape: the array's shape.
            dtype: its dtype.

        Returns:
            A writable C-contiguous array, valid until the lease is closed.
        """
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        return np.frombuffer(self.take(count * dtype.itemsize), dtype, count=count).reshape(shape)

    def close(self) -> None:
        """Give every map taken back to the pool."""
        taken, self._taken = self._taken, []
        self._pool._give(taken)

    def __enter__(self) -> BufferLease:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
