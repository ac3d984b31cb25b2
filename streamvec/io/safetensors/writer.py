"""Write a sharded safetensors checkpoint (Hugging Face layout) without holding a shard in RAM.

Every header is computed from the tensors' names, shapes and dtypes before any data exists
(:mod:`streamvec.io.safetensors.layout`), so each shard file can be created at its final size up
front.
Tensor data then arrives in row blocks, in any order and from any number of threads, and goes
straight to its byte offset with ``os.pwrite``. The result is byte-identical to what
``safetensors.numpy.save_file`` writes for the same tensors in the same order, plus a
``model.safetensors.index.json``.

Example:
    >>> specs = [TensorSpec("w", np.dtype(np.float32), (4, 2))]
    >>> with ShardedSafetensorsWriter(out_dir, specs, shard_size=2**30) as writer:
    ...     writer.create()
    ...     writer.write_rows("w", 2, np.ones((2, 2), np.float32))
    ...     writer.write_rows("w", 0, np.zeros((2, 2), np.float32))
    ...     weight_map = writer.finish()
"""

from __future__ import annotations

import bisect
import errno
import json
import math
import operator
import os
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

from streamvec.dtypes import dtype_name
from streamvec.errors import OutputError, StreamvecError
from streamvec.io.output import output_error
from streamvec.io.safetensors.layout import (
    MAX_HEADER_BYTES,
    METADATA_KEY,
    TensorSpec,
    encode_header,
    index_name,
    plan_shards,
    shard_file_names,
)

FILE_MODE = 0o644


def _add_rows(intervals: list[tuple[int, int]], start: int, stop: int) -> None:
    """Merge ``[start, stop)`` into a sorted list of disjoint, non-touching row ranges."""
    i = bisect.bisect_right(intervals, (start, sys.maxsize)) - 1
    if i < 0 or intervals[i][1] < start:
        i += 1
    j = bisect.bisect_right(intervals, (stop, sys.maxsize))
    if i < j:
        start = min(start, intervals[i][0])
        stop = max(stop, intervals[j - 1][1])
    intervals[i:j] = [(start, stop)]


class ShardedSafetensorsWriter:
    """Streaming writer for ``model-0000k-of-0000n.safetensors`` shards plus their index.

    Lifecycle: ``create()`` once, ``write_rows()`` any number of times from any threads,
    then ``finish()``; ``close()`` (or leaving the ``with`` block) releases the files on
    error paths without writing the index.

    Args:
        directory: existing output directory.
        specs: every tensor, in storage order; names must be unique.
        shard_size: maximum bytes of tensor data per shard (see :func:`plan_shards`).
        metadata: ``"__metadata__"`` of every shard; defaults to ``{"format": "pt"}``,
            which transformers requires.
        overwrite: replace shard and index files that already exist; by default an existing
            file is an :class:`OutputError`, so an output pointed at its own input cannot
            truncate it.
        stem: file name stem: ``model`` (transformers) or ``diffusion_pytorch_model``
            (diffusers), for shards and index alike.

    Example:
        >>> writer = ShardedSafetensorsWriter(out_dir, specs, shard_size=5 * 2**30)
        >>> writer.create()
        >>> for name, start, block in blocks:  # any order, any thread
        ...     writer.write_rows(name, start, block)
        >>> weight_map = writer.finish()
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        *,
        shard_size: int,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
        stem: str = "model",
    ) -> None:
        self._dir = Path(os.path.abspath(directory))
        self._index_name = index_name(stem)
        self._overwrite = overwrite
        meta = {"format": "pt"} if metadata is None else dict(metadata)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise StreamvecError(f"safetensors metadata must map strings to strings: {meta!r}")
        self._specs: dict[str, TensorSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise StreamvecError(f"tensor {spec.name!r} is listed twice")
            if spec.name == METADATA_KEY:
                raise StreamvecError(f"{METADATA_KEY!r} is reserved and cannot name a tensor")
            self._specs[spec.name] = spec
        if not self._specs:
            raise StreamvecError("no tensors to write: a checkpoint needs at least one")

        shards = plan_shards(list(self._specs.values()), shard_size)
        self._paths = [self._dir / n for n in shard_file_names(len(shards), stem)]
        self._prefixes: list[bytes] = []
        self._sizes: list[int] = []
        # name -> (shard index, absolute offset of the data, bytes per row, number of rows)
        self._where: dict[str, tuple[int, int, int, int]] = {}
        for k, shard in enumerate(shards):
            prefix, offsets = encode_header(shard, meta)
            if len(prefix) - 8 > MAX_HEADER_BYTES:
                raise StreamvecError(
                    f"{self._paths[k].name}: header of {len(prefix) - 8} bytes exceeds the "
                    f"{MAX_HEADER_BYTES}-byte limit of safetensors readers; use fewer tensors "
                    "per shard (a smaller shard size)"
                )
            for spec, (begin, _end) in zip(shard, offsets, strict=True):
                rows = spec.shape[0] if spec.shape else 1
                row_bytes = spec.dtype.itemsize * math.prod(spec.shape[1:])
                self._where[spec.name] = (k, len(prefix) + begin, row_bytes, rows)
            self._prefixes.append(prefix)
            self._sizes.append(len(prefix) + (offsets[-1][1] if offsets else 0))

        self._fds: list[int] = []
        self._state = "new"  # new -> open -> finished | closed
        self._inflight = 0
        self._cv = threading.Condition()
        self._written: dict[str, list[tuple[int, int]]] = {name: [] for name in self._specs}

    # -- introspection ---------------------------------------------------------------------

    @property
    def files(self) -> list[Path]:
        """Absolute paths of the shard files, in order (known before :meth:`create`).

        Returns:
            ``[dir/model-00001-of-0000n.safetensors, ...]``.

        Example:
            >>> [p.name for p in writer.files]
            ['model-00001-of-00001.safetensors']
        """
        return list(self._paths)

    def location(self, name: str) -> tuple[Path, int]:
        """Where a tensor's data starts.

        Args:
            name: tensor name.

        Returns:
            ``(shard path, absolute byte offset of the tensor's first element)``.

        Example:
            >>> path, offset = writer.location("lm_head.weight")
        """
        k, offset, _, _ = self._lookup(name)
        return self._paths[k], offset

    def _lookup(self, name: str) -> tuple[int, int, int, int]:
        try:
            return self._where[name]
        except KeyError:
            raise StreamvecError(f"tensor {name!r} is not in this checkpoint's plan") from None

    # -- lifecycle -------------------------------------------------------------------------

    def create(self) -> None:
        """Create every shard at its final size with its header written.

        Returns:
            None. Raises :class:`OutputError` when the directory is missing or unwritable,
            a file exists (without ``overwrite``), or the disk lacks room.

        Example:
            >>> writer.create()
        """
        with self._cv:
            if self._state != "new":
                raise StreamvecError(f"create() was already called (writer is {self._state})")
            self._state = "creating"
        try:
            self._create_files()
        except BaseException:
            with self._cv:
                self._state = "new"
            raise
        with self._cv:
            self._state = "open"

    def reopen(self) -> None:
        """Open shards an earlier :meth:`create` made, to finish an interrupted job.

        Each shard must exist with exactly the size and header this writer would create, so a
        resumed job cannot write into files laid out differently.

        Raises:
            OutputError: a shard is missing, unreadable, or laid out differently.
        """
        with self._cv:
            if self._state != "new":
                raise StreamvecError(f"reopen() needs a new writer (writer is {self._state})")
        try:
            for path, prefix, size in zip(self._paths, self._prefixes, self._sizes, strict=True):
                fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
                with self._cv:
                    self._fds.append(fd)
                if os.fstat(fd).st_size != size or os.pread(fd, len(prefix), 0) != prefix:
                    raise OutputError(
                        f"{path}: not the shard this job would write (size or header differs); "
                        "start over without --resume"
                    )
        except OSError as exc:
            self._close_fds()
            raise output_error("reopen", path, exc) from exc
        except OutputError:
            self._close_fds()
            raise
        with self._cv:
            self._state = "open"

    def _create_files(self) -> None:
        if not self._dir.is_dir():
            raise OutputError(f"output directory {self._dir} does not exist; create it first")
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        flags |= os.O_TRUNC if self._overwrite else os.O_EXCL
        created: list[Path] = []
        action, path = "create", self._dir / self._index_name
        try:
            self._check_free_space()
            if not self._overwrite and path.exists():
                raise OSError(errno.EEXIST, "File exists")
            for path, prefix, size in zip(self._paths, self._prefixes, self._sizes, strict=True):
                action = "create"
                fd = os.open(path, flags, FILE_MODE)
                with self._cv:
                    self._fds.append(fd)
                created.append(path)
                action = "set the size of"
                os.fchmod(fd, FILE_MODE)  # 0644 whatever the umask: outputs are for sharing
                # Sparse until written; pre-sizing lets pwrite land anywhere, in any order.
                os.ftruncate(fd, size)
                action = "write the header of"
                self._pwrite_all(fd, memoryview(prefix), 0)
        except OSError as exc:
            self._close_fds()
            for done in created:  # half-made shards only waste space (maybe the space we lack)
                try:
                    os.unlink(done)
                except OSError:
                    pass
            raise output_error(action, path, exc) from exc

    def _check_free_space(self) -> None:
        # Fail before hours of compute rather than at the last block: sparse files only
        # claim their blocks when written.
        need = sum(self._sizes)
        if self._overwrite:
            need -= sum(p.stat().st_size for p in self._paths if p.is_file())
        try:
            st = os.statvfs(self._dir)
        except (OSError, AttributeError):
            return  # no statvfs (or it failed): writes will still report ENOSPC
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise OutputError(
                f"{self._dir}: the output needs {need} bytes but only {free} are free; "
                "free disk space or write to another directory"
            )

    def write_rows(self, name: str, row_start: int, block: np.ndarray) -> None:
        """Write rows ``[row_start, row_start + len(block))`` of a tensor (axis 0).

        Thread-safe; blocks may come in any order. A 0-d tensor is one row: pass a 0-d or a
        1-element 1-d block at row 0.

        Args:
            name: tensor name.
            row_start: first row the block covers.
            block: array with the tensor's dtype and shape ``(rows, *shape[1:])``.

        Returns:
            None. Raises :class:`StreamvecError` for a block that does not fit the tensor and
            :class:`OutputError` when the write fails (disk full...).

        Example:
            >>> writer.write_rows("model.embed.weight", 1024, embed[1024:2048])
        """
        k, base, row_bytes, rows = self._lookup(name)
        spec = self._specs[name]
        row_start = operator.index(row_start)
        if not isinstance(block, np.ndarray):
            raise StreamvecError(f"tensor {name!r}: block must be a numpy array, got {type(block)}")
        if block.dtype != spec.dtype:
            raise StreamvecError(
                f"tensor {name!r}: expected dtype {dtype_name(spec.dtype)}, "
                f"got {dtype_name(block.dtype)}"
            )
        if not spec.shape:
            if block.shape not in ((), (1,)) or row_start != 0:
                raise StreamvecError(
                    f"tensor {name!r} is 0-d: expected a block of shape () or (1,) at row 0, "
                    f"got shape {block.shape} at row {row_start}"
                )
            n = 1
        else:
            if block.ndim != len(spec.shape) or block.shape[1:] != spec.shape[1:]:
                want = "(rows, " + ", ".join(map(str, spec.shape[1:])) + ")"
                raise StreamvecError(
                    f"tensor {name!r}: expected a block of shape {want}, got {block.shape}"
                )
            n = block.shape[0]
            if row_start < 0 or row_start + n > rows:
                raise StreamvecError(
                    f"tensor {name!r}: rows {row_start}..{row_start + n} are outside 0..{rows}"
                )
        # A uint8 view, not memoryview(block): the buffer protocol rejects ml_dtypes' bf16.
        data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)

        with self._cv:
            if self._state != "open":
                raise StreamvecError(f"cannot write tensor {name!r}: writer is {self._state}")
            self._inflight += 1  # close() waits, so the fd cannot be closed (and reused) under us
            fd = self._fds[k]
        try:
            self._pwrite_all(fd, data.data, base + row_start * row_bytes)
        except OSError as exc:
            raise output_error(f"write tensor {name!r} to", self._paths[k], exc) from exc
        finally:
            with self._cv:
                self._inflight -= 1
                self._cv.notify_all()
        with self._cv:
            if n:
                _add_rows(self._written[name], row_start, row_start + n)

    @staticmethod
    def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
        # pwrite may write less than asked (Linux caps one call near 2 GiB; signals).
        while data:
            done = os.pwrite(fd, data, offset)
            if done <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            data = data[done:]
            offset += done

    def missing(self) -> dict[str, list[tuple[int, int]]]:
        """Rows not yet written through :meth:`write_rows`.

        Returns:
            ``{name: [(start, stop), ...]}`` for each tensor with holes (empty when complete).

        Example:
            >>> writer.missing()
            {'lm_head.weight': [(0, 512)]}
        """
        out: dict[str, list[tuple[int, int]]] = {}
        with self._cv:
            for name, done in self._written.items():
                if self._specs[name].nbytes == 0:
                    continue
                rows = self._where[name][3]
                holes, pos = [], 0
                for start, stop in done:
                    if start > pos:
                        holes.append((pos, start))
                    pos = stop
                if pos < rows:
                    holes.append((pos, rows))
                if holes:
                    out[name] = holes
        return out

    def finish(self, *, fsync: bool = True, require_complete: bool = True) -> dict[str, str]:
        """Flush and close the shards, then write ``model.safetensors.index.json``.

        Args:
            fsync: fdatasync shards, index and directory first. Without it a late ENOSPC or
                I/O error at writeback can go unreported.
            require_complete: refuse (:class:`StreamvecError`) when some rows were never
                written, instead of leaving zeros; pass False when data was written another
                way (e.g. at :meth:`location` offsets).

        Returns:
            The weight map ``{tensor name: shard file name}``, in spec order.

        Example:
            >>> writer.finish()
            {'w': 'model-00001-of-00001.safetensors'}
        """
        with self._cv:
            if self._state != "open":
                raise StreamvecError(f"cannot finish: writer is {self._state}")
            while self._inflight:
                self._cv.wait()
            if require_complete:
                holes = self.missing()
                if holes:
                    shown = "; ".join(f"{n!r} rows {h}" for n, h in list(holes.items())[:5])
                    raise StreamvecError(
                        f"{len(holes)} tensor(s) not fully written ({shown}); write the missing "
                        "rows, or pass require_complete=False if they were written another way"
                    )
            self._state = "finishing"
        try:
            self._sync_and_close(fsync)
            weight_map = {name: self._paths[self._where[name][0]].name for name in self._specs}
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self._specs.values())},
                "weight_map": weight_map,
            }
            # sort_keys: the layout transformers' save_pretrained writes.
            self._write_index(json.dumps(index, indent=2, sort_keys=True) + "\n", fsync)
        except BaseException:
            self.close()
            raise
        with self._cv:
            self._state = "finished"
        return weight_map

    def _sync_and_close(self, fsync: bool) -> None:
        with self._cv:
            fds, self._fds = self._fds, []
        error: OutputError | None = None
        for fd, path in zip(fds, self._paths, strict=True):
            try:
                if fsync:
                    getattr(os, "fdatasync", os.fsync)(fd)
            except OSError as exc:
                error = error or output_error("flush", path, exc)
            try:
                # close() can be where a network filesystem reports a failed write.
                os.close(fd)
            except OSError as exc:
                error = error or output_error("close", path, exc)
        if error is not None:
            raise error

    def _write_index(self, text: str, fsync: bool) -> None:
        target = self._dir / self._index_name
        tmp = ""
        try:
            # Temp + rename: a reader never sees half an index, and a crash leaves none.
            fd, tmp = tempfile.mkstemp(
                prefix="." + self._index_name + ".", suffix=".tmp", dir=self._dir
            )
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                os.fchmod(fh.fileno(), FILE_MODE)  # mkstemp makes 0600
                fh.write(text)
                fh.flush()
                if fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
            tmp = ""
            if fsync:
                # Make the new directory entries (shards and index) durable too.
                dfd = os.open(self._dir, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            raise output_error("write", target, exc) from exc
        finally:
            if tmp:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def close(self) -> None:
        """Close the shard files without writing the index (idempotent; for error paths).

        Waits for writes in flight. The shard files stay on disk; delete them if unwanted.

        Returns:
            None.

        Example:
            >>> writer.close()
        """
        with self._cv:
            while self._inflight:
                self._cv.wait()
            if self._state != "finished":
                self._state = "closed"
        self._close_fds()

    def _close_fds(self) -> None:
        with self._cv:
            fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass  # only error paths get here; finish() reports close errors itself

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
