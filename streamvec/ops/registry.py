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
    )
}
