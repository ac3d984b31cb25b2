"""``streamvec combine``: task arithmetic, into an edited model or a combined task vector."""

from __future__ import annotations

import argparse

from streamvec.cli.common import (
    add_output_dtype_option,
    add_report_option,
    add_run_options,
    run_kwargs,
    say,
    write_report,
)

HELP = "task arithmetic: edited model or combined task vector"
DESCRIPTION = (
    "Linear combination of task vectors. TERM is PATH or PATH:WEIGHT; PATH is a "
    "task-vector store, a PEFT LoRA adapter folder, or a checkpoint whose task vector "
    "relative to --base is computed on the fly (never stored). With --base the output is "
    "the edited model theta_base + SCALE * sum(w_i tau_i) as sharded safetensors (HF "
    "layout); without it, the combined task vector as a Zarr store. Negation: ft:-1. "
    "Analogy C + (B - A): C B A:-1. "
    "--include/--exclude restrict the edit; other tensors keep the base value."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
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


def run(args: argparse.Namespace) -> int:
    """Write the combination; print the summary."""
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
