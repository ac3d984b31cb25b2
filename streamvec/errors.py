"""The project's error family.

Every error a user can cause (bad input, bad usage, mismatched checkpoints) is a
:class:`StreamvecError`; the CLI turns it into one line on stderr and exit code 2.
Each subclass also derives from the matching builtin, so callers can catch either.
"""

from __future__ import annotations


class StreamvecError(ValueError):
    """Base class: something about the input or the request is wrong (exit code 2)."""


class HeaderError(StreamvecError):
    """A safetensors header is malformed, inconsistent with its file, or hostile."""


class CheckpointError(StreamvecError):
    """A checkpoint directory, index file or shard set is unusable."""


class InputNotFoundError(StreamvecError, FileNotFoundError):
    """A path the user named does not exist."""


class MismatchError(StreamvecError):
    """Operands of an operation disagree: missing tensors, shapes or dtypes."""


class OutputError(StreamvecError):
    """The output path cannot be written (exists, is a file, not writable, disk full)."""


class InputChangedError(StreamvecError):
    """An input file changed (truncated, replaced, rewritten) while a run was reading it."""


class StoreError(StreamvecError):
    """A Zarr store is not one streamvec wrote, or is damaged."""
