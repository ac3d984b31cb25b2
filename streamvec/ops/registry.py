"""Every operation in one table: name -> what it computes, its paper, its settings, its command.

:data:`OPERATIONS` holds each command that writes an output (``diff``, ``combine``, ``svd``,
``lora``, ``decompose``, ``merge-svd``, ``merge``) and each merge method a ``merge`` recipe
names (``ties``, ``dare_ties``, ..., ``tsv``, ``iso_c``, ``shared_unique``). The command line
builds its commands from it (:mod:`streamvec.cli.main`), recipes find their method in it
(:func:`streamvec.ops.merge.registry.get_method`), and the Python functions of the operations
check their settings against it, so the three agree. Entries name modules, which are imported
only when used: a command's start-up imports its own operation, not every operation's.

The CLI refuses, in one place (:func:`check_settings`), any
:class:`~streamvec.engine.settings.Settings` a command was given but does not support, naming
the flag and the command. Merge methods run under the ``merge`` entry's settings. Every writing
operation resumes (``--resume``) through the one job lifecycle,
:class:`streamvec.engine.jobs.Job`.

Adding a command: its module under ``streamvec/ops/``, its command-line module under
``streamvec/cli/`` (``HELP``, ``DESCRIPTION``, ``add_arguments``, ``run``), and one
:class:`Operation` below. Adding a merge method: its module under
``streamvec/ops/merge/methods/`` (defining ``METHOD``) and one :func:`_method` line below.

Example:
    >>> from streamvec.engine.settings import Settings
    >>> check_settings("svd", Settings(resume=True))  # svd resumes: accepted
    >>> check_settings("lora", Settings(compression="zstd"))
    Traceback (most recent call last):
    ...
    streamvec.errors.StreamvecError: --compression is not supported by `streamvec lora`; \
rerun without it
    >>> OPERATIONS["ties"].load().paper[:21]
    'Yadav et al., TIES-Me'
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from streamvec.engine.settings import Settings
from streamvec.errors import StreamvecError

if TYPE_CHECKING:
    from streamvec.ops.merge.method import MergeMethod

__all__ = [
    "OPERATIONS",
    "MergeMethodEntry",
    "Operation",
    "check_settings",
    "commands",
    "operation",
]

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
    """One command that writes an output.

    Attributes:
        name: the command name (``streamvec NAME``).
        module: the module that implements it.
        cli: its command-line module: ``HELP``, ``DESCRIPTION`` (and optionally ``EPILOG``,
            ``FORMATTER``), ``add_arguments(parser)`` and ``run(args) -> exit code``.
        summary: one line: what it computes.
        paper: the papers it implements.
        settings: the :class:`~streamvec.engine.settings.Settings` fields it honours.
    """

    name: str
    module: str
    cli: str
    summary: str
    paper: str
    settings: frozenset[str]

    def command(self) -> ModuleType:
        """The command-line module (imported on first use)."""
        return importlib.import_module(self.cli)


@dataclass(frozen=True)
class MergeMethodEntry:
    """One merge method of ``merge`` recipes; its summary, paper and parameters are the
    :class:`~streamvec.ops.merge.method.MergeMethod` its module defines as ``METHOD``.

    Attributes:
        name: the recipe's ``merge_method``.
        module: the module defining ``METHOD``.
    """

    name: str
    module: str

    def load(self) -> MergeMethod:
        """The method (its module imported on first use)."""
        method: MergeMethod = importlib.import_module(self.module).METHOD
        return method


def _method(name: str) -> MergeMethodEntry:
    """The merge method ``name``, defined in ``streamvec/ops/merge/methods/<name>.py``."""
    return MergeMethodEntry(name, f"streamvec.ops.merge.methods.{name}")


OPERATIONS: dict[str, Operation | MergeMethodEntry] = {
    op.name: op
    for op in (
        Operation(
            "diff",
            "streamvec.ops.task_vector",
            "streamvec.cli.diff",
            "task vector tau = theta_ft - theta_base",
            "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
            _RUN | _ZARR | _RESUME | {"vocab", "int_tensors", "strict"},
        ),
        Operation(
            "combine",
            "streamvec.ops.combine",
            "streamvec.cli.combine",
            "theta_base + lambda * sum_i w_i tau_i (negation, addition, analogies)",
            "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
            _RUN | _ZARR | _SAFETENSORS | _RESUME | {"vocab", "int_tensors", "strict"},
        ),
        Operation(
            "svd",
            "streamvec.ops.svd",
            "streamvec.cli.svd",
            "truncated SVD U diag(S) Vh of every matrix (randomized subspace iteration over "
            "row blocks, or exact LAPACK where it fits), stored as a low-rank task vector",
            "Halko, Martinsson & Tropp, Finding Structure with Randomness: Probabilistic "
            "Algorithms for Constructing Approximate Matrix Decompositions, SIAM Review 53(2), "
            "2011 (Algorithms 4.4 and 5.1)",
            _RUN | _RESUME | {"vocab", "strict"},
        ),
        Operation(
            "lora",
            "streamvec.ops.lora",
            "streamvec.cli.lora",
            "PEFT LoRA adapter from a fine-tune: B = U sqrt(S), A = sqrt(S) Vh per linear layer",
            "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022 "
            "(arXiv:2106.09685, 2021)",
            # --vocab base only: an adapter applies to the base's vocabulary (see ops/lora.py)
            _RUN | _RESUME | {"strict", "vocab"},
        ),
        Operation(
            "decompose",
            "streamvec.ops.decompose",
            "streamvec.cli.decompose",
            "shared_i = C C^T tau_i over the common left singular subspace C of the tasks, "
            "unique_i = tau_i - shared_i",
            "Damirchi, Abbasnejad, Zhang & Shi, Decomposing Task Vectors for Refined Model "
            "Editing, arXiv:2512.22511, 2025",
            # not compression: the shared parts are SVD stores with their own codec
            _RUN | _RESUME | {"vocab", "strict"},
        ),
        Operation(
            "merge-svd",
            "streamvec.ops.merge_svd",
            "streamvec.cli.merge_svd",
            "tsv (TSV-M): per-task top singular triplets, orthogonalised bases, "
            "U_perp diag(S) V_perp^T; iso-c (Iso-C): SVD of sum tau_i with a flat spectrum, "
            "mean(S) U V^T (also merge_method tsv / iso_c of `streamvec merge`)",
            "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model "
            "Merging, CVPR 2025; Marczak et al., No Task Left Behind: Isotropic Model Merging "
            "with Common and Task-Specific Subspaces, ICML 2025",
            _RUN | _ZARR | _SAFETENSORS | _RESUME | {"vocab", "strict"},
        ),
        Operation(
            "merge",
            "streamvec.ops.merge",
            "streamvec.cli.merge",
            "mergekit-style recipes: TIES, DARE, breadcrumbs, DELLA, the papers' variants and "
            "the SVD merges; the methods, each with its paper and parameters, are the entries "
            "below (`streamvec merge --list`)",
            "Yadav et al. NeurIPS 2023; Yu et al. ICML 2024; Davari & Belilovsky 2024; "
            "Deep et al. 2024; per method: the entries below",
            _RUN | _SAFETENSORS | _RESUME | {"vocab", "strict"},
        ),
        # The merge methods of `merge` recipes. mergekit 0.1.5's generalized task
        # arithmetic, same names, parameters and defaults:
        _method("task_arithmetic"),
        _method("ties"),
        _method("dare_ties"),
        _method("dare_linear"),
        _method("breadcrumbs"),
        _method("breadcrumbs_ties"),
        _method("della"),
        _method("della_linear"),
        # the papers' own definitions where they differ from mergekit's
        _method("ties_paper"),
        _method("dare_paper"),
        _method("breadcrumbs_paper"),
        # SVD-based merges (streamvec.ops.merge_svd)
        _method("tsv"),
        _method("iso_c"),
        # shared/unique components of the task vectors (streamvec.ops.decompose)
        _method("shared_unique"),
    )
}


def commands() -> list[Operation]:
    """The entries that are commands, in the table's order."""
    return [op for op in OPERATIONS.values() if isinstance(op, Operation)]


def operation(command: str) -> Operation:
    """The entry of the command ``command``.

    Raises:
        StreamvecError: no command of that name (a merge method is not one).
    """
    op = OPERATIONS.get(command)
    if not isinstance(op, Operation):
        names = ", ".join(op.name for op in commands())
        raise StreamvecError(f"unknown command {command!r}; commands: {names}")
    return op


def check_settings(command: str, settings: Settings) -> None:
    """Refuse a setting ``command`` was given but does not support.

    Args:
        command: an :data:`OPERATIONS` name.
        settings: the run's settings.

    Raises:
        StreamvecError: naming the flag and the command.
    """
    settings.check_supported(command, operation(command).settings)
