"""``streamvec info``: what a checkpoint or store holds, from its headers."""

from __future__ import annotations

import argparse
import json

HELP = "what a checkpoint or store holds (headers only)"
DESCRIPTION = (
    "Tensors, dtypes, shapes and sizes of a checkpoint directory, a .safetensors file or a "
    "streamvec Zarr store, read from headers and metadata only (no tensor data)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
    p.add_argument("path", help="checkpoint directory, .safetensors file, or streamvec Zarr store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--limit", type=int, default=40, metavar="N", help="tensors listed (default 40; 0 = all)"
    )


def run(args: argparse.Namespace) -> int:
    """Print the description."""
    from streamvec.tools.info import describe, format_info

    info = describe(args.path)
    print(json.dumps(info, indent=1) if args.json else format_info(info, limit=args.limit))
    return 0
