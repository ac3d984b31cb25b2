"""``streamvec merge``: run a mergekit-style recipe.

Bad recipes and inputs raise :class:`~streamvec.errors.StreamvecError`, which the CLI prints
as one line with exit code 2.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="streamvec merge")
    >>> add_arguments(parser)
    >>> parser.parse_args(["ties.yaml", "-o", "out", "--seed", "3"]).seed
    3
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from streamvec.errors import StreamvecError

__all__ = ["add_arguments", "format_methods", "run"]

EPILOG = """examples:
  streamvec merge ties.yaml -o merged
  streamvec merge dare.yaml -o merged --seed 7 --memory-limit 8GB
  streamvec merge recipe.yaml --dry-run
  streamvec merge --list

A recipe is mergekit's YAML (merge_method, base_model, models with parameters, parameters,
dtype, out_dtype); model paths are local checkpoints. See docs/from-mergekit.md.
"""


HELP = "run a mergekit-style recipe (ties, dare, breadcrumbs, della, ...)"
DESCRIPTION = (
    "Merge fine-tuned models of one base by a recipe in mergekit's YAML "
    "format: TIES, DARE, Model Breadcrumbs, DELLA and task arithmetic with mergekit's "
    "parameters and defaults, the papers' own variants (ties_paper, dare_paper, "
    "breadcrumbs_paper) and the SVD merges (tsv, iso_c). Streams block by block in "
    "bounded memory; writes sharded safetensors in the Hugging Face layout."
)
FORMATTER = argparse.RawDescriptionHelpFormatter  # the examples' line breaks stay


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
    from streamvec.cli.common import add_run_options, add_shard_size_option, add_vocab_option

    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="the YAML recipe")
    p.add_argument("-o", "--output", metavar="OUT", help="the merged checkpoint directory")
    p.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="seed of randomised methods (dare_*, della*); overrides the recipe's seed",
    )
    add_shard_size_option(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the recipe and the inputs' headers, print what would run, write nothing",
    )
    p.add_argument(
        "--list", action="store_true", help="list the merge methods with their parameters"
    )
    add_vocab_option(p)
    add_run_options(p)


def run(args: argparse.Namespace) -> int:
    """Run (or check, or list) a merge; returns the exit code."""
    from streamvec.cli.common import run_kwargs
    from streamvec.ops.merge.api import merge, request_for
    from streamvec.ops.merge.method import RunSettings

    if args.list:
        print(format_methods())
        return 0
    if not args.recipe:
        raise StreamvecError("merge needs a RECIPE (or --list)")
    if args.dry_run:
        request = request_for(
            args.recipe,
            seed=args.seed,
            include=args.include,
            exclude=args.exclude,
            vocab=args.vocab,
            strict=args.strict,
        )
        print(_describe_request(request))
        return 0
    if not args.output:
        raise StreamvecError("merge needs -o OUT (the merged checkpoint directory)")
    settings = RunSettings.from_kwargs(
        run_kwargs(args), shard_size=args.shard_size, strict=args.strict
    )
    report = merge(
        args.recipe,
        args.output,
        seed=args.seed,
        include=args.include,
        exclude=args.exclude,
        settings=settings,
        vocab=args.vocab,
    )
    if not args.quiet:
        print(report.summary())
    return 0


def _describe_request(request: Any) -> str:
    m = request.method
    lines = [
        f"{m.name}: {m.summary}",
        f"  paper: {m.paper}",
        f"  base: {request.base.label} ({len(request.base.tensors)} tensors)",
    ]
    for e in request.entries:
        params = ", ".join(f"{k}={v!r}" for k, v in e.parameters.items()) or "defaults"
        lines.append(f"  model {e.where}: {e.path} ({params})")
    if request.recipe.parameters:
        params = ", ".join(f"{k}={v!r}" for k, v in request.recipe.parameters.items())
        lines.append(f"  parameters: {params}")
    if m.randomized:
        lines.append(f"  seed: {request.seed}")
    out = request.out_dtype
    lines.append(f"  output dtype: {out if out is not None else 'the base dtype per tensor'}")
    return "\n".join(lines)


def format_methods() -> str:
    """The registry as text: each method, its paper and its parameters with defaults."""
    from streamvec.ops.merge.registry import METHODS

    out = []
    for m in METHODS.values():
        tag = " [mergekit]" if m.mergekit else ""
        tag += " [seeded]" if m.randomized else ""
        out.append(f"{m.name}{tag}")
        out.extend(textwrap.wrap(m.summary, 96, initial_indent="  ", subsequent_indent="  "))
        out.extend(textwrap.wrap(m.paper, 96, initial_indent="  paper: ", subsequent_indent="    "))
        for p in m.params:
            out.append(
                f"    {p.name} ({p.type.__name__}, {p.scope}, default {p.default!r}): {p.doc}"
            )
        if m.notes:
            out.extend(
                textwrap.wrap(m.notes, 96, initial_indent="  note: ", subsequent_indent="    ")
            )
    return "\n".join(out)
