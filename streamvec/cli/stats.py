"""``streamvec stats``: the command over :func:`streamvec.ops.stats.stats`."""

from __future__ import annotations

import argparse
from pathlib import Path

from streamvec.engine.settings import Settings
from streamvec.engine.settings import add_arguments as add_setting_flags
from streamvec.errors import OutputError

# The run settings stats honours (it reads and writes no model: no output settings).
STATS_SETTINGS = ("workers", "scheduler", "memory_limit", "block_size", "verify_inputs")

HELP = "task-vector analytics: norms, cosines, sign conflicts, spectra, plots"
DESCRIPTION = (
    "Look before you merge: per tensor, layer and module kind, the size of "
    "each task vector (L2 norm, ||tau||/||base|| with --base, max |tau|, exact zeros), "
    "their cosine similarities (Gram matrix in float64), magnitude-weighted sign "
    "agreement, the overlap of their top-density magnitudes and, with --spectrum K, "
    "singular values, effective ranks, subspace overlaps and the LoRA rank each module "
    "needs. One streaming pass. TERM is a task-vector store, "
    "an SVD store, or a fine-tuned checkpoint with --base. Writes stats.json and PNG "
    "plots to -o DIR."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
    from streamvec.cli.common import add_filter_options, add_vocab_option
    from streamvec.ops.stats.defaults import DEFAULT_DENSITY, DEFAULT_RESIDUAL

    p.add_argument("terms", nargs="*", metavar="TERM")
    p.add_argument("--base", metavar="BASE", help="base checkpoint (checkpoint terms, sizes)")
    p.add_argument("-o", "--output", type=Path, metavar="DIR", help="write stats.json and PNGs")
    p.add_argument("--json", action="store_true", help="print stats.json instead of the table")
    p.add_argument(
        "--per",
        choices=["module", "layer", "tensor"],
        default="module",
        help="breakdown in the table (default module kind; stats.json has all three)",
    )
    p.add_argument(
        "--density",
        type=float,
        default=DEFAULT_DENSITY,
        metavar="D",
        help=f"top-k share for the magnitude overlap (default {DEFAULT_DENSITY}, as TIES; 0 "
        "skips it); each tensor's threshold comes from a sample of it",
    )
    p.add_argument(
        "--exact-topk",
        action="store_true",
        help="top-k thresholds from a histogram of every entry (the exact top k plus the rest "
        "of its 2^-7 magnitude bin), at the cost of a second pass",
    )
    p.add_argument(
        "--spectrum",
        type=int,
        default=0,
        metavar="K",
        help="top-K singular values per matrix by randomized SVD (default 0: only what SVD "
        "store terms hold)",
    )
    p.add_argument(
        "--residual",
        type=float,
        default=DEFAULT_RESIDUAL,
        metavar="E",
        help=f"residual energy share for the LoRA rank table (default {DEFAULT_RESIDUAL})",
    )
    p.add_argument("--seed", type=int, default=0, help="randomized SVD seed")
    p.add_argument("--no-plots", action="store_true", help="with -o: stats.json only")
    g = p.add_argument_group("running")
    # The run settings stats honours, with the flags every command has (one definition each).
    add_setting_flags(g, STATS_SETTINGS)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    add_filter_options(p)
    add_vocab_option(p)


def run(args: argparse.Namespace) -> int:
    """Compute the figures; print the table, or the JSON; write stats.json and the plots."""
    from streamvec.ops.stats.api import StatsOptions, stats
    from streamvec.ops.stats.report import format_stats, write_json

    run = Settings.from_args(args)  # validated once, as for every command
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        raise OutputError(f"-o {args.output}: exists and is not a directory; choose a directory")
    st = stats(
        args.terms,
        base=args.base,
        include=args.include,
        exclude=args.exclude,
        vocab=args.vocab,
        options=StatsOptions(
            density=args.density,
            exact_topk=args.exact_topk,
            spectrum=args.spectrum,
            residual=args.residual,
            seed=args.seed,
        ),
        workers=run.workers,
        scheduler=run.scheduler,
        memory_limit=run.memory_limit,
        block_size=run.block_size,
        progress=run.progress,
    )
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        write_json(st, args.output / "stats.json")
        if not args.no_plots:
            st.plot(args.output)
    if args.json:
        import json

        print(json.dumps(st.to_dict(), indent=1))
    elif not args.quiet:
        print(format_stats(st, args.per))
        if args.output is not None:
            print(f"\nwrote {args.output / 'stats.json'}" + ("" if args.no_plots else " and plots"))
    return 0
