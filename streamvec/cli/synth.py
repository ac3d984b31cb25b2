"""``streamvec synth``: synthetic Llama-shaped checkpoints, and fine-tunes of them."""

from __future__ import annotations

import argparse

from streamvec.cli.common import say

HELP = "write a synthetic Llama-shaped checkpoint (or a fine-tune of one)"
DESCRIPTION = (
    "Synthetic checkpoints for trying streamvec and benchmarking it: Llama-shaped "
    "sharded safetensors of the requested size, or with --finetune-of a fine-tune whose "
    "task vector is low-rank plus noise."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
    p.add_argument("output", metavar="OUT")
    p.add_argument(
        "--params", default="0.1B", help="parameter count, e.g. 0.1B, 1B, 300M (default 0.1B)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shard-size", default="1GB", metavar="SIZE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--finetune-of", metavar="BASE", help="write a fine-tune of this synthetic base instead"
    )
    p.add_argument("--rank", type=int, default=8, help="rank of the fine-tune's delta (default 8)")
    p.add_argument("--only", metavar="GLOB", help="fine-tune only tensors matching GLOB")
    p.add_argument("-q", "--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Write the checkpoint."""
    from streamvec.tools import synth

    if args.finetune_of:
        out = synth.build_finetune(
            args.finetune_of, args.output, rank=args.rank, seed=args.seed, only=args.only
        )
    else:
        out = synth.build_checkpoint(
            args.output,
            params=args.params,
            dtype=args.dtype,
            shard_size=args.shard_size,
            seed=args.seed,
        )
    say(args, f"wrote {out}")
    return 0
