"""The ``streamvec`` command line: thin argument parsing over the Python API.

Exit codes: 0 success; 2 bad input or usage (one line on stderr saying what is wrong, with
which file or tensor, and what to do); 1 internal error. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from streamvec import signals
from streamvec.cli.common import (
    add_output_dtype_option,
    add_report_option,
    add_run_options,
    run_kwargs,
    say,
    write_report,
)
from streamvec.engine.settings import Settings
from streamvec.errors import StreamvecError
from streamvec.io.companions import COMMAND_LINE
from streamvec.io.zarr.access import ReadPolicy, using_read_policy
from streamvec.units import parse_size
from streamvec.version import __version__

EPILOG = """examples:
  streamvec info llama-base
  streamvec diff llama-base llama-math -o math.zarr --include '*.self_attn.*'
  streamvec combine --base llama-base -o edited llama-math:0.5 llama-code:0.5
  streamvec combine --base llama-base -o detox --scale 0.6 tox.zarr:-1
  streamvec combine -o analogy.zarr c.zarr b.zarr a.zarr:-1
  streamvec verify edited
  streamvec stats math.zarr code.zarr tox.zarr -o stats/
  streamvec demo

Patterns in --include/--exclude are shell globs on tensor names, or regexes written re:...
Sizes accept 5GB, 512MB, 8GiB or bytes. Exit codes: 0 ok, 2 bad input, 1 internal error.
"""


def cmd_info(args: argparse.Namespace) -> int:
    from streamvec.tools.info import describe, format_info

    info = describe(args.path)
    print(json.dumps(info, indent=1) if args.json else format_info(info, limit=args.limit))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from streamvec.ops.task_vector import task_vector

    tv = task_vector(
        args.base,
        args.finetuned,
        include=args.include,
        exclude=args.exclude,
        dtype=args.dtype,
        int_tensors=args.int_tensors,
        vocab=args.vocab,
        strict=args.strict,
    )
    report = tv.save(args.output, description="diff", **run_kwargs(args))
    write_report(args, report)
    say(args, report.summary())
    if report.skipped_nonfloat:
        n = len(report.skipped_nonfloat)
        say(args, f"left out {n} non-float tensor(s) (listed in the store attrs)")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    from streamvec.ops.combine import combine_terms, parse_term

    terms = [parse_term(t) for t in args.terms]
    model = combine_terms(
        terms,
        base=args.base,
        scale=args.scale,
        include=args.include,
        exclude=args.exclude,
        dtype=args.dtype,
        keep_base_when_missing=args.missing == "keep-base",
        strict=args.strict,
        int_tensors=args.int_tensors,
        vocab=args.vocab,
    )
    report = model.save(args.output, description="combine", **run_kwargs(args))
    write_report(args, report)
    say(args, report.summary())
    if report.kept_base:
        say(args, f"kept the base value for {len(report.kept_base)} tensor(s) missing in a term")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from streamvec.tools.verify import verify

    result = verify(args.path, progress=not args.quiet and sys.stderr.isatty())
    say(args, result.summary())
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
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


def cmd_demo(args: argparse.Namespace) -> int:
    from streamvec.tools.demo import run_demo

    run_demo(args.workdir, params=args.params, progress=not args.quiet and sys.stderr.isatty())
    return 0


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamvec",
        description="Out-of-core task arithmetic for large safetensors checkpoints: task vectors, "
        "their combinations and edited models, streamed tensor by tensor in bounded memory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"streamvec {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="what a checkpoint or store holds (headers only)")
    p.add_argument("path", help="checkpoint directory, .safetensors file, or streamvec Zarr store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--limit", type=int, default=40, metavar="N", help="tensors listed (default 40; 0 = all)"
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "diff",
        help="task vector FINETUNED - BASE into a Zarr store",
        description="Compute tau = FINETUNED - BASE for every floating-point tensor (upcast to "
        "float32 before subtracting, rounded once) into a Zarr v3 store. Non-float tensors are "
        "left out and listed in the store's attrs.",
    )
    p.add_argument("base")
    p.add_argument("finetuned")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the Zarr store to write")
    add_output_dtype_option(p, "stored dtype (default float32)")
    add_run_options(p)
    add_report_option(p)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser(
        "combine",
        help="task arithmetic: edited model or combined task vector",
        description="Linear combination of task vectors. TERM is PATH or PATH:WEIGHT; PATH is a "
        "task-vector store, a PEFT LoRA adapter folder, or a checkpoint whose task vector "
        "relative to --base is computed on the fly (never stored). With --base the output is "
        "the edited model theta_base + SCALE * sum(w_i tau_i) as sharded safetensors (HF "
        "layout); without it, the combined task vector as a Zarr store. Negation: ft:-1. "
        "Analogy C + (B - A): C B A:-1. "
        "--include/--exclude restrict the edit; other tensors keep the base value.",
    )
    p.add_argument("terms", nargs="+", metavar="TERM")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--base", metavar="BASE", help="base checkpoint: output the edited model")
    p.add_argument(
        "--scale", type=float, default=1.0, metavar="LAMBDA", help="lambda (default 1.0)"
    )
    add_output_dtype_option(p)
    p.add_argument(
        "--missing",
        choices=["error", "keep-base"],
        default="error",
        help="a tensor missing in a term: fail (default) or keep the base value",
    )
    add_run_options(p)  # with --strict, --int-tensors, --vocab, --shard-size
    add_report_option(p)
    p.set_defaults(func=cmd_combine)

    p = sub.add_parser("verify", help="recompute the checksums of an output streamvec wrote")
    p.add_argument("path")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "synth",
        help="write a synthetic Llama-shaped checkpoint (or a fine-tune of one)",
        description="Synthetic checkpoints for trying streamvec and benchmarking it: Llama-shaped "
        "sharded safetensors of the requested size, or with --finetune-of a fine-tune whose "
        "task vector is low-rank plus noise.",
    )
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
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "demo",
        help="build synthetic checkpoints and run the engine end to end",
        description="Builds a synthetic base and fine-tunes, computes task vectors, edits the "
        "model by task arithmetic, verifies the outputs and prints a summary.",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="where to write (default: a temporary directory, removed after)",
    )
    p.add_argument("--params", default="0.1B", help="model size (default 0.1B)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    _add_operation_parsers(sub)
    return parser


def _add_operation_parsers(sub: Any) -> None:
    """Commands defined next to their operations (SVD family, merges, benchmarks)."""
    from streamvec.cli.merge import add_parsers as add_merge
    from streamvec.cli.stats import add_parser as add_stats
    from streamvec.cli.svd import add_parsers as add_svd
    from streamvec.tools.benchmark import add_parser as add_bench

    add_svd(sub)
    add_stats(sub)
    add_merge(sub)
    add_bench(sub)


def _read_policy(args: argparse.Namespace) -> ReadPolicy:
    """How this command reads stores: chunk checksums, and chunks bounded by the budget."""
    limit = getattr(args, "memory_limit", None)
    return ReadPolicy(
        verify=getattr(args, "verify_inputs", not getattr(args, "no_verify_inputs", False)),
        max_chunk_bytes=parse_size(limit) // 4 if limit else None,
    )


def _kept_partial(args: argparse.Namespace) -> bool:
    """Whether an interrupted run left an unfinished output that --resume can continue."""
    output = getattr(args, "output", None)
    if not output or not hasattr(args, "resume"):
        return False
    out = Path(output).absolute()
    # The output's own job, or an intermediate's (``.OUT.factors.partial`` of the SVD merges)
    return any(out.parent.glob(f"{glob.escape('.' + out.name)}.*partial"))


def _stdout_closed() -> bool:
    """Whether standard output's reader went away (then it is pointed at /dev/null)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # not a real file (captured), no poll
        return False
    if gone:
        # Python flushes stdout again at exit; with the reader gone that would print an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return gone


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    # Outputs' model cards record the command that wrote them.
    command = COMMAND_LINE.set(("streamvec", *(sys.argv[1:] if argv is None else argv)))
    # SIGTERM (kill, a batch scheduler's time limit) behaves like Ctrl-C: the partial output
    # of a resumable run is kept, the others are removed, and the exit code says which signal.
    try:
        if getattr(args, "run_settings", False):
            from streamvec.ops.registry import check_settings

            # Validated once; a setting the command does not support is refused here.
            args.settings = Settings.from_args(args)
            check_settings(args.command, args.settings)
        with signals.installed(), using_read_policy(_read_policy(args)):
            return func(args)
    except StreamvecError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"streamvec: error: {exc}", file=sys.stderr)
        # Writes that failed inside zarr's event loop (disk full) leave tasks whose errors
        # asyncio would log again at exit, after the one line that already said it.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        return 2
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return 128 + signal.SIGPIPE  # `streamvec info ... | head`: quiet, as the shell's tools
    except KeyboardInterrupt as exc:
        resumable = " (rerun with --resume to continue)" if _kept_partial(args) else ""
        how = "terminated (SIGTERM)" if isinstance(exc, signals.Terminated) else "interrupted"
        print(f"streamvec: {how}; no output was finished{resumable}", file=sys.stderr)
        # 128 + the signal's number, as a shell reports a process the signal killed
        return 128 + (signal.SIGTERM if isinstance(exc, signals.Terminated) else signal.SIGINT)
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(
            f"streamvec: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
            "traceback and report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        COMMAND_LINE.reset(command)


if __name__ == "__main__":
    sys.exit(main())
