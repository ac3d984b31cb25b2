"""What a validated Zarr array's chunks must be, and opening a store's files safely.

:func:`streamvec.io.zarr.validate.validate_store` checks a store's metadata before any chunk
is read, and turns each array into an :class:`ArrayCheck`, small and picklable, that
:mod:`streamvec.io.zarr.chunks` uses to read each chunk safely: opened without following
symlinks (:func:`open_inside`), a regular file of a bounded size, its blosc header's declared
size checked before anything is decompressed, its decoded size checked after, and its digest
compared with the recorded one when :attr:`ReadPolicy.verify` is on. The policy in force
(``--no-verify-inputs``, the chunk size bound) is a context variable readers copy when made.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamvec.errors import StoreError
from streamvec.units import format_bytes

# Metadata files larger than this are refused unread (a 100k-tensor store's root is ~60 MB).
MAX_METADATA_BYTES = 512 << 20
BLOSC_HEADER = 16
# The attrs streamvec records per array.
EMPTY_CHUNKS_ATTR = "empty_chunks"
BLOCK_DIGESTS_ATTR = "block_xxh3_128"
TENSOR_DIGEST_ATTR = "xxh3_128"


@dataclass(frozen=True)
class ReadPolicy:
    """How stores are read: whether recorded checksums are checked, and the chunk size bound.

    Attributes:
        verify: compare every chunk read with its recorded digest (``--no-verify-inputs``
            turns it off).
        max_chunk_bytes: refuse an array whose one chunk decodes to more than this (None: a
            quarter of the default memory limit).
    """

    verify: bool = True
    max_chunk_bytes: int | None = None

    def chunk_limit(self) -> int:
        if self.max_chunk_bytes is not None:
            return self.max_chunk_bytes
        from streamvec.memory import default_memory_limit

        return default_memory_limit() // 4


# The policy in force where stores are opened; readers take a copy of it when they are made,
# so worker threads and processes need not see this context.
# ReadPolicy is frozen, so sharing the default instance is safe.
_POLICY: contextvars.ContextVar[ReadPolicy] = contextvars.ContextVar(
    "streamvec_read_policy",
    default=ReadPolicy(),  # noqa: B039
)


def read_policy() -> ReadPolicy:
    """The :class:`ReadPolicy` stores are opened with here."""
    return _POLICY.get()


@contextlib.contextmanager
def using_read_policy(policy: ReadPolicy) -> Iterator[ReadPolicy]:
    """Open stores under ``policy`` inside the ``with`` block.

    Example:
        >>> with using_read_policy(ReadPolicy(verify=False)):  # doctest: +SKIP
        ...     tau = sv.open("tau.zarr")
    """
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


_ZARR_READY = threading.Lock()
_zarr_loaded = False


def load_zarr() -> None:
    """Import zarr and resolve every codec streamvec reads, once, before threads use them.

    zarr registers its codecs as ``zarr.codecs`` is imported and loads entry points lazily on
    first lookup; worker threads that did both at once for the first time could see a
    half-imported package (``UnknownCodecError: Unknown codec: 'bytes'``). Done here under a
    lock, the first lookup of each codec happens once, in one thread.
    """
    global _zarr_loaded
    if _zarr_loaded:
        return
    with _ZARR_READY:
        if _zarr_loaded:
            return
        # Imported for their side effects: the codec, buffer and metadata registrations.
        import zarr.codecs
        import zarr.core.array_spec
        import zarr.core.buffer.cpu
        import zarr.core.metadata.v3  # noqa: F401
        from zarr.registry import get_buffer_class, get_codec_class, get_ndbuffer_class

        for name in ("bytes", "blosc"):
            get_codec_class(name)
        get_buffer_class()
        get_ndbuffer_class()
        _zarr_loaded = True


@dataclass(frozen=True)
class ArrayCheck:
    """What a validated array's chunks must be; carried by readers to their workers.

    Attributes:
        store: the store directory.
        array_path: the array folder, relative to the store.
        label: the tensor (and factor) the array holds, for messages.
        shape: declared shape.
        chunk_rows: rows per chunk (1 for a 0-d array).
        n_chunks: chunks along the rows.
        chunk_bytes: decoded bytes of one whole chunk.
        dtype: the storage dtype (bf16 as uint16).
        compressed: True when a blosc codec follows the bytes codec.
        empty: chunk indices recorded as all fill value (no file).
        digests: the recorded digest of each chunk's rows, or None.
        verify: compare each chunk read with its digest.
    """

    store: str
    array_path: str
    label: str
    shape: tuple[int, ...]
    chunk_rows: int
    n_chunks: int
    chunk_bytes: int
    dtype: np.dtype
    compressed: bool
    empty: frozenset[int] = frozenset()
    digests: tuple[bytes, ...] | None = field(default=None, repr=False)
    verify: bool = True
    # False for stores written before streamvec recorded empty chunks.
    empty_recorded: bool = True
    # Such a store's array whose missing chunks are taken as skipped all-zero chunks, to be
    # confirmed against its recorded (xxh3_128, checksum_block_rows) before it is used.
    legacy_digest: tuple[str, int] | None = None

    def missing(self, index: int) -> StoreError:
        """The error for a chunk that is neither a file nor recorded as empty."""
        if self.empty_recorded:
            why = "the store does not record it as empty; the store is damaged: rewrite it"
        else:
            why = (
                "this store predates the record of all-zero chunks, so a skipped chunk cannot "
                "be told from a deleted one: write it again with this version of streamvec"
            )
        return StoreError(f"{self.where(index)} is missing ({why})")

    def chunk_key(self, index: int) -> str:
        """The chunk file of row-chunk ``index``, relative to the array folder."""
        if not self.shape:
            return "c"
        return "/".join(["c", str(index), *(["0"] * (len(self.shape) - 1))])

    def where(self, index: int | None = None) -> str:
        """``STORE: array LABEL`` (and its chunk), the start of every message."""
        chunk = f" chunk {self.chunk_key(index)}" if index is not None else ""
        return f"{self.store}: array {self.label!r}{chunk}"


def _fail(message: str) -> StoreError:
    return StoreError(message)


def open_inside(root: Path, rel: str, *, directory: bool = False) -> int:
    """An fd of ``root/rel`` opened without following any symlink on the way.

    Raises:
        FileNotFoundError: a component does not exist.
        StoreError: a component is a symlink, or the target is not a regular file (or
            directory); FIFOs and devices are detected without blocking.
    """
    parts = [p for p in rel.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise _fail(f"{root}: path {rel!r} leaves the store")
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(root, nofollow | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = nofollow | (os.O_DIRECTORY if not last or directory else 0)
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (40, 20):  # ELOOP: a symlink; ENOTDIR: not a directory
                    kind = (
                        "a symlink"
                        if os.path.islink(root / "/".join(parts[: i + 1]))
                        else "not a directory"
                    )
                    raise _fail(
                        f"{root}: {'/'.join(parts[: i + 1])} is {kind}; a store's files must be "
                        "regular files inside it (copy the data in place of the link)"
                    ) from None
                raise
            os.close(fd)
            fd = child
        mode = os.fstat(fd).st_mode
        want = stat.S_ISDIR if directory else stat.S_ISREG
        if not want(mode):
            raise _fail(
                f"{root}: {rel} is not a regular {'directory' if directory else 'file'}; "
                "a store holds only regular files"
            )
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_small_file(root: Path, rel: str, limit: int = MAX_METADATA_BYTES) -> bytes:
    """The bytes of a regular metadata file inside ``root`` (no symlink followed), bounded."""
    fd = open_inside(root, rel)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise _fail(f"{root}: {rel} is {format_bytes(size)}, more than {format_bytes(limit)}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(size + 1)[: size + 1]
    finally:
        os.close(fd)


def open_chunk(check: ArrayCheck, index: int) -> int | None:
    """An fd of the chunk file of row-chunk ``index``, or None when it is recorded as empty.

    Raises:
        StoreError: the file is missing (and not recorded as empty), a symlink, or not a
            regular file.
    """
    rel = f"{check.array_path}/{check.chunk_key(index)}"
    try:
        return open_inside(Path(check.store), rel)
    except FileNotFoundError:
        if index in check.empty:
            return None
        raise check.missing(index) from None
