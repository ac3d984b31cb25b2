"""Flags and helpers the commands' parsers share: the run settings, filters, output dtype,
``--vocab``, ``--shard-size``, ``--report``, the SVD flags; and turning parsed arguments into
settings.

Each command module (``streamvec/cli/<command>.py``) imports these from here; none imports
:mod:`streamvec.cli.main`, which loads them: no import cycle.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from streamvec.engine.settings import Settings


def add_run_options(p: argparse.ArgumentParser, *, filters: bool = True) -> None:
    """The flags of every run setting (generated from :class:`streamvec.engine.settings.Settings`);
    ``main`` refuses those the command does not support (:mod:`streamvec.ops.registry`)."""
    from streamvec.engine.settings import add_arguments

    add_arguments(p.add_argument_group("running"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(run_settings=True)
    if filters:
        add_filter_options(p)


def add_filter_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tensor filters")
    g.add_argument(
        "--include", action="append", metavar="PAT", help="only tensors matching PAT (repeatable)"
    )
    g.add_argument(
        "--exclude",
        action="append",
        metavar="PAT",
        help="leave out tensors matching PAT (repeatable)",
    )


def add_int_tensors_option(p: argparse.ArgumentParser) -> None:
    """``--int-tensors`` (a run setting; :func:`_add_run_options` adds it too)."""
    from streamvec.engine.settings import add_arguments

    add_arguments(p, ["int_tensors"])


def add_output_dtype_option(
    p: argparse.ArgumentParser,
    help: str = "output dtype (default: the base's, or float32 for a task vector)",  # noqa: A002
) -> None:
    """``--dtype`` with the output dtypes streamvec writes."""
    from streamvec.dtypes import OUTPUT_DTYPES

    p.add_argument("--dtype", choices=list(OUTPUT_DTYPES), help=help)


def add_vocab_option(p: argparse.ArgumentParser) -> None:
    """``--vocab`` (a run setting; :func:`_add_run_options` adds it too)."""
    from streamvec.engine.settings import add_arguments

    add_arguments(p, ["vocab"])


def add_shard_size_option(p: argparse.ArgumentParser) -> None:
    """``--shard-size`` (a run setting; :func:`_add_run_options` adds it too)."""
    from streamvec.engine.settings import add_arguments

    add_arguments(p, ["shard_size"])


def say(args: argparse.Namespace, text: str) -> None:
    """Print unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(text)


def settings_of(args: argparse.Namespace) -> Settings:
    """The run settings of a command's arguments, checked once by ``main``."""
    settings = getattr(args, "settings", None)
    if settings is None:
        settings = Settings.from_args(args)
    return settings


def run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine's keyword arguments of a command's settings (``.save(**...)``)."""
    return settings_of(args).engine_kwargs()


def add_report_option(p: argparse.ArgumentParser) -> None:
    """``--report FILE``: the run's figures as JSON, for batch jobs and benchmarks."""
    p.add_argument(
        "--report",
        type=Path,
        metavar="FILE",
        help="also write what the run did as JSON to FILE: bytes read and written, seconds, "
        "and seconds per stage (read, compute, encode, write, checksum; summed over blocks)",
    )


def write_report(args: argparse.Namespace, report: Any) -> None:
    """Write ``--report`` if asked (a RunReport, without its per-tensor checksums)."""
    if getattr(args, "report", None) is None:
        return
    data = {k: v for k, v in vars(report).items() if k != "checksums"}
    args.report.write_text(json.dumps(data, indent=1, default=str) + "\n")


# -- the SVD family's flags (svd, lora, decompose, merge-svd) ---------------------------------


def add_svd_options(p: argparse.ArgumentParser, *, rank_required: bool, rank_help: str) -> None:
    """The randomized SVD's flags: --rank, --oversample, --power-iters, --seed, --method."""
    g = p.add_argument_group("SVD")
    # type=int, not a validating type: a bad value is a StreamvecError (one line, exit 2)
    # raised by SVDOptions rather than argparse's usage dump.
    g.add_argument("--rank", type=int, required=rank_required, metavar="K", help=rank_help)
    g.add_argument(
        "--oversample",
        type=int,
        default=10,
        metavar="P",
        help="extra random probes of the randomized SVD (default 10)",
    )
    g.add_argument(
        "--power-iters",
        type=int,
        default=None,
        metavar="Q",
        help="subspace iterations of the randomized SVD, 2 passes each (default: chosen per "
        "matrix, until another would improve the residual by less than 0.5%%)",
    )
    g.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the random test matrices"
    )
    g.add_argument(
        "--method",
        choices=["auto", "exact", "randomized"],
        default="auto",
        help="per matrix: auto (exact LAPACK SVD when it fits the memory limit and is "
        "estimated faster, else streaming randomized), or force one (default auto)",
    )


def svd_options(args: argparse.Namespace, rank: int | None = None) -> Any:
    """The :class:`~streamvec.ops.svd.SVDOptions` of the parsed SVD flags (``rank`` overrides
    ``--rank``)."""
    from streamvec.ops.svd import SVDOptions

    return SVDOptions(
        rank=rank if rank is not None else args.rank,
        oversample=args.oversample,
        power_iters=args.power_iters,
        seed=args.seed,
        method=args.method,
    )
