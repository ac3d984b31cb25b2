"""Command-line parsers of the SVD family: ``svd``, ``lora``, ``decompose``, ``merge-svd``.

:func:`add_parsers` registers the four commands on the ``streamvec`` subparsers; each command
function takes the parsed namespace and returns an exit code, raising
:class:`~streamvec.errors.StreamvecError` for bad input (the CLI prints it as one line and
exits 2).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="streamvec")
    >>> add_parsers(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["svd", "tau.zarr", "-o", "out.zarr", "--rank", "8"]).rank
    8
"""

from __future__ import annotations

import argparse
from typing import Any

from streamvec.cli.common import add_vocab_option, say, settings_of

__all__ = ["add_parsers", "cmd_decompose", "cmd_lora", "cmd_merge_svd", "cmd_svd"]


def _add_svd_options(p: argparse.ArgumentParser, *, rank_required: bool, rank_help: str) -> None:
    g = p.add_argument_group("SVD")
    # type=int, not a validating type: a bad value is a StreamvecError (one line, exit 2)
    # raised by SVDOptions rather than argparse's usage dump.
    g.add_argument("--rank", type=int, required=rank_required, metavar="K", help=rank_help)
    g.add_argument(
        "--oversample",
        type=int,
        default=10,
        metavar="P",
        help="extra random probes of the randomized SVD (default 10)",
    )
    g.add_argument(
        "--power-iters",
        type=int,
        default=None,
        metavar="Q",
        help="subspace iterations of the randomized SVD, 2 passes each (default: chosen per "
        "matrix, until another would improve the residual by less than 0.5%%)",
    )
    g.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the random test matrices"
    )
    g.add_argument(
        "--method",
        choices=["auto", "exact", "randomized"],
        default="auto",
        help="per matrix: auto (exact LAPACK SVD when it fits the memory limit and is "
        "estimated faster, else streaming randomized), or force one (default auto)",
    )


def _options(args: argparse.Namespace, rank: int | None = None) -> Any:
    from streamvec.ops.svd import SVDOptions

    return SVDOptions(
        rank=rank if rank is not None else args.rank,
        oversample=args.oversample,
        power_iters=args.power_iters,
        seed=args.seed,
        method=args.method,
    )


def cmd_svd(args: argparse.Namespace) -> int:
    """``streamvec svd``: truncated SVD of every matrix into an SVD store."""
    from streamvec.ops.svd import svd

    report = svd(
        args.source,
        args.output,
        options=_options(args),
        base=args.base,
        include=args.include,
        exclude=args.exclude,
        run=settings_of(args),
        vocab=args.vocab,
    )
    say(args, report.summary())
    return 0


def cmd_lora(args: argparse.Namespace) -> int:
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
        options=_options(args),
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


def cmd_decompose(args: argparse.Namespace) -> int:
    """``streamvec decompose``: shared and unique components of each task vector."""
    from streamvec.ops.decompose import decompose

    report = decompose(
        args.terms,
        args.output,
        options=_options(args),
        threshold=args.threshold,
        base=args.base,
        include=args.include,
        exclude=args.exclude,
        run=settings_of(args),
        vocab=args.vocab,
    )
    say(args, report.summary())
    return 0


def cmd_merge_svd(args: argparse.Namespace) -> int:
    """``streamvec merge-svd``: TSV-M or Iso-C merge."""
    from streamvec.ops.merge_svd import merge_svd

    report = merge_svd(
        args.merge,
        args.terms,
        args.output,
        options=_options(args, rank=1),
        rank=args.rank,
        alpha=args.alpha,
        base=args.base,
        include=args.include,
        exclude=args.exclude,
        dtype=args.dtype,
        shard_size=args.shard_size,
        run=settings_of(args),
    )
    say(args, report.summary())
    return 0


def add_parsers(subparsers: Any) -> None:
    """Register ``svd``, ``lora``, ``decompose`` and ``merge-svd`` on ``streamvec``'s subparsers.

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers()`` returned.

    Example:
        >>> from streamvec.cli.main import build_parser  # doctest: +SKIP
        >>> build_parser().parse_args(["lora", "base", "ft", "-o", "a", "--rank", "8"])
        ... # doctest: +SKIP
    """
    from streamvec.cli.common import add_output_dtype_option, add_run_options, add_shard_size_option

    p = subparsers.add_parser(
        "svd",
        help="truncated SVD of every matrix of a task vector, into an SVD store",
        description="Factor every matrix of a task vector as U diag(S) Vh with K triplets "
        "(randomized subspace iteration, Halko et al. 2011, streamed over row blocks; or "
        "LAPACK's exact SVD where it fits --memory-limit and is faster). SOURCE is a "
        "task-vector store, or FINETUNED with --base BASE (tau recomputed block by block, "
        "never stored). Tensors with more than 2 axes are factored as (shape[0], "
        "prod(rest)); 0-d/1-d tensors are stored dense. The store is a valid combine TERM "
        "(read back as U S Vh).",
    )
    p.add_argument("source", metavar="SOURCE", help="task-vector store, or FINETUNED checkpoint")
    p.add_argument("--base", metavar="BASE", help="base checkpoint when SOURCE is a checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the SVD store to write")
    _add_svd_options(p, rank_required=True, rank_help="triplets per matrix (min(K, m, n))")
    add_vocab_option(p)
    add_run_options(p)
    p.set_defaults(func=cmd_svd)

    p = subparsers.add_parser(
        "lora",
        help="export a task vector (FINETUNED - BASE, or adapters/fine-tunes combined) as a "
        "PEFT LoRA adapter",
        description="Factor each adaptable layer's task vector and write a PEFT LoRA adapter: "
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
        "are refused (`combine --vocab union` writes the full model).",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="BASE FINETUNED, or with --base: TERM... (PATH[:WEIGHT])",
    )
    p.add_argument("--base", metavar="BASE", help="base checkpoint; then every INPUT is a TERM")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="adapter directory")
    _add_svd_options(p, rank_required=True, rank_help="maximum LoRA rank r")
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
    p.set_defaults(func=cmd_lora)

    p = subparsers.add_parser(
        "decompose",
        help="split task vectors into shared and unique components",
        description="Per matrix: each task's top-K left singular subspace, their common "
        "subspace C (directions with cos^2 overlap >= --threshold with every task), "
        "shared_i = C C^T tau_i and unique_i = tau_i - shared_i (non-matrix tensors: "
        "shared 0, unique tau). OUT is a directory with NAME.shared.zarr (an SVD store) and "
        "NAME.unique.zarr (a task-vector store) per input, each a combine TERM: "
        "`streamvec combine --base B -o X OUT/tox.unique.zarr:-1` negates only the unique "
        "part; `streamvec combine --base B -o X OUT/a.shared.zarr OUT/b.shared.zarr` adds "
        "the shared parts.",
    )
    p.add_argument("terms", nargs="+", metavar="TV", help="task-vector stores (or checkpoints)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="directory to write")
    p.add_argument("--base", metavar="BASE", help="base checkpoint for checkpoint inputs")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.85,
        metavar="T",
        help="cos^2 overlap for a direction to be shared (default 0.85)",
    )
    _add_svd_options(p, rank_required=False, rank_help="per-task subspace size K (default 16)")
    p.set_defaults(rank=16)
    add_vocab_option(p)
    add_run_options(p)
    p.set_defaults(func=cmd_decompose)

    p = subparsers.add_parser(
        "merge-svd",
        help="merge task vectors by TSV-M or Iso-C",
        description="TSV-M (Gargiulo et al., CVPR 2025): each task keeps its top K/T singular "
        "triplets, U and V concatenations are orthogonalised (polar factors), merged = "
        "U_perp diag(S) V_perp^T. Iso-C (Marczak et al., ICML 2025): SVD of sum tau_i, "
        "merged = mean(S) U V^T. Non-matrix tensors are averaged. Output: alpha * merged as "
        "a task-vector store, or with --base the edited model base + alpha * merged. "
        "--vocab base|common|union merges fine-tunes that resized their vocabulary, as "
        "combine does (config.json's vocab_size and the tokenizer files follow).",
    )
    p.add_argument("merge", choices=["tsv", "iso-c"], metavar="{tsv,iso-c}")
    p.add_argument("terms", nargs="+", metavar="TV", help="task-vector stores (or checkpoints)")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--base", metavar="BASE", help="base checkpoint: output the edited model")
    p.add_argument(
        "--alpha", type=float, default=1.0, metavar="A", help="scaling coefficient (default 1)"
    )
    add_output_dtype_option(p)
    add_shard_size_option(p)
    _add_svd_options(
        p,
        rank_required=False,
        rank_help="rank budget per matrix (default min(m, n), the papers' full rank)",
    )
    add_run_options(p)
    p.set_defaults(func=cmd_merge_svd)
