"""The ``streamvec bench`` command: its arguments, ``--help`` text and entry point."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from streamvec.errors import StreamvecError
from streamvec.tools.benchmark.steps import STEP_HELP, STEPS, parse_steps

QUICK_SIZE = "0.1B"


def _step_lines() -> str:
    """The steps and what each does, wrapped for ``--help``."""
    return "\n".join(
        textwrap.fill(
            STEP_HELP[name],
            width=94,
            initial_indent=f"  {name:<13} ",
            subsequent_indent=" " * 16,
        )
        for name in STEPS
    )


DESCRIPTION = f"""\
Measures streamvec's operations on synthetic bf16 Llama-shaped checkpoints (built in --workdir,
or reused there) next to this machine's own I/O, measured in the same run around each step.

steps (--steps, default all, run in this order):
{_step_lines()}
  combine and svd read diff's store, so diff runs whenever one of them is asked for.

the table, per step (medians over --repeat runs):
  in GB/s, out GB/s  bytes read (each input file once) and bytes left on disk, per wall second
  cat GB/s           `cat` of the same input files: warm cache after one warm-up read, or with
                     --cold right after evicting them (then it is the disk's read rate)
  write GB/s         a plain write of as many bytes as the step wrote, with fdatasync
  roof s             inputs at cat's rate + output at the plain write's rate: how long plain
                     sequential I/O of the step's bytes takes on this machine
  x roofline         s / roof s: 1.0 runs at this machine's I/O speed, 3.0 takes three times
                     as long; the target for diff and combine is <= 1.25. Steps that make
                     several passes over their inputs (svd, merge) pay for each.
  start s            wall time the engine's own clock did not see (interpreter start-up,
                     imports, opening headers); subprocess steps with a --report only
  peak anon          RssAnon+RssShmem+VmSwap of the step and its children, sampled every 10 ms
  cache              warm, or cold (drop_caches | fadvise), checked with mincore afterwards

Writes bench.json (every figure of every run) and PNG plots next to it: input throughput and
peak memory against model size, and where the time went (read, compute, encode, write,
checksum per block; finish; start-up). Absolute times on a shared machine are indicative;
ratios measured side by side are the figures to use (docs/benchmarks.md).
"""


HELP = "throughput and memory of each operation, next to the machine's own I/O"
FORMATTER = argparse.RawDescriptionHelpFormatter  # the tables' columns stay


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
    p.add_argument(
        "--size",
        action="append",
        metavar="PARAMS",
        help="model size, e.g. 1B (repeatable, or comma-separated; default 1B)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"one {QUICK_SIZE} pair (unless --size), one run of each step: a few minutes on "
        "2 cores (longer on a busy machine)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where to write bench.json and the plots (default: here)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="checkpoints and outputs (default: a temporary directory under /tmp); an empty "
        "or new directory, or one an earlier run used (checkpoints it left with --keep are "
        "reused)",
    )
    p.add_argument(
        "--repeat", type=int, default=None, metavar="N", help="runs per step (default 3; 1 quick)"
    )
    p.add_argument(
        "--steps",
        default=",".join(STEPS),
        metavar="LIST",
        help=f"comma-separated steps to measure (default all: {','.join(STEPS)})",
    )
    p.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="passed to every step (default: the engine's, half the available RAM, fixed "
        "once so every step gets the same)",
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="passed to every step (default: CPU count)"
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the steps through the Python API in this process, not as subprocesses "
        "(no start-up in the times; peak memory then includes this process's own)",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="evict the inputs from the page cache before every run and every read roofline: "
        "/proc/sys/vm/drop_caches where permitted (root; drops the whole machine's cache), "
        "else posix_fadvise DONTNEED per input file; records say which, and are labelled "
        "'not cold' if more than 5%% of the inputs stayed cached",
    )
    p.add_argument(
        "--no-plots", action="store_true", help="write bench.json and the table, but no PNGs"
    )
    p.add_argument("--keep", action="store_true", help="keep the multi-GB checkpoints and outputs")
    p.add_argument(
        "--no-peers",
        action="store_true",
        help="do not time the installed peers (torch.svd_lowrank for the svd step, mergekit "
        "for combine-ckpt) next to the steps",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")


def _sizes(args: argparse.Namespace) -> list[str]:
    given = [s.strip() for arg in args.size or [] for s in arg.split(",") if s.strip()]
    return given or ([QUICK_SIZE] if args.quick else ["1B"])


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; write bench.json and the plots."""
    from streamvec.tools.benchmark.runner import run_bench

    repeat = args.repeat or (1 if args.quick else 3)
    steps = parse_steps(args.steps)
    if repeat < 1:
        raise StreamvecError("--repeat must be at least 1")
    run_bench(
        _sizes(args),
        workdir=args.workdir,
        json_path=(args.out or Path.cwd()) / "bench.json",
        steps=steps,
        repeat=repeat,
        memory_limit=args.memory_limit,
        workers=args.workers,
        in_process=args.in_process,
        cold=args.cold,
        plots=not args.no_plots,
        keep=args.keep,
        quiet=args.quiet,
        peers=not args.no_peers,
    )
    return 0
