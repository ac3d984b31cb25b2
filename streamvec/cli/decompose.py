"""``streamvec decompose``: the shared and unique components of task vectors."""

from __future__ import annotations

import argparse

from streamvec.cli.common import (
    add_run_options,
    add_svd_options,
    add_vocab_option,
    say,
    settings_of,
    svd_options,
)

HELP = "split task vectors into shared and unique components"
DESCRIPTION = (
    "Per matrix: each task's top-K left singular subspace, their common "
    "subspace C (directions with cos^2 overlap >= --threshold with every task), "
    "shared_i = C C^T tau_i and unique_i = tau_i - shared_i (non-matrix tensors: "
    "shared 0, unique tau). OUT is a directory with NAME.shared.zarr (an SVD store) and "
    "NAME.unique.zarr (a task-vector store) per input, each a combine TERM: "
    "`streamvec combine --base B -o X OUT/tox.unique.zarr:-1` negates only the unique "
    "part; `streamvec combine --base B -o X OUT/a.shared.zarr OUT/b.shared.zarr` adds "
    "the shared parts."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
    p.add_argument("terms", nargs="+", metavar="TV", help="task-vector stores (or checkpoints)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="directory to write")
    p.add_argument("--base", metavar="BASE", help="base checkpoint for checkpoint inputs")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.85,
        metavar="T",
        help="cos^2 overlap for a direction to be shared (default 0.85)",
    )
    add_svd_options(p, rank_required=False, rank_help="per-task subspace size K (default 16)")
    p.set_defaults(rank=16)
    add_vocab_option(p)
    add_run_options(p)


def run(args: argparse.Namespace) -> int:
    """``streamvec decompose``: shared and unique components of each task vector."""
    from streamvec.ops.decompose import decompose

    report = decompose(
        args.terms,
        args.output,
        options=svd_options(args),
        threshold=args.threshold,
        base=args.base,
        include=args.include,
        exclude=args.exclude,
        run=settings_of(args),
        vocab=args.vocab,
    )
    say(args, report.summary())
    return 0
