"""``streamvec demo``: synthetic checkpoints through the engine, end to end."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "build synthetic checkpoints and run the engine end to end"
DESCRIPTION = (
    "Builds a synthetic base and fine-tunes, computes task vectors, edits the "
    "model by task arithmetic, verifies the outputs and prints a summary."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
    p.add_argument(
        "--workdir",
        type=Path,
        help="where to write (default: a temporary directory, removed after)",
    )
    p.add_argument("--params", default="0.1B", help="model size (default 0.1B)")
    p.add_argument("-q", "--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from streamvec.tools.demo import run_demo

    run_demo(args.workdir, params=args.params, progress=not args.quiet and sys.stderr.isatty())
    return 0
