"""Row-block readers: small picklable descriptions of where a tensor's bytes are.

A reader holds a path and offsets, never an open handle or a map, so it can be shipped to a
thread, a process or a ``dask.distributed`` worker. Every tensor is seen as a 2-D matrix of
``rows x cols`` (rows = first axis, cols = the product of the others; a 0-d tensor is one row
of one element, a 1-d tensor is ``n`` rows of one element), and is read in row ranges.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from streamvec.errors import InputChangedError
from streamvec.io.read_buffers import BufferLease, anonymous_map
from streamvec.io.readahead import start_readahead

if TYPE_CHECKING:
    from streamvec.io.zarr.access import ArrayCheck


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, cols) view of a tensor shape used for row blocks."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


class BlockReader(Protocol):
    """Reads rows ``[r0, r1)`` of a tensor as a ``(r1 - r0, cols)`` array of its own dtype."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def read(self, r0: int, r1: int) -> np.ndarray: ...


FileStamp = tuple[int, int, int, int]


def file_stamp(st: os.stat_result) -> FileStamp:
    """What identifies a file's version cheaply: device, inode, size, modification time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def check_stamp(path: str, expected: FileStamp | None, st: os.stat_result) -> None:
    """Raise :class:`InputChangedError` when the open file is not the one that was opened."""
    if expected is None:
        return
    found = file_stamp(st)
    if found == expected:
        return
    if found[:2] != expected[:2]:
        what = "was replaced by another file"
    elif found[2] != expected[2]:
        what = f"changed size from {expected[2]} to {found[2]} bytes"
    else:
        what = "was modified"
    raise InputChangedError(
        f"{path}: {what} while this run was reading it; the result would mix two versions, "
        "so nothing was written; leave the inputs alone during a run and rerun (with "
        "--resume where the command has it)"
    )


@dataclass(frozen=True)
class SafetensorsReader:
    """Rows of one tensor inside a safetensors file, read with ``pread`` into anonymous memory.

    Each read opens the file, checks that it is still the version whose header was parsed
    (``stamp``: device, inode, size, mtime), reads the rows and checks again, so an input
    truncated, replaced or rewritten during a run is an error naming the file. A memory map
    would turn a truncation into SIGBUS, which kills the process with no message; ``pread``
    turns it into a short read. No file stays open or mapped between blocks, which is what
    the memory accounting of ``dask.distributed`` nannies needs. The engine reads into
    buffers it reuses (:mod:`streamvec.io.read_buffers`); other callers get fresh ones.
    """

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    stamp: FileStamp | None = None

    def read(self, r0: int, r1: int, lease: BufferLease | None = None) -> np.ndarray:
        """Rows ``[r0, r1)`` as a ``(r1 - r0, cols)`` array.

        Args:
            r0: first row.
            r1: end row (exclusive).
            lease: read into a map borrowed from a run's pool (valid until the lease is
                closed); None: into a fresh anonymous map that the array owns.

        Returns:
            The rows, in the tensor's dtype.

        Raises:
            InputChangedError: the file was truncated, replaced or modified.
        """
        rows, cols = matrix_shape(self.shape)
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"rows [{r0}, {r1}) outside 0..{rows}")
        if r1 == r0 or cols == 0:
            return np.empty((r1 - r0, cols), self.dtype)
        start = self.offset + r0 * cols * self.dtype.itemsize
        count = (r1 - r0) * cols
        nbytes = count * self.dtype.itemsize
        area = anonymous_map(nbytes) if lease is None else lease.take(nbytes)
        out = np.frombuffer(area, self.dtype, count=count).reshape(r1 - r0, cols)
        buf = out.reshape(-1).view(np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            check_stamp(self.path, self.stamp, os.fstat(fd))
            got = 0
            while got < buf.size:
                n = os.preadv(fd, [buf[got:].data], start + got)
                if n == 0:
                    break
                got += n
            st = os.fstat(fd)
            if got < buf.size:
                check_stamp(self.path, self.stamp, st)  # the usual reason: truncated
                raise InputChangedError(
                    f"{self.path}: ended after {start + got} bytes while reading rows "
                    f"[{r0}, {r1}) (expected {start + buf.size}); the file is damaged or "
                    "changed during the run"
                )
            check_stamp(self.path, self.stamp, st)
        finally:
            os.close(fd)
        return out

    def prefetch(self, r0: int, r1: int) -> None:
        """Ask the kernel to start reading rows ``[r0, r1)`` into the page cache, and return.

        The engine calls it for the block after the one a worker starts, so that from a cold
        cache the disk reads ahead while blocks are computed; ``stats`` for a tensor it
        samples (:func:`~streamvec.io.readahead.start_readahead`: spans already cached are
        skipped). Advice only.
        """
        _, cols = matrix_shape(self.shape)
        row_bytes = cols * self.dtype.itemsize
        start_readahead(self.path, self.offset + r0 * row_bytes, self.offset + r1 * row_bytes)


def read_block(reader: BlockReader, r0: int, r1: int, lease: BufferLease | None) -> np.ndarray:
    """Rows ``[r0, r1)`` of any reader; safetensors and store rows go into maps from ``lease``.

    Args:
        reader: the tensor's reader.
        r0: first row.
        r1: end row (exclusive).
        lease: a block task's lease on its run's read buffers (None: fresh memory).

    Returns:
        The rows; where they were read into the lease, valid until it is closed.
    """
    if lease is not None and isinstance(reader, (SafetensorsReader, ZarrReader)):
        return reader.read(r0, r1, lease)
    return reader.read(r0, r1)


# madvise(MADV_POPULATE_READ), Linux 5.14+; Python's mmap module does not name it.
MADV_POPULATE_READ = 22


def populate(view: np.memmap) -> None:
    """Fault a fresh map's pages in now, in one call, so reading happens here.

    Without it the pages are faulted in one by one by whatever touches them first (the
    kernel), which blurs read time into compute time; with it a block's read time is the
    time of this call (from the page cache, or from disk when the cache is cold), so the
    engine can report read and compute separately. It measured no slower. Where the kernel
    lacks it, this does nothing and the pages are faulted in on first touch as before.
    """
    mapping = getattr(view, "_mmap", None)
    if mapping is None:
        return
    try:
        mapping.madvise(MADV_POPULATE_READ)
    except (OSError, ValueError):
        pass


@dataclass(frozen=True)
class ZarrReader:
    """Rows of one array of a Zarr store written by streamvec (bf16 kept as raw uint16 bits).

    ``check`` (from :func:`streamvec.io.zarr.validate.validate_store`) says what each chunk must
    be; without it the array's own metadata is checked when it is first read.
    """

    store: str
    array_path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    check: ArrayCheck | None = field(default=None, repr=False, compare=False)

    def read(self, r0: int, r1: int, lease: BufferLease | None = None) -> np.ndarray:
        """Rows ``[r0, r1)`` as a ``(r1 - r0, cols)`` array.

        Args:
            r0: first row.
            r1: end row (exclusive).
            lease: read and decode the chunks into maps borrowed from a run's pool (valid
                until the lease is closed); None: into fresh memory that the array owns.

        Returns:
            The rows, in the array's dtype (bf16 from its stored uint16 bits).
        """
        from streamvec.io.zarr.chunks import read_rows

        rows, cols = matrix_shape(self.shape)
        # Checked here as SafetensorsReader does: a chunk read past the end would leave rows
        # of uninitialised memory, and a 0-d array's one chunk would answer any range.
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"rows [{r0}, {r1}) outside 0..{rows}")
        if r1 == r0 or cols == 0:
            # Nothing to read; an array with a zero-size axis has no chunk files at all.
            return np.empty((r1 - r0, cols), self.dtype)
        data = read_rows(self.store, self.array_path, r0, r1, self.check, lease)
        if data.dtype != self.dtype:
            data = data.view(self.dtype)  # raw bf16 bits stored as uint16
        return data.reshape(r1 - r0, cols)

    def read_into(self, r0: int, r1: int, out: np.ndarray) -> None:
        """Rows ``[r0, r1)`` decoded straight into ``out``, a C-contiguous ``(r1 - r0, cols)``
        array of this reader's dtype: a held matrix is filled chunk by chunk, with no block
        buffer between the files and it (the same checks as :meth:`read`)."""
        from streamvec.io.zarr.chunks import read_rows

        rows, cols = matrix_shape(self.shape)
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"rows [{r0}, {r1}) outside 0..{rows}")
        if out.shape != (r1 - r0, cols) or out.dtype != self.dtype:
            raise ValueError(f"out: a ({r1 - r0}, {cols}) {self.dtype} array is needed")
        if r1 == r0 or cols == 0:
            return
        read_rows(self.store, self.array_path, r0, r1, self.check, out=out)
