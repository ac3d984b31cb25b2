"""The ``streamvec`` command line: thin argument parsing over the Python API.

Each command is a module of this package with the same shape: ``HELP`` (its line in
``streamvec --help``), ``DESCRIPTION`` (and optionally ``EPILOG`` and ``FORMATTER``),
``add_arguments(parser)`` and ``run(args) -> exit code``, which imports the operation it runs.
The writing commands are listed in the operations table
(:data:`streamvec.ops.registry.OPERATIONS`), the others in :func:`command_modules`; the parser
is built from both.

Exit codes: 0 success; 2 bad input or usage (one line on stderr saying what is wrong, with
which file or tensor, and what to do); 1 internal error. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import logging
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from streamvec import signals
from streamvec.engine.settings import Settings
from streamvec.errors import StreamvecError
from streamvec.io.companions import COMMAND_LINE
from streamvec.io.output import finished
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


# The commands, in `streamvec --help`'s order: the writing operations come from the operations
# table (streamvec.ops.registry); these are the others, each a module with the same shape.
_BEFORE = {"info": "streamvec.cli.info"}
_AFTER = {
    "stats": "streamvec.cli.stats",
    "verify": "streamvec.cli.verify",
    "synth": "streamvec.cli.synth",
    "demo": "streamvec.cli.demo",
    "bench": "streamvec.cli.bench",
}


def command_modules() -> dict[str, str]:
    """Every command: name -> its command-line module (``HELP``, ``DESCRIPTION``,
    ``add_arguments``, ``run``)."""
    from streamvec.ops.registry import commands

    return {**_BEFORE, **{op.name: op.cli for op in commands()}, **_AFTER}


def build_parser() -> argparse.ArgumentParser:
    """The ``streamvec`` parser, with a sub-command for each of :func:`command_modules`."""
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
    for name, module_name in command_modules().items():
        # Command modules import their operation inside run(): building the parser stays cheap.
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", None),
            epilog=getattr(module, "EPILOG", None),
            formatter_class=getattr(module, "FORMATTER", argparse.HelpFormatter),
        )
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


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
        how = "terminated (SIGTERM)" if isinstance(exc, signals.Terminated) else "interrupted"
        output = getattr(args, "output", None)
        if output and finished(output):
            # the signal came during the final rename, which completes before it is raised
            print(f"streamvec: {how} after {output} was finished; it is complete", file=sys.stderr)
        else:
            resumable = " (rerun with --resume to continue)" if _kept_partial(args) else ""
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
