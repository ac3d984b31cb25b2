"""The writing operations, in one table: name -> what it computes, its paper, its settings.

Every command that writes an output is one :class:`Operation` here. The CLI refuses, in one
place (:func:`check_settings`), any :class:`~streamvec.engine.settings.Settings` a command was given
but does not support, naming the flag and the command; the Python functions of the operations
call the same check, so the CLI, the API and recipes agree. Merge methods are the entries of
:mod:`streamvec.ops.merge.registry` and run under the ``merge`` entry's settings. Every
writing operation resumes (``--resume``) through the one job lifecycle,
:class:`streamvec.engine.jobs.Job`.

Adding an operation: write its module, add one entry to :data:`OPERATIONS`, and register its
command in the CLI.

Example:
    >>> from streamvec.engine.settings import Settings
    >>> check_settings("svd", Settings(resume=True))  # svd resumes: accepted
    >>> check_settings("lora", Settings(compression="zstd"))
    Traceback (most recent call last):
    ...
    streamvec.errors.StreamvecError: --compression is not supported by `streamvec lora`; \
rerun without it
"""

from __future__ import annotations

from dataclasses import dataclass

from streamvec.engine.settings import Settings
from streamvec.errors import StreamvecError

__all__ = ["OPERATIONS", "Operation", "check_settings"]

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
        module: the module that implements it.
        summary: one line: what it computes.
        paper: the papers it implements.
        settings: the :class:`~streamvec.engine.settings.Settings` fields it honours.
    """

    name: str
    module: str
    summary: str
    paper: str
    settings: frozenset[str]


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation(
            "diff",
            "streamvec.ops.task_vector",
            "task vector tau = theta_ft - theta_base",
            "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
            _RUN | _ZARR | _RESUME | {"vocab", "int_tensors", "strict"},
        ),
        Operation(
            "combine",
            "streamvec.ops.combine",
            "theta_base + lambda * sum_i w_i tau_i (negation, addition, analogies)",
            "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
            _RUN | _ZARR | _SAFETENSORS | _RESUME | {"vocab", "int_tensors", "strict"},
        ),
        Operation(
            "svd",
            "streamvec.ops.svd",
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
            "PEFT LoRA adapter from a fine-tune: B = U sqrt(S), A = sqrt(S) Vh per linear layer",
            "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022 "
            "(arXiv:2106.09685, 2021)",
            # --vocab base only: an adapter applies to the base's vocabulary (see ops/lora.py)
            _RUN | _RESUME | {"strict", "vocab"},
        ),
        Operation(
            "decompose",
            "streamvec.ops.decompose",
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
            "mergekit-style recipes: TIES, DARE, breadcrumbs, DELLA, the papers' variants and "
            "the SVD merges; the methods and their papers are listed in "
            "streamvec.ops.merge.registry (`streamvec merge --list`)",
            "Yadav et al. NeurIPS 2023; Yu et al. ICML 2024; Davari & Belilovsky 2024; "
            "Deep et al. 2024; per method: streamvec.ops.merge.registry",
            _RUN | _SAFETENSORS | _RESUME | {"vocab", "strict"},
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
