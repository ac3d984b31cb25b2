"""The operations streamvec implements, in one explicit table, each with its source paper."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Operation:
    name: str
    module: str
    summary: str
    paper: str


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation(
            "diff",
            "streamvec.ops.task_vector",
            "task vector tau = theta_ft - theta_base",
            "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
        ),
        Operation(
            "combine",
            "streamvec.ops.combine",
            "theta_base + lambda * sum_i w_i tau_i (negation, addition, analogies)",
            "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
        ),
        Operation(
            "svd",
            "streamvec.ops.svd",
            "truncated SVD U diag(S) Vh of every matrix (randomized subspace iteration over "
            "row blocks, or exact LAPACK where it fits), stored as a low-rank task vector",
            "Halko, Martinsson & Tropp, Finding Structure with Randomness: Probabilistic "
            "Algorithms for Constructing Approximate Matrix Decompositions, SIAM Review 53(2), "
            "2011 (Algorithms 4.4 and 5.1)",
        ),
        Operation(
            "lora",
            "streamvec.ops.lora",
            "PEFT LoRA adapter from a fine-tune: B = U sqrt(S), A = sqrt(S) Vh per linear layer",
            "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022 "
            "(arXiv:2106.09685, 2021)",
        ),
        Operation(
            "decompose",
            "streamvec.ops.decompose",
            "shared_i = C C^T tau_i over the common left singular subspace C of the tasks, "
            "unique_i = tau_i - shared_i",
            "Damirchi, Abbasnejad, Zhang & Shi, Decomposing Task Vectors for Refined Model "
            "Editing, arXiv:2512.22511, 2025",
        ),
        Operation(
            "merge-svd tsv",
            "streamvec.ops.merge_svd",
            "TSV-M: per-task top singular triplets, orthogonalised bases, U_perp diag(S) V_perp^T",
            "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model "
            "Merging, CVPR 2025",
        ),
        Operation(
            "merge-svd iso-c",
            "streamvec.ops.merge_svd",
            "Iso-C: SVD of sum tau_i with a flat spectrum, mean(S) U V^T",
            "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
            "Task-Specific Subspaces, ICML 2025",
        ),
        Operation(
            "merge",
            "streamvec.merge",
            "mergekit-style recipes: TIES, DARE, breadcrumbs, DELLA and the papers' variants; "
            "the methods and their papers are listed in streamvec.merge.registry",
            "Yadav et al. NeurIPS 2023; Yu et al. ICML 2024; Davari & Belilovsky 2024; "
            "Deep et al. 2024",
        ),
    )
}
