"""``streamvec diff``: the task vector FINETUNED - BASE, into a Zarr store."""

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

HELP = "task vector FINETUNED - BASE into a Zarr store"
DESCRIPTION = (
    "Compute tau = FINETUNED - BASE for every floating-point tensor (upcast to "
    "float32 before subtracting, rounded once) into a Zarr v3 store. Non-float tensors are "
    "left out and listed in the store's attrs."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
    p.add_argument("base")
    p.add_argument("finetuned")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the Zarr store to write")
    add_output_dtype_option(p, "stored dtype (default float32)")
    add_run_options(p)
    add_report_option(p)


def run(args: argparse.Namespace) -> int:
    """Write the task vector; print the summary."""
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
