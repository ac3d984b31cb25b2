"""Reading row blocks of a Zarr array chunk file by chunk file, in the calling thread.

The mirror of the engine's chunk writer (:class:`streamvec.io.zarr.store.ZarrBlockWriter`):
each chunk a block needs is read as a file and decoded by numcodecs' blosc (what zarr's
blosc codec calls), so the values are exactly what ``zarr.Array.__getitem__`` returns. In a
run the file is read into, and decompressed straight into, maps of the block task's read
buffers (:mod:`streamvec.io.read_buffers`), reused from block to block: decoding through
zarr's codec pipeline made fresh bytes per chunk and copied the rows out again (1.7x the CPU
time, ``bench/bench_kernel_io.py --store``). A held matrix (``read_rows(out=)``) has each
whole chunk decoded straight into its rows. ``zarr.open_array`` plus ``__getitem__`` per block
re-parsed the metadata and sent every chunk through zarr's single event-loop thread: with two
engine workers ``combine`` from a 1B store took 5.60 s instead of 7.55 s
(``bench/bench_ab.py``, docs/benchmarks.md).

Every chunk is read as :mod:`streamvec.io.zarr.access` allows: the file opened without
following symlinks, a regular file of at most the size its codecs can produce, the blosc
header's declared size checked before decompressing (so a chunk that inflates beyond its
array's chunk size is refused before it takes the memory), the decoded size checked after,
and the recorded digest of its rows compared when the policy says so. A chunk that is not a
file is the fill value only when the array records it as empty.
"""

from __future__ import annotations

import math
import os
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from streamvec.errors import StoreError
from streamvec.io.read_buffers import BufferLease
from streamvec.io.zarr.access import (
    BLOSC_HEADER,
    ArrayCheck,
    load_zarr,
    open_chunk,
    read_small_file,
)
from streamvec.io.zarr.validate import array_check


def read_rows(
    store: str,
    array_path: str,
    r0: int,
    r1: int,
    check: ArrayCheck | None = None,
    lease: BufferLease | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Rows ``[r0, r1)`` of the array at ``store/array_path`` in its storage dtype.

    Args:
        store: the store directory.
        array_path: the array folder inside it.
        r0: first row.
        r1: one past the last row.
        check: what the array's chunks must be (from a validated store); None checks the
            array's own metadata now.
        lease: read and decode into maps borrowed from a run's pool (the rows are valid until
            the lease is closed); None: into fresh memory that the result owns.
        out: decode into this C-contiguous array of exactly the rows' bytes instead (whole
            chunks straight into it, a partial one through a scratch buffer); it is returned,
            viewed as the rows.

    Returns:
        A ``(r1 - r0, *shape[1:])`` array (the 0-d array for a 0-d tensor).

    Raises:
        StoreError: a chunk is missing, not a regular file, of the wrong size, or does not
            match its recorded digest.
    """
    if check is None:
        check = array_check(store, array_path)
    if check.legacy_digest is not None:
        _confirm_legacy_gaps(check)
    return _read_checked_rows(check, r0, r1, lease, out)


@lru_cache(maxsize=256)
def _confirm_legacy_gaps(check: ArrayCheck) -> None:
    """An old store's missing chunks were skipped zeros: the array matches its checksum.

    Costs one extra read of such an array, once per process.
    """
    assert check.legacy_digest is not None
    recorded, block_rows = check.legacy_digest
    rows = check.shape[0] if check.shape else 1
    digests = [
        xxhash.xxh3_128_digest(
            np.ascontiguousarray(_read_checked_rows(check, r0, min(rows, r0 + block_rows))).data
        )
        for r0 in range(0, rows, block_rows)
    ]
    if xxhash.xxh3_128_hexdigest(b"".join(digests)) != recorded:
        gaps = sorted(check.empty)
        shown = ", ".join(check.chunk_key(i) for i in gaps[:3]) + (" ..." if len(gaps) > 3 else "")
        raise StoreError(
            f"{check.where()}: {len(gaps)} chunk(s) missing ({shown}) and the array read "
            "without them does not match its recorded checksum, so one held data (deleted?); "
            "the store is damaged: rewrite it"
        )


def _read_checked_rows(
    check: ArrayCheck,
    r0: int,
    r1: int,
    lease: BufferLease | None = None,
    into: np.ndarray | None = None,
) -> np.ndarray:
    spec = _layout(check)
    shape = check.shape
    buffers = _ChunkBuffers(lease)
    if not shape:
        chunk = _chunk(check, spec, 0, buffers)
        if into is None:
            return chunk
        _bytes_of(into, chunk.nbytes)[:] = chunk.reshape(-1).view(np.uint8)
        return into.reshape(-1).view(chunk.dtype).reshape(())
    rows_per_chunk = check.chunk_rows
    if into is None and r1 > r0 and r0 // rows_per_chunk == (r1 - 1) // rows_per_chunk:
        # Rows of one chunk (the usual block): decoded straight into the block's buffer and
        # returned as they are. Without a lease, copied when the rows are less than half the
        # chunk (the view would keep it all alive).
        c0 = (r0 // rows_per_chunk) * rows_per_chunk
        chunk = _chunk(check, spec, r0 // rows_per_chunk, buffers)
        rows = chunk[r0 - c0 : r1 - c0]
        keep = lease is not None or 2 * (r1 - r0) >= chunk.shape[0]
        return rows if keep else rows.copy()
    nbytes = (r1 - r0) * check.chunk_bytes // max(rows_per_chunk, 1)
    area = buffers.block(nbytes) if into is None else _bytes_of(into, nbytes)
    out = np.frombuffer(area, check.dtype, count=(r1 - r0) * math.prod(shape[1:]))
    out = out.reshape((r1 - r0, *shape[1:]))
    for ci in range(r0 // rows_per_chunk, (r1 - 1) // rows_per_chunk + 1 if r1 > r0 else 0):
        c0 = ci * rows_per_chunk
        lo, hi = max(r0, c0), min(r1, c0 + rows_per_chunk)
        if lo == c0 and hi == c0 + rows_per_chunk:
            # A whole chunk (not a padded last one): decoded straight into its rows.
            _chunk(check, spec, ci, buffers, target=out[lo - r0 : hi - r0])
            continue
        # Part of a chunk: decoded into one scratch buffer, reused for the next.
        chunk = _chunk(check, spec, ci, buffers, scratch=True)
        out[lo - r0 : hi - r0] = chunk[lo - c0 : hi - c0]
    return out


def _bytes_of(array: np.ndarray, nbytes: int) -> np.ndarray:
    """``array``'s memory as ``nbytes`` bytes (refused unless exactly that, contiguous)."""
    if not array.flags.c_contiguous or array.nbytes != nbytes:
        raise ValueError(f"out: a C-contiguous array of {nbytes} bytes is needed")
    return array.reshape(-1).view(np.uint8)


class _ChunkBuffers:
    """Where one read puts its bytes: maps borrowed from a lease, or fresh memory.

    A read holds at most three: the block it returns (or the one chunk it is), one decoded
    chunk reused from chunk to chunk when a block spans several, and one compressed file's
    bytes reused likewise.
    """

    def __init__(self, lease: BufferLease | None) -> None:
        self.lease = lease
        self._decoded: Any = None
        self._compressed: Any = None

    def _get(self, nbytes: int) -> Any:
        if self.lease is not None:
            return self.lease.take(nbytes)
        return np.empty(max(nbytes, 1), np.uint8)

    def block(self, nbytes: int) -> Any:
        """A buffer of at least ``nbytes`` the caller keeps (the result)."""
        return self._get(nbytes)

    def decoded(self, nbytes: int) -> Any:
        """A buffer of at least ``nbytes`` for one decoded chunk, reused by the next."""
        if self._decoded is None or len(self._decoded) < nbytes:
            self._decoded = self._get(nbytes)
        return self._decoded

    def compressed(self, nbytes: int) -> Any:
        """A buffer of at least ``nbytes`` for one chunk file's bytes, reused by the next."""
        if self._compressed is None or len(self._compressed) < nbytes:
            self._compressed = self._get(nbytes)
        return self._compressed


@lru_cache(maxsize=1024)
def _parsed(store: str, array_path: str, mtime_ns: int, size: int) -> Any:
    import json

    from zarr.core.metadata.v3 import ArrayV3Metadata

    raw = json.loads(read_small_file(Path(store), f"{array_path}/zarr.json"))
    return ArrayV3Metadata.from_dict(raw)


def _layout(check: ArrayCheck) -> Any:
    """The chunk spec of a checked array, its metadata confirmed unchanged since then."""
    from zarr.core.array_spec import ArrayConfig
    from zarr.core.buffer import default_buffer_prototype

    load_zarr()  # before any codec lookup in a worker thread (see load_zarr)
    meta_file = Path(check.store) / check.array_path / "zarr.json"
    try:
        st = meta_file.stat()
    except OSError:
        raise StoreError(f"{check.where()}: its zarr.json is gone") from None
    # Keyed on the metadata file's identity: a store rewritten in place is read afresh.
    meta = _parsed(check.store, check.array_path, st.st_mtime_ns, st.st_size)
    chunks = tuple(meta.chunks)
    if (
        tuple(meta.shape) != check.shape
        or (check.shape and chunks[0] != check.chunk_rows)
        or not _codecs_as_validated(tuple(meta.codecs), check.compressed)
    ):
        raise StoreError(f"{check.where()}: its metadata changed since the store was opened")
    spec = meta.get_chunk_spec(
        (0,) * len(meta.shape),
        ArrayConfig(order="C", write_empty_chunks=True),
        default_buffer_prototype(),
    )
    return spec


def _codecs_as_validated(codecs: tuple[Any, ...], compressed: bool) -> bool:
    """Whether the codecs are still those validated when the store was opened (little-endian
    bytes, then blosc when compressed): :func:`_chunk` decodes with exactly those."""
    from zarr.codecs import BloscCodec, BytesCodec
    from zarr.codecs.bytes import Endian

    kinds = (BytesCodec, BloscCodec) if compressed else (BytesCodec,)
    return (
        len(codecs) == len(kinds)
        and all(isinstance(c, kind) for c, kind in zip(codecs, kinds, strict=True))
        and codecs[0].endian in (None, Endian.little)
    )


def _read_bounded(fd: int, check: ArrayCheck, index: int, into: Any) -> memoryview:
    """The chunk file's bytes, read into ``into``; refused before reading when its size
    cannot be right.
    """
    size = os.fstat(fd).st_size
    if not check.compressed:
        if size != check.chunk_bytes:
            raise StoreError(
                f"{check.where(index)} is {size} bytes, not the {check.chunk_bytes} of an "
                "uncompressed chunk; the store is damaged: rewrite it"
            )
    else:
        if size < BLOSC_HEADER:
            raise StoreError(f"{check.where(index)} is {size} bytes, too short for blosc")
        header = os.pread(fd, BLOSC_HEADER, 0)
        nbytes, _, cbytes = struct.unpack_from("<III", header, 4)
        if nbytes != check.chunk_bytes or cbytes != size:
            raise StoreError(
                f"{check.where(index)} declares {nbytes} bytes compressed into {cbytes}; "
                f"expected {check.chunk_bytes} bytes in a file of {size}; the store is "
                "damaged: rewrite it"
            )
    view = memoryview(into(size)).cast("B")[:size]
    got = 0
    while got < size:
        n = os.preadv(fd, [view[got:]], got)
        if n == 0:
            raise StoreError(f"{check.where(index)} shrank while it was read")
        got += n
    return view


def _chunk(
    check: ArrayCheck,
    spec: Any,
    index: int,
    buffers: _ChunkBuffers,
    scratch: bool = False,
    target: np.ndarray | None = None,
) -> Any:
    """One whole chunk, decoded and checked (or the fill value where it is recorded empty).

    The chunk is decoded straight into ``target`` (rows of the caller's result, exactly the
    chunk's bytes) or a buffer from ``buffers`` (its block's, or with ``scratch`` the one
    reused from chunk to chunk): an uncompressed chunk is read there, a
    blosc chunk decompressed there by numcodecs' blosc, which is what zarr's codec pipeline
    runs for the codecs a validated store may have (little-endian bytes, then blosc), less a
    fresh allocation and a copy per chunk.
    """
    from numcodecs import blosc  # zarr's own blosc; loaded with zarr before any worker

    fd = open_chunk(check, index)
    native = spec.dtype.to_native_dtype()
    if target is not None:
        flat = _bytes_of(target, check.chunk_bytes)
    else:
        area = (buffers.decoded if scratch else buffers.block)(check.chunk_bytes)
        flat = np.frombuffer(area, np.uint8, count=check.chunk_bytes)
    if fd is None:
        flat.fill(0)
    else:
        try:
            if check.compressed:
                data = _read_bounded(fd, check, index, buffers.compressed)
            else:
                _read_bounded(fd, check, index, lambda n: flat)
        finally:
            os.close(fd)
        if check.compressed:
            try:
                # The header's decoded size was checked against chunk_bytes before this, and
                # blosc refuses to write past the buffer, so the decode fills it exactly.
                blosc.decompress(data, flat)
            except (ValueError, RuntimeError, TypeError) as exc:
                raise StoreError(f"{check.where(index)} does not decode ({exc})") from None
    chunk = flat.view(native).reshape(spec.shape)
    if check.verify and check.digests is not None:
        rows = check.shape[0] - index * check.chunk_rows if check.shape else 1
        valid = np.ascontiguousarray(chunk[:rows] if check.shape else chunk)
        if xxhash.xxh3_128_digest(valid.reshape(-1).view(np.uint8).data) != check.digests[index]:
            raise StoreError(
                f"{check.where(index)} does not match its recorded checksum (changed or "
                "corrupted since it was written); rewrite the store, or pass "
                "--no-verify-inputs to read it anyway"
            )
    return chunk
