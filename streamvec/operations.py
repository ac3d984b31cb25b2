"""The writing operations, in one table: name -> what it computes, its paper, its settings.

Every command that writes an output is one :class:`Operation` here. The CLI refuses, in one
place (:func:`check_settings`), any :class:`~streamvec.settings.Settings` a command was given
but does not support, naming the flag and the command; the Python functions of the operations
call the same check, so the CLI, the API and recipes agree. Merge methods are the entries of
:mod:`streamvec.merge.registry` and run under the ``merge`` entry's settings, less those
their method cannot honour (:func:`merge_method_settings`).

Adding an operation: write its module, add one entry to :data:`OPERATIONS`, and register its
command in the CLI.

Example:
    >>> from streamvec.settings import Settings
    >>> check_settings("svd", Settings(resume=True))  # svd resumes: accepted
    >>> check_settings("lora", Settings(compression="zstd"))
    Traceback (most recent call last):
    ...
    streamvec.errors.StreamvecError: --compression is not supported by `streamvec lora`; \
rerun without it
"""

from __future__ import annotations

from dataclasses import dataclass

from streamvec.errors import StreamvecError
from streamvec.settings import Settings

__all__ = ["OPERATIONS", "Operation", "check_settings", "merge_method_settings"]

# What every streaming command honours.
_RUN = frozenset(
    {
        "workers",
        "scheduler",
        "memory_limit",
        "progress",
        "overwrite",
        "block_size",
        "check_finite",
        "device",
        "verify_inputs",
        "sync_seconds",
    }
)
_ZARR = frozenset({"compression"})  # writes a Zarr store through the engine
_SAFETENSORS = frozenset({"shard_size"})  # can write a sharded safetensors checkpoint
_RESUME = frozenset({"resume"})


@dataclass(frozen=True)
class Operation:
    """One writing operation.

    Attributes:
        name: the command name (``streamvec NAME``).
        summary: one line: what it computes.
        paper: the method it implements, or "" for plain arithmetic.
        settings: the :class:`~streamvec.settings.Settings` fields it honours.
    """

    name: str
    summary: str
    paper: str
    settings: frozenset[str]


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation(
            "diff",
            "task vector FINETUNED - BASE into a Zarr store",
            "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
            _RUN | _ZARR | _RESUME | {"vocab", "int_tensors"},
        ),
        Operation(
            "combine",
            "task arithmetic: base + lambda * sum_i w_i tau_i, or the combined task vector",
            "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
            _RUN | _ZARR | _SAFETENSORS | _RESUME | {"vocab", "int_tensors", "strict"},
        ),
        Operation(
            "svd",
            "truncated SVD of every matrix of a task vector, into an SVD store",
            "Halko, Martinsson & Tropp, SIAM Review 2011 (randomized SVD)",
            _RUN | _RESUME | {"vocab"},
        ),
        Operation(
            "lora",
            "a task vector (or several adapters and fine-tunes) as a PEFT LoRA adapter",
            "Hu et al., LoRA, ICLR 2022",
            _RUN | {"strict"},
        ),
        Operation(
            "decompose",
            "shared and unique components of several task vectors",
            "Damirchi et al., arXiv:2512.22511, 2025",
            # not compression: the shared parts are SVD stores with their own codec
            _RUN | {"vocab"},
        ),
        Operation(
            "merge-svd",
            "TSV-M or Iso-C merge of task vectors",
            "Gargiulo et al., CVPR 2025 (TSV-M); Marczak et al., ICML 2025 (Iso-C)",
            _RUN | _ZARR | _SAFETENSORS,
        ),
        Operation(
            "merge",
            "a mergekit-style recipe (streamvec merge --list names the methods)",
            "per method: see streamvec.merge.registry",
            _RUN | _SAFETENSORS | _RESUME | {"vocab"},
        ),
    )
}


def check_settings(command: str, settings: Settings) -> None:
    """Refuse a setting ``command`` was given but does not support.

    Args:
        command: an :data:`OPERATIONS` name.
        settings: the run's settings.

    Raises:
        StreamvecError: naming the flag and the command.
    """
    op = OPERATIONS.get(command)
    if op is None:
        raise StreamvecError(f"unknown operation {command!r}; operations: {', '.join(OPERATIONS)}")
    settings.check_supported(command, op.settings)


def merge_method_settings(method: str) -> frozenset[str]:
    """The settings a recipe with ``merge_method: METHOD`` honours.

    TSV-M and Iso-C write their factors to a temporary store before the output pass, so they
    cannot resume yet (as ``streamvec merge-svd``).
    """
    supported = OPERATIONS["merge"].settings
    if method in ("tsv", "iso_c"):
        return supported - _RESUME
    return supported
