"""``streamvec merge-svd``: the TSV-M and Iso-C merges."""

from __future__ import annotations

import argparse

from streamvec.cli.common import (
    add_output_dtype_option,
    add_run_options,
    add_shard_size_option,
    add_svd_options,
    say,
    settings_of,
    svd_options,
)

HELP = "merge task vectors by TSV-M or Iso-C"
DESCRIPTION = (
    "TSV-M (Gargiulo et al., CVPR 2025): each task keeps its top K/T singular "
    "triplets, U and V concatenations are orthogonalised (polar factors), merged = "
    "U_perp diag(S) V_perp^T. Iso-C (Marczak et al., ICML 2025): SVD of sum tau_i, "
    "merged = mean(S) U V^T. Non-matrix tensors are averaged. Output: alpha * merged as "
    "a task-vector store, or with --base the edited model base + alpha * merged. "
    "--vocab base|common|union merges fine-tunes that resized their vocabulary, as "
    "combine does (config.json's vocab_size and the tokenizer files follow)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
    p.add_argument("merge", choices=["tsv", "iso-c"], metavar="{tsv,iso-c}")
    p.add_argument("terms", nargs="+", metavar="TV", help="task-vector stores (or checkpoints)")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--base", metavar="BASE", help="base checkpoint: output the edited model")
    p.add_argument(
        "--alpha", type=float, default=1.0, metavar="A", help="scaling coefficient (default 1)"
    )
    add_output_dtype_option(p)
    add_shard_size_option(p)
    add_svd_options(
        p,
        rank_required=False,
        rank_help="rank budget per matrix (default min(m, n), the papers' full rank)",
    )
    add_run_options(p)


def run(args: argparse.Namespace) -> int:
    """``streamvec merge-svd``: TSV-M or Iso-C merge."""
    from streamvec.ops.merge_svd import merge_svd

    report = merge_svd(
        args.merge,
        args.terms,
        args.output,
        options=svd_options(args, rank=1),
        rank=args.rank,
        alpha=args.alpha,
        base=args.base,
        include=args.include,
        exclude=args.exclude,
        dtype=args.dtype,
        shard_size=args.shard_size,
        run=settings_of(args),
    )
    say(args, report.summary())
    return 0
