"""Operands of a row block, one cache-sized slab at a time, as float32.

``stats`` needs a few sums per element, so reading is most of its work: a row block read
whole (a 32 MB buffer per operand, then a float32 copy of it) is written to memory and read
back twice before any arithmetic. Here a safetensors operand of 16 or 32 bits is read
(``pread``) a slab at a time into a small buffer that stays in the CPU cache, and upcast
there; buffers are allocated once per block. The file is checked against the version whose
header was parsed (:func:`streamvec.io.blocks.check_stamp`) when the block starts and ends,
as :class:`~streamvec.io.blocks.SafetensorsReader` does for each read. Any other reader
(Zarr stores, adapters, FP8) is read whole per block and sliced.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np

from streamvec.dtypes import BFLOAT16
from streamvec.errors import InputChangedError
from streamvec.io.blocks import BlockReader, SafetensorsReader, check_stamp, matrix_shape

_PREAD_DTYPES = (BFLOAT16, np.dtype(np.float16), np.dtype(np.float32))


def preadable(reader: BlockReader) -> bool:
    """Whether ``reader``'s slabs are read on their own (a 16/32-bit safetensors tensor)."""
    return isinstance(reader, SafetensorsReader) and reader.dtype in _PREAD_DTYPES


class _Pread:
    """A safetensors operand read slab by slab into one reusable buffer."""

    def __init__(
        self,
        reader: SafetensorsReader,
        r0: int,
        width: int,
        stack: ExitStack,
        raw: np.ndarray | None = None,
    ) -> None:
        self.reader = reader
        _, cols = matrix_shape(reader.shape)
        self.start = reader.offset + r0 * cols * reader.dtype.itemsize
        self.fd = os.open(reader.path, os.O_RDONLY)
        stack.callback(os.close, self.fd)
        check_stamp(reader.path, reader.stamp, os.fstat(self.fd))
        self.raw = np.empty(width, reader.dtype) if raw is None else raw
        # bf16 widens through its bits: two integer passes, ~3x ml_dtypes' cast here (with
        # a shared ``raw``, the SlabReader widens every operand at once)
        self.wide = np.empty(width, np.uint32) if reader.dtype == BFLOAT16 and raw is None else None

    def fill(self, s0: int, s1: int, dest: np.ndarray) -> None:
        """``pread`` the raw elements ``[s0, s1)`` of the block into ``dest``."""
        pread_into(self.fd, self.reader, dest, self.start + s0 * self.reader.dtype.itemsize)

    def load(self, s0: int, s1: int, out: np.ndarray) -> np.ndarray:
        w = s1 - s0
        dest = out if self.reader.dtype == np.float32 else self.raw[:w]
        self.fill(s0, s1, dest)
        if self.wide is not None:
            wide = self.wide[:w]
            np.copyto(wide, dest.view(np.uint16))
            np.left_shift(wide, np.uint32(16), out=wide)
            return wide.view(np.float32)
        if dest is not out:
            np.copyto(out, dest)
        return out

    def finish(self) -> None:
        check_stamp(self.reader.path, self.reader.stamp, os.fstat(self.fd))


def pread_into(fd: int, reader: SafetensorsReader, dest: np.ndarray, pos: int) -> None:
    """Fill ``dest`` (contiguous) from byte ``pos`` of ``reader``'s open file ``fd``.

    Raises:
        InputChangedError: the file ended first (checked against the reader's stamp, so a
            file replaced or truncated during the run is named as such).
    """
    buf = dest.view(np.uint8).reshape(-1)
    got = 0
    while got < buf.size:
        n = os.preadv(fd, [buf[got:].data], pos + got)
        if n == 0:
            check_stamp(reader.path, reader.stamp, os.fstat(fd))
            raise InputChangedError(
                f"{reader.path}: ended while reading tensor data at byte {pos + got}; the "
                "file is damaged or changed during the run"
            )
        got += n


def read_runs(reader: SafetensorsReader, starts: np.ndarray, run: int) -> np.ndarray:
    """``(len(starts), run)`` float32: runs of ``run`` flat elements at each of ``starts``.

    Args:
        reader: a :func:`preadable` reader.
        starts: first flat element of each run (runs inside the tensor).
        run: elements per run.

    Returns:
        The runs, upcast.
    """
    size = reader.dtype.itemsize
    raw = np.empty((len(starts), run), reader.dtype)
    # One pread per run into slices of a memoryview (no numpy indexing per run). One pread of
    # the runs' whole span was 3-4x cheaper for spans of 1.6-4.7 MB, but its transient
    # buffers raised the pass's peak anonymous memory at 1B from 65 to 87 MiB.
    view = raw.view(np.uint8).reshape(-1).data
    step = run * size
    fd = os.open(reader.path, os.O_RDONLY)
    try:
        check_stamp(reader.path, reader.stamp, os.fstat(fd))
        for j, s in enumerate((starts * size + reader.offset).tolist()):
            if os.preadv(fd, [view[j * step : (j + 1) * step]], s) != step:
                pread_into(fd, reader, raw[j], s)  # short read: retry, or say why
        check_stamp(reader.path, reader.stamp, os.fstat(fd))
    finally:
        os.close(fd)
    if reader.dtype == BFLOAT16:
        wide = raw.view(np.uint16).astype(np.uint32)
        np.left_shift(wide, np.uint32(16), out=wide)
        return wide.view(np.float32)
    return raw.astype(np.float32, copy=False)


class _Whole:
    """Any other operand: the block read at once, then upcast slab by slab."""

    def __init__(self, reader: BlockReader, r0: int, r1: int) -> None:
        self.data = np.asarray(reader.read(r0, r1)).reshape(-1)

    def load(self, s0: int, s1: int, out: np.ndarray) -> np.ndarray:
        part = self.data[s0:s1]
        if part.dtype == np.float32:
            return part  # no copy
        np.copyto(out, part, casting="unsafe")
        return out

    def finish(self) -> None:
        pass


class SlabReader:
    """Every operand of rows ``[r0, r1)`` of one tensor, slab by slab (a context manager).

    Args:
        readers: the tensor's readers.
        r0: first row.
        r1: end row.
        width: the largest slab, in elements.

    Example:
        >>> with SlabReader(readers, 0, 8, 1 << 16) as rd:  # doctest: +SKIP
        ...     base, ft = rd.load(0, 1024)  # float32 views, valid until the next load
    """

    def __init__(self, readers: Sequence[BlockReader], r0: int, r1: int, width: int) -> None:
        self._stack = ExitStack()
        self._bufs = np.empty((len(readers), width), np.float32)
        self._ops: list[_Pread | _Whole] = []
        # All bf16 (the usual checkpoints): every operand's raw slab in one (R, width)
        # buffer, which the compiled loop widens itself (load_bits).
        self._raw = (
            np.empty((len(readers), width), np.uint16)
            if all(preadable(r) and r.dtype == BFLOAT16 for r in readers)
            else None
        )
        try:
            for i, r in enumerate(readers):
                if preadable(r):
                    assert isinstance(r, SafetensorsReader)
                    raw = None if self._raw is None else self._raw[i]
                    self._ops.append(_Pread(r, r0, width, self._stack, raw))
                else:
                    self._ops.append(_Whole(r, r0, r1))
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> SlabReader:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                for op in self._ops:
                    op.finish()  # the file is still the one we started on
        finally:
            self._stack.close()

    def load(self, s0: int, s1: int) -> list[np.ndarray]:
        """Flat elements ``[s0, s1)`` of the block of every operand, as float32 (the pass
        takes :meth:`load_bits`; this is its widened form, for checks and benchmarks)."""
        w = s1 - s0
        bits, shift = self.load_bits(s0, s1)
        if shift:
            wide = self._bufs[:, :w].view(np.uint32)
            np.copyto(wide, bits[:, :w])
            np.left_shift(wide, shift, out=wide)
        return list(self._bufs[:, :w])

    def load_bits(self, s0: int, s1: int) -> tuple[np.ndarray, np.uint32]:
        """Flat elements ``[s0, s1)`` of every operand, unwidened, for a compiled loop.

        Returns:
            ``(bits, shift)``: ``bits`` is the whole ``(R, width)`` C-contiguous buffer
            (columns ``[0, s1 - s0)`` hold the slab, valid until the next load), bf16 as
            uint16 with ``shift`` 16 when every operand is a bf16 safetensors tensor
            (widened by the loop itself), else float32 as uint32 with ``shift`` 0.
        """
        w = s1 - s0
        if self._raw is not None:
            for i, op in enumerate(self._ops):
                assert isinstance(op, _Pread)
                op.fill(s0, s1, self._raw[i, :w])
            return self._raw, np.uint32(16)
        for i, op in enumerate(self._ops):
            dest = self._bufs[i, :w]
            got = op.load(s0, s1, dest)
            if got.ctypes.data != dest.ctypes.data:
                np.copyto(dest, got)
        return self._bufs.view(np.uint32), np.uint32(0)
