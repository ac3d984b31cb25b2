"""``streamvec svd``: the truncated SVD of every matrix of a task vector, into an SVD store."""

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

HELP = "truncated SVD of every matrix of a task vector, into an SVD store"
DESCRIPTION = (
    "Factor every matrix of a task vector as U diag(S) Vh with K triplets "
    "(randomized subspace iteration, Halko et al. 2011, streamed over row blocks; or "
    "LAPACK's exact SVD where it fits --memory-limit and is faster). SOURCE is a "
    "task-vector store, or FINETUNED with --base BASE (tau recomputed block by block, "
    "never stored). Tensors with more than 2 axes are factored as (shape[0], "
    "prod(rest)); 0-d/1-d tensors are stored dense. The store is a valid combine TERM "
    "(read back as U S Vh)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
    p.add_argument("source", metavar="SOURCE", help="task-vector store, or FINETUNED checkpoint")
    p.add_argument("--base", metavar="BASE", help="base checkpoint when SOURCE is a checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the SVD store to write")
    add_svd_options(p, rank_required=True, rank_help="triplets per matrix (min(K, m, n))")
    add_vocab_option(p)
    add_run_options(p)


def run(args: argparse.Namespace) -> int:
    """``streamvec svd``: truncated SVD of every matrix into an SVD store."""
    from streamvec.ops.svd import svd

    report = svd(
        args.source,
        args.output,
        options=svd_options(args),
        base=args.base,
        include=args.include,
        exclude=args.exclude,
        run=settings_of(args),
        vocab=args.vocab,
    )
    say(args, report.summary())
    return 0
