"""``streamvec verify``: recompute the checksums of an output streamvec wrote."""

from __future__ import annotations

import argparse
import sys

from streamvec.cli.common import say

HELP = "recompute the checksums of an output streamvec wrote"
DESCRIPTION = (
    "Check an output against what was recorded when it was written: a Zarr store's "
    "metadata and chunk files, then every chunk and every array against its recorded "
    "digest; a safetensors output's shard files, header entries and bytes against its "
    "streamvec.json manifest. Exit code 2 says what differs."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
    p.add_argument("path")
    p.add_argument("-q", "--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Verify; print the summary."""
    from streamvec.tools.verify import verify

    result = verify(args.path, progress=not args.quiet and sys.stderr.isatty())
    say(args, result.summary())
    return 0
