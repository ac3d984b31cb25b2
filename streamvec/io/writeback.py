"""Start writing freshly written bytes to disk now, without waiting for them.

The engine makes its output durable once, with ``os.sync()``, before the final rename. Left
alone, the kernel holds the dirty pages of a run in memory until that sync (or until dirty
memory passes its background threshold, ~10% of RAM), so the whole output is written to
disk *after* the computation instead of during it. Asking for writeback after each block
overlaps the disk with the computation; the final sync then waits only for the tail.
"""

from __future__ import annotations

import os

import numpy as np

from streamvec.errors import OutputError

_FADVISE = getattr(os, "posix_fadvise", None)
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)

# Writes smaller than this are left to the final sync: the advice cost 0.12 ms a call on the
# development machine, about what writing a small file costs (an SVD store's metadata and
# factor chunks: 0.04 s of a 0.1B `svd`'s 1.8 s), and a small file's pages weigh on neither
# the page cache nor the final sync's wait. A task-vector store's chunks are ~2 MB.
SMALL_WRITE_BYTES = 256 << 10


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Begin asynchronous writeback of ``[offset, offset + length)`` of ``fd``.

    On Linux, ``POSIX_FADV_DONTNEED`` starts writeback of the range's dirty pages (it does not
    wait for it) and drops the range's clean pages from the page cache, which output pages
    do not need to occupy. Elsewhere, and for a range under :data:`SMALL_WRITE_BYTES`, this
    does nothing: the final sync still makes the data durable, only later.
    """
    if _FADVISE is None or _DONTNEED is None or length < SMALL_WRITE_BYTES:
        return
    try:
        _FADVISE(fd, offset, length, _DONTNEED)
    except OSError:
        pass  # advice only: a filesystem that refuses it loses the overlap, nothing else


def write_at(path: str, pos: int, array: np.ndarray) -> None:
    """Write ``array``'s C-order bytes at byte ``pos`` of the pre-sized file ``path``, then
    start their writeback.

    Raises:
        OutputError: the write failed (disk full, I/O error), naming the file.
    """
    data = np.ascontiguousarray(array).view(np.uint8).reshape(-1).data
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            start, length = pos, len(data)
            while data:
                n = os.pwrite(fd, data, pos)
                data, pos = data[n:], pos + n
            start_writeback(fd, start, length)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(f"{path}: write failed ({exc.strerror}); free space and rerun") from None
