"""Output directories that appear only when complete.

Work goes to a hidden temporary sibling (``.NAME.partial``) guarded by an exclusive lock on
``.NAME.lock``; :meth:`OutputDir.commit` makes the data durable and renames it to the final
name. A failed run removes its partial output. Two runs writing the same output refuse each
other through the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from streamvec.errors import OutputError, StreamvecError
from streamvec.io.zarr.inflight import wait_for_zarr_writes
from streamvec.signals import deferred

if TYPE_CHECKING:
    from streamvec.model.algebra import Source


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Temporary files of writes cut short: zarr's LocalStore and the chunk writer write
# NAME.<32 hex>.partial and rename it; the safetensors index goes through .NAME.<random>.tmp.
# The last output this process gave its final name: a signal that arrives during the final
# rename is raised once the output is complete, and the command line then says so.
_last_finished: list[Path] = []


def finished(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the output this process finished last (see :meth:`OutputDir.commit`)."""
    return bool(_last_finished) and _last_finished[0] == Path(path).absolute()


_STRAY = re.compile(r"(\.[0-9a-f]{32}\.partial|^\.model\.safetensors\.index\.json\..+\.tmp)$")


def remove_stray_temporaries(directory: Path) -> int:
    """Delete the temporary files a killed run left inside an unfinished output.

    A write that is killed between creating its temporary file and renaming it leaves the
    temporary behind; resuming rewrites the data under the real name, so the temporary is
    only litter, but it would end up in the finished output. Returns how many were removed.
    """
    removed = 0
    for path in directory.rglob("*"):
        if _STRAY.search(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def output_error(action: str, path: Path, exc: OSError) -> OutputError:
    """An :class:`OutputError` that says what failed, where, and what to do about it."""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space (or raise the quota), or write to another directory"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a directory you can write to"
    elif code == errno.EEXIST:
        fix = "remove it or choose an empty output directory"
    else:
        fix = "check the output directory and the device it is on"
    reason = exc.strerror or str(exc)
    return OutputError(f"cannot {action} {path}: {reason}; {fix}")


InputPaths = Iterable[str | os.PathLike[str]]


def input_paths(sources: Iterable[Source]) -> list[Path]:
    """Every file and directory the sources read: what an output must not overlap.

    Args:
        sources: the inputs of a computation (``model.sources()``).

    Returns:
        The paths as given, the shard files or stores their tensors are read from, and the
        files copied from them (config, tokenizer).
    """
    paths: dict[Path, None] = {}
    for source in sources:
        paths[Path(source.label)] = None
        paths[Path(source.key)] = None
        for t in source.tensors.values():
            where = getattr(t.reader, "path", None) or getattr(t.reader, "store", None)
            if where is not None:
                paths[Path(str(where))] = None
        for extra in source.extra_files:
            paths[Path(extra)] = None
    return list(paths)


def free_bytes(directory: Path) -> int | None:
    """Bytes free to this user on the file system of ``directory`` (None: unknown)."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def check_free_space(final: Path, need: int) -> None:
    """Refuse to start an output of about ``need`` bytes where less is free.

    Args:
        final: the output path (its parent's file system is checked).
        need: the bytes the output is expected to take.

    Raises:
        OutputError: naming the output, the space it needs and the space free.
    """
    free = free_bytes(final.absolute().parent)
    if free is not None and need > free:
        raise OutputError(
            f"{final}: the output needs about {need} bytes but only {free} are free on its "
            "disk; free disk space or write to another directory"
        )


def refuse_overlap(final: str | os.PathLike[str], inputs: InputPaths) -> None:
    """Refuse an output that is, contains, or lies inside one of the inputs.

    Symlinks are resolved on both sides, so a link to an input is the input. Writing the
    output (and, with ``--overwrite``, renaming the old one away) would otherwise delete or
    change an input, and the temporary siblings of an output inside an input directory would
    change that directory.

    Args:
        final: the output path.
        inputs: every file and directory the command reads.

    Raises:
        OutputError: the first input the output overlaps.
    """
    out = Path(final).absolute().resolve()
    for given in inputs:
        where = Path(given).absolute().resolve()
        if where == out:
            how = "is"
        elif out in where.parents:
            how = "contains"
        elif where in out.parents and where.is_dir():
            how = "lies inside"
        else:
            continue
        raise OutputError(
            f"{final}: {how} the input {given}; writing it would change or delete that input, "
            "so write to another path"
        )


def check_destination(final: Path, *, overwrite: bool, inputs: InputPaths) -> None:
    """The checks made before anything is written: overlap, parent, existing output.

    Commands that compute for long before opening their output call this first, so a bad
    destination fails at once; :meth:`OutputDir.open` calls it again.
    """
    refuse_overlap(final, inputs)
    parent = final.absolute().parent
    if not parent.is_dir():
        raise OutputError(f"{final}: parent directory {parent} does not exist; create it")
    if final.exists() or final.is_symlink():
        if final.is_file():
            raise OutputError(f"{final}: exists and is a file; choose another output path")
        if not overwrite:
            raise OutputError(f"{final}: already exists; choose another path or pass --overwrite")


# The manifests streamvec writes beside its outputs' files: a safetensors checkpoint's or
# adapter's (streamvec.engine.sinks.MANIFEST_NAME) and a decompose directory's
# (streamvec.ops.decompose.MANIFEST); named here, below both, which import this module.
OUTPUT_MANIFESTS = ("streamvec.json", "decomposition.json")


def made_by_streamvec(path: Path) -> bool:
    """Whether ``path`` is an output streamvec wrote: a store with its root attrs, a
    checkpoint or adapter with its manifest, or a ``decompose`` directory."""
    if any((path / name).is_file() for name in OUTPUT_MANIFESTS):
        return True
    try:
        root = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(root, dict) and "streamvec" in (root.get("attributes") or {})


_PARTIAL = re.compile(r"^\.(.+)\.partial$")


def shown_output(final: Path, intermediate: bool = False) -> Path:
    """The output the user asked for, of which ``final`` may be a part.

    ``final`` itself; or, when it lies inside another run's unfinished output
    (``/d/.OUT.partial/a.unique.zarr``), that output (``/d/OUT``); or, for an intermediate
    (``/d/.OUT.factors``, named so by the command writing OUT), OUT.
    """
    parts = final.parts
    for i, part in enumerate(parts[:-1]):
        hit = _PARTIAL.match(part)
        if hit:
            return Path(*parts[:i], hit.group(1))
    if intermediate:
        return final.with_name(final.name[1:].rsplit(".", 1)[0])
    return final


class OutputDir:
    """A temporary sibling of ``final`` that becomes ``final`` on :meth:`commit`.

    Every command that writes an output goes through this class, so the checks here (the
    output never overlaps an input, an existing output needs ``overwrite``) hold for all.

    Args:
        final: the output path the user asked for.
        overwrite: replace an existing output (only once the new one is complete).
        inputs: every file or directory the command reads (see :func:`refuse_overlap`);
            required so that no command can forget it.
        intermediate: ``final`` is a hidden sibling of another output (``.OUT.factors``),
            whose partial output and lock keep its name with ``.partial`` / ``.lock`` added.
    """

    def __init__(
        self,
        final: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        inputs: InputPaths,
        intermediate: bool = False,
    ) -> None:
        self.final = Path(final).absolute()
        self.overwrite = overwrite
        self.inputs = [Path(p) for p in inputs]
        # Set by a command that knows its output's size: said when the disk fills up.
        self.expected_bytes: int | None = None
        parent = self.final.parent
        # An intermediate (``.OUT.factors``) is hidden already; hiding it twice would put its
        # files outside the ``.OUT.`` names of the run that writes OUT.
        hidden = self.final.name if intermediate else f".{self.final.name}"
        self.partial = parent / f"{hidden}.partial"
        # The output the user asked for, which errors name: this one, or the one whose
        # unfinished copy (``.OUT.partial/...``) or hidden sibling (``.OUT.factors``) it is.
        self.shown = shown_output(self.final, intermediate)
        self.intermediate = intermediate
        self.lock_path = parent / f"{hidden}.lock"
        self._lock_fd: int | None = None

    def __enter__(self) -> OutputDir:
        try:
            self.open()
        except BaseException:  # a signal after the lock was taken: __exit__ will not run
            if self._lock_fd is not None:  # only what this run holds, never another run's
                self.abort()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
            if isinstance(exc, OSError) and not isinstance(exc, StreamvecError):
                raise self.write_error(exc) from None

    def write_error(self, exc: OSError) -> OutputError:
        """An error writing the output, in words: disk full says the space needed and free."""
        err = output_error("write", self.shown, exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = free_bytes(self.final.parent)
            # the size of a part (an intermediate) is not what the output needs
            whole = self.expected_bytes and self.shown == self.final
            need = f"up to {self.expected_bytes} bytes" if whole else "more space"
            have = f" ({free} free now)" if free is not None else ""
            err = OutputError(
                f"cannot write {self.shown}: disk full; the output needs {need}{have}; free "
                "disk space or write to another directory (nothing was kept)"
            )
        return err

    def open(self, *, keep_partial: bool = False) -> bool:
        """Check the destination, take the lock and make the partial directory.

        Args:
            keep_partial: keep an unfinished partial output left by an earlier run (resume).

        Returns:
            True when an earlier partial output was kept.
        """
        parent = self.final.parent
        if finished(self.final):
            _last_finished.clear()  # written anew: no longer the output this process finished
        if self.intermediate and self.final.exists() and not made_by_streamvec(self.final):
            # an intermediate left by an earlier run is replaced; a folder of the user's is not
            raise OutputError(
                f"{self.final} exists and was not written by streamvec, which keeps the "
                f"intermediate results of {self.shown} under that name; move it away, or "
                "choose another output name"
            )
        check_destination(self.final, overwrite=self.overwrite, inputs=self.inputs)
        if not os.access(parent, os.W_OK):
            raise OutputError(f"{self.final}: directory {parent} is not writable")
        # Ctrl-C or SIGTERM waits until the lock and the partial directory are both made (or
        # neither is), so an interrupted start never leaves either behind unowned.
        with deferred():
            self._take_lock()
            if self.partial.is_dir() and keep_partial:
                return True
            if self.partial.exists():
                # Left by a run that died; nobody holds the lock, so it is ours to clear.
                shutil.rmtree(self.partial, ignore_errors=True)
            try:
                self.partial.mkdir()
            except OSError as exc:
                self.release()
                raise OutputError(f"{self.partial}: cannot create ({exc.strerror})") from None
            return False

    def _take_lock(self) -> None:
        fd = None
        try:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if fd is not None:
                os.close(fd)  # another run's lock file: never unlinked by this one
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(
                    f"{self.final}: another streamvec run is writing this output; wait for it "
                    "or choose another path"
                ) from None
            raise OutputError(f"{self.final}: cannot create lock file ({exc.strerror})") from None
        self._lock_fd = fd

    def commit(self) -> Path:
        """Make the partial output durable, then rename it to the final path."""
        os.sync()  # one call flushes every file of the partial output before the rename
        # An --overwrite moves the old output aside before the new one takes its name: a
        # signal between the two renames would leave neither under the final name, and one
        # raised after them would leave the old output and the lock behind. A signal is
        # raised when all of it is done, with the output complete and recorded as finished.
        with deferred():
            trash = None
            if self.final.exists():
                trash = self.final.parent / f".{self.final.name}.old"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(self.final, trash)
            os.replace(self.partial, self.final)
            _fsync_dir(self.final.parent)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
            self.release()
            _last_finished[:] = [self.final.absolute()]
        return self.final

    def abort(self) -> None:
        """Remove the partial output and release the lock (not cut short by a signal).

        Only while this run holds the lock: after a refused :meth:`open` (another run is
        writing) or a :meth:`release`, the partial output is not this run's to remove.
        """
        with deferred():
            if self._lock_fd is None:
                return
            wait_for_zarr_writes()  # a write still in flight would make its folders again
            shutil.rmtree(self.partial, ignore_errors=True)
            self.release()

    def release(self) -> None:
        """Give up the lock and remove its file; the partial output stays (for --resume)."""
        with deferred():
            if self._lock_fd is None:
                return
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
