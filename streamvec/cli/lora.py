"""``streamvec lora``: a PEFT LoRA adapter from a fine-tune, or from task vectors and adapters."""

from __future__ import annotations

import argparse

from streamvec.cli.common import add_run_options, add_svd_options, say, settings_of, svd_options

HELP = (
    "export a task vector (FINETUNED - BASE, or adapters/fine-tunes combined) as a "
    "PEFT LoRA adapter"
)
DESCRIPTION = (
    "Factor each adaptable layer's task vector and write a PEFT LoRA adapter: "
    "B = U sqrt(S) (out x r), A = sqrt(S) Vh (r x in), lora_alpha = r (scaling 1). "
    "Targets are named as the base's *loaded* model names its modules (transformers' "
    "key conversion): Linear, Conv1D (fan_in_fan_out) and Embedding layers (embedding "
    "LoRA); changed tensors no LoRA layer can hold (routers, norms, biases, "
    "convolutions, fused experts) are listed on stderr and in the adapter's README.md. "
    "Either BASE FINETUNED, or --base BASE TERM... where each TERM is a fine-tune, a "
    "task-vector store or a LoRA adapter, PATH[:WEIGHT]: many LoRAs into one. Layers "
    "held only by adapters are factored from their factors (exact when K >= the sum "
    "of their ranks). A module whose update is exactly low-rank gets its true rank in "
    "rank_pattern (singular values below --rank-tol * S_1 are dropped). When a "
    "fine-tune resized its vocabulary, --vocab base exports the rows the base has "
    "(added tokens' rows are dropped: the adapter applies to the base); common and union "
    "are refused (`combine --vocab union` writes the full model)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and flags."""
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="BASE FINETUNED, or with --base: TERM... (PATH[:WEIGHT])",
    )
    p.add_argument("--base", metavar="BASE", help="base checkpoint; then every INPUT is a TERM")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="adapter directory")
    add_svd_options(p, rank_required=True, rank_help="maximum LoRA rank r")
    p.add_argument(
        "--rank-tol",
        type=float,
        default=1e-5,
        metavar="TOL",
        help="drop singular values below TOL * largest (default 1e-5)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="adapter weight dtype (default float32)",
    )
    p.add_argument(
        "--task-type",
        default="auto",
        metavar="T",
        help="PEFT task_type (default auto: from the model class, e.g. CAUSAL_LM; 'none' "
        "for models PEFT wraps without one, such as a UNet)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="an adapter TERM recorded with another local base is an error, not a warning",
    )
    add_run_options(p)


def run(args: argparse.Namespace) -> int:
    """``streamvec lora``: PEFT LoRA adapter from BASE FINETUNED, or --base BASE TERM..."""
    from streamvec.errors import StreamvecError
    from streamvec.ops.combine import parse_term
    from streamvec.ops.lora import lora

    if args.base is None:
        if len(args.inputs) != 2:
            raise StreamvecError(
                "lora takes BASE FINETUNED, or --base BASE and one or more TERMs "
                "(fine-tunes, stores or LoRA adapters, each PATH[:WEIGHT])"
            )
        base, terms = args.inputs[0], [parse_term(args.inputs[1])]
    else:
        base, terms = args.base, [parse_term(t) for t in args.inputs]
    report = lora(
        base,
        terms,
        args.output,
        options=svd_options(args),
        rank_tol=args.rank_tol,
        dtype=args.dtype,
        task_type=None if args.task_type == "none" else args.task_type,
        include=args.include,
        exclude=args.exclude,
        run=settings_of(args),
        strict=args.strict,
    )
    say(args, report.summary())
    return 0
