"""Export a fine-tune's low-rank part as a PEFT LoRA adapter (``streamvec lora``).

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) adapts a
linear layer ``W`` (out x in) as ``W + (alpha / r) B A`` with ``B`` (out x r) and ``A``
(r x in). Given a base and a fine-tuned checkpoint, each linear layer's task vector
``tau = W_ft - W_base`` is factored (streaming truncated SVD, :mod:`streamvec.ops.svd`) as
``U diag(S) Vh`` and split *symmetrically*:

    B = U_r diag(sqrt(S_r)),    A = diag(sqrt(S_r)) Vh_r,    so  B A = U_r diag(S_r) Vh_r,

the best rank-r approximation of ``tau`` (Eckart-Young). The balanced split gives ``A`` and
``B`` the same spectral norm ``sqrt(S_1)`` (neither factor carries all the scale, which suits
float16/bfloat16 storage and further training). ``lora_alpha = r`` makes PEFT's scaling 1.

The rank of each module is ``r_i = #{j <= K : S_j > rank_tol * S_1}``: an update that is
exactly low-rank (up to float rounding) gets its true rank, listed in ``rank_pattern`` (with a
matching ``alpha_pattern`` so its scaling stays 1); a module whose delta is zero is left out.
Which tensors become targets, under which module names, is decided by
:mod:`streamvec.io.peft.naming` from the base's model class (built from its config.json on the
meta device, checkpoint keys renamed by transformers' own conversion rules): ``nn.Linear``
layers, GPT-2's ``Conv1D`` (stored (in, out): ``fan_in_fan_out``) and ``nn.Embedding``
(PEFT's ``lora_embedding_A/B``). Routers, norms, convolutions, fused experts, biases and other
parameters cannot be held by a LoRA layer: when they changed they are listed on stderr, in the
adapter's ``README.md`` and in ``streamvec_lora.json``.

The input is a task-vector expression (:func:`lora`): fine-tuned checkpoints, task-vector
stores and other LoRA adapters, with weights. When every term of a layer is a LoRA adapter,
the combined update ``sum_i w_i s_i B_i A_i`` is factored from the factors (QR of the stacked
factors and an SVD of the small core,
:func:`~streamvec.compute.linalg.factors.stacked_lowrank_svd`):
exact when the rank asked for is at least the sum of the ranks, and no dense matrix is formed.

Output, in the directory PEFT's ``save_pretrained`` writes:

* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r x in) and
  ``...lora_B.weight`` (out x r), or ``lora_embedding_A`` / ``lora_embedding_B``;
* ``adapter_config.json``: ``peft_type`` LORA, ``task_type``, ``r``, ``lora_alpha``,
  ``target_modules`` (short names such as ``q_proj`` when every such module of the base is
  exported, else full module names), ``rank_pattern``, ``alpha_pattern``,
  ``base_model_name_or_path``;
* ``README.md``: the inputs, the naming rule used, the relative error per module and the
  changed tensors left out, with why;
* ``streamvec_lora.json``: per module rank, method, relative residual, and what was left out.

Vocabulary changes: an adapter applies to the base model, whose embedding and head have the
base's rows, so only ``--vocab base`` is accepted when a fine-tune resized its vocabulary: the
rows base and fine-tune share are exported, the fine-tune's added rows are dropped (and said
so in the README). ``common`` and ``union`` would describe another model; they are refused
(``streamvec combine --vocab union`` writes that full model instead).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamvec.compute.linalg.factors import stacked_lowrank_svd
from streamvec.compute.linalg.rsvd import SVDResult, sum_of_squares
from streamvec.dtypes import OUTPUT_DTYPES, dtype_name, is_float, round_once
from streamvec.engine.jobs import Job, JobPlan
from streamvec.errors import MismatchError, StreamvecError
from streamvec.io.blocks import matrix_shape
from streamvec.io.output import check_free_space, input_paths
from streamvec.io.peft.naming import PeftNaming, PeftTarget, peft_naming, target_modules_for
from streamvec.io.peft.readers import LoraProductReader
from streamvec.io.peft.writer import (
    ExportedModule,
    adapter_config,
    adapter_readme,
    write_adapter_weights,
)
from streamvec.io.safetensors.checkpoint import resolve_checkpoint
from streamvec.model.algebra import Model
from streamvec.model.sources import open as open_model
from streamvec.model.tensor import LazyTensor, row_ranges, rows_per_block
from streamvec.model.vocab import VOCAB_HINT, VocabChoice
from streamvec.ops.combine import TermSpec
from streamvec.ops.factorize import factor_budget
from streamvec.ops.registry import check_settings
from streamvec.ops.svd import (
    Factorizer,
    RunOptions,
    SVDOptions,
    dask_compute_kwargs,
    task_vector_of,
    tensor_seed,
)
from streamvec.version import __version__

__all__ = ["DEFAULT_RANK_TOL", "LoraReport", "export_lora", "is_linear_weight", "lora"]

# Relative singular-value cutoff for a module's rank. Dropping triplets below
# tol * S_1 changes B A by at most sqrt(K) * tol * S_1 <= sqrt(K) * tol * ||tau|| (Frobenius):
# at 1e-5 that is below bfloat16 resolution (~4e-3) by far and at the level of the float32
# rounding noise of a delta of weights ~1e3 times larger than it, so only exactly low-rank
# updates get a smaller rank.
DEFAULT_RANK_TOL = 1e-5
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REPORT_NAME = "streamvec_lora.json"
PEFT_PREFIX = "base_model.model."
ADAPTER_DTYPES = ("float32", "float16", "bfloat16")
_LORA_VOCAB_HINT = (
    "pass --vocab base (an adapter applies to the base: the rows it shares with the fine-tune "
    "are exported, added tokens' rows dropped), or write the full model with `streamvec "
    "combine --vocab union`; see docs/checkpoints.md"
)


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor is the weight of a linear layer LoRA can adapt.

    A 2-D ``*.weight`` whose module is not an embedding (``*embed*``, GPT-2's ``wte``/``wpe``,
    T5's ``shared``) or a norm; lm_head and every projection qualify.

    Args:
        name: tensor name.
        shape: tensor shape.

    Returns:
        True for linear-layer weights.

    Example:
        >>> is_linear_weight("model.layers.0.self_attn.q_proj.weight", (64, 64))
        True
        >>> is_linear_weight("model.embed_tokens.weight", (256, 64))
        False
    """
    if len(shape) != 2 or not name.endswith(".weight") or min(shape) == 0:
        return False
    module = name[: -len(".weight")].rsplit(".", 1)[-1].lower()
    return "embed" not in module and "norm" not in module and module not in ("wte", "wpe", "shared")


@dataclass
class LoraReport:
    """What ``streamvec lora`` did."""

    path: Path
    modules: dict[str, int]
    rank: int
    methods: Counter[str]
    unchanged: list[str]
    left_out_changed: list[str]
    seconds: float
    target_modules: list[str] = field(default_factory=list)
    residuals: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the terminal (the per-module errors are in the adapter's README)."""
        smaller = sum(1 for r in self.modules.values() if r < self.rank)
        text = (
            f"wrote {self.path} (LoRA adapter): {len(self.modules)} modules, r={self.rank} "
            f"({smaller} with a smaller rank), targets {', '.join(self.target_modules[:6])}"
            f"{' ...' if len(self.target_modules) > 6 else ''}, in {self.seconds:.1f} s"
        )
        if self.residuals:
            worst = max(self.residuals, key=lambda m: self.residuals[m])
            errors = list(self.residuals.values())
            text += (
                f"; relative error per module: median {float(np.median(errors)):.3g}, "
                f"max {self.residuals[worst]:.3g} ({worst}; all in README.md)"
            )
        if self.left_out_changed:
            text += (
                f"; {len(self.left_out_changed)} changed tensor(s) cannot be held by a LoRA "
                "layer and are not in the adapter (listed above and in README.md)"
            )
        return text


def _frob_norm(t: LazyTensor) -> float:
    rows, _ = matrix_shape(t.shape)
    total = 0.0
    for r0, r1 in row_ranges(rows, rows_per_block(t.shape)):
        block = t.read_rows(r0, r1).astype(np.float64)
        total += sum_of_squares(block)
    return float(np.sqrt(total))


def _vocab_notes(choice: VocabChoice | None) -> list[str]:
    """The README's line on a vocabulary difference (none when the vocabularies agree)."""
    if choice is None:
        return []
    return [
        f"vocabulary: the inputs' vocabularies differ; --vocab {choice.policy}: the embedding "
        f"and head updates cover the base's {choice.rows} rows (the rows base and fine-tune "
        "share); rows of tokens a fine-tune added are not in this adapter, as the base model "
        "it applies to has no such tokens (`streamvec combine --vocab union` writes a full "
        "model that keeps them)"
    ]


def _task_type(naming: PeftNaming) -> str | None:
    """PEFT's task type from the model class (None: a plain PeftModel, e.g. a UNet)."""
    cls = naming.model_class or ""
    for suffix, kind in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if cls.endswith(suffix):
            return kind
    if naming.model_class is None:
        return "CAUSAL_LM"  # the model class is unknown: the most common case
    return None


def _factor(t: LazyTensor, factorizer: Factorizer, options: SVDOptions) -> tuple[SVDResult, str]:
    """Truncated SVD of one target's task vector, from the LoRA factors when it has them."""
    readers = [r for _, r in t.terms if isinstance(r, LoraProductReader)]
    if readers and len(readers) == len(t.terms):
        parts = []
        for (c, _), r in zip(t.terms, readers, strict=True):
            left, right = r.factors()  # (m, k_i), (k_i, n)
            parts.append((c * left, right))
        u, s, vh, norm = stacked_lowrank_svd(parts)
        k = min(options.rank, s.size)
        kept = float(np.sum(s[:k] ** 2))
        residual = float(np.sqrt(max(0.0, norm**2 - kept)) / norm) if norm else 0.0
        exact = sum(r.rank for r in readers) <= options.rank
        result = SVDResult(u[:, :k], s[:k], vh[:k], norm, residual, 0)
        return result, "factored (exact)" if exact else "factored"
    result, plan = factorizer.factor(t, options.rank, tensor_seed(options.seed, t.name))
    return result, plan.method


def _split(
    result: SVDResult, r: int, target: PeftTarget, out_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` in PEFT's orientation from ``tau = U S Vh`` (stored orientation)."""
    root = np.sqrt(result.S[:r])  # (r,)
    u = result.U[:, :r].astype(np.float64)  # (rows, r)
    vh = result.Vh[:r].astype(np.float64)  # (r, cols)
    if target.transposed:
        # PEFT adds (B @ A).T: B @ A = tau.T = Vh.T S U.T.
        b = vh.T * root  # (cols, r)
        a = root[:, None] * u.T  # (r, rows)
    else:
        b = u * root  # (rows, r)
        a = root[:, None] * vh  # (r, cols)
    return round_once(a, out_dtype), round_once(b, out_dtype)


def _export_layer(
    index: int,
    name: str,
    t: LazyTensor,
    target: PeftTarget,
    factorizer: Factorizer,
    options: SVDOptions,
    rank_tol: float,
    out_dtype: np.dtype,
    spill: Path,
) -> ExportedModule | None:
    """Factor one target layer and spill its A and B (and a record of them) for the adapter.

    Returns:
        The module, or None when the layer's update is zero (nothing to export).
    """
    result, method = _factor(t, factorizer, options)
    s = result.S
    module = None
    if s.size and s[0] > 0.0:
        r = int(np.count_nonzero(s > rank_tol * s[0]))
        a, b = _split(result, r, target, out_dtype)
        bf16 = out_dtype == OUTPUT_DTYPES["bfloat16"]
        np.save(spill / f"{index}.A.npy", a.view(np.uint16) if bf16 else a)
        np.save(spill / f"{index}.B.npy", b.view(np.uint16) if bf16 else b)
        sq = result.frob_norm**2
        residual = np.sqrt(max(0.0, sq - float(np.sum(s[:r] ** 2))) / sq) if sq else 0.0
        module = ExportedModule(
            index,
            name,
            target.module,
            target.kind,
            r,
            (int(a.shape[0]), int(a.shape[1])),
            (int(b.shape[0]), int(b.shape[1])),
            float(residual),
            method,
        )
    # What a resumed run needs to pick this layer up without factoring it again.
    record = None if module is None else asdict(module)
    (spill / f"{index}.json").write_text(json.dumps(record))
    return module


def _read_spilled(spill: Path, index: int) -> ExportedModule | None:
    """The record :func:`_export_layer` spilled for layer ``index`` (None: unchanged)."""
    record = json.loads((spill / f"{index}.json").read_text())
    if record is None:
        return None
    record["a_shape"] = tuple(record["a_shape"])
    record["b_shape"] = tuple(record["b_shape"])
    return ExportedModule(**record)


def lora(
    base: str | os.PathLike[str],
    terms: list[TermSpec],
    output: str | os.PathLike[str],
    *,
    options: SVDOptions,
    rank_tol: float = DEFAULT_RANK_TOL,
    dtype: str = "float32",
    task_type: str | None = "auto",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    run: RunOptions | None = None,
    strict: bool = False,
) -> LoraReport:
    """Write one PEFT LoRA adapter for ``sum_i w_i tau_i``, rank ``options.rank`` per target.

    Each term is a fine-tuned checkpoint (``ft - base``), a task-vector or SVD store, or a
    PEFT LoRA adapter folder. Per target layer of the base's loaded model the combined update
    is factored: from the LoRA factors when every term holding the layer is an adapter (exact
    when ``options.rank`` is at least the sum of their ranks), else by the streaming
    randomized (or exact) SVD of :mod:`streamvec.ops.svd`.

    Args:
        base: the base checkpoint.
        terms: the task vectors with weights.
        output: the adapter directory; it appears only when complete.
        options: SVD options; ``options.rank`` is the adapter's maximum rank.
        rank_tol: relative singular-value cutoff for each module's rank (see module doc).
        dtype: adapter weight dtype: float32 (default), float16 or bfloat16.
        task_type: PEFT task type; ``auto`` takes it from the model class.
        include: only tensors matching these patterns.
        exclude: leave out tensors matching these.
        run: workers, scheduler, memory limit, progress, overwrite.
        strict: an adapter term whose recorded local base is not ``base`` is an error.

    Returns:
        A :class:`LoraReport`.

    Raises:
        StreamvecError: bad input, no target layer changed, or a layer that cannot be
            factored within the memory budget.

    Example:
        >>> lora("llama-base", [TermSpec("a-lora", 0.5), TermSpec("b-lora", 0.5)], "merged",
        ...      options=SVDOptions(rank=32))  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    run = (run or RunOptions()).with_keywords(strict=strict)  # one value: run.strict
    # the same check as the CLI's: a setting this command cannot honour is refused
    check_settings("lora", run)
    if not (0.0 <= rank_tol < 1.0):
        raise StreamvecError(f"--rank-tol must be in [0, 1), got {rank_tol}")
    if dtype not in ADAPTER_DTYPES:
        raise StreamvecError(f"--dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {dtype!r}")
    if not terms:
        raise StreamvecError("lora needs at least one TERM (a fine-tune, store or adapter)")
    if run.vocab not in (None, "base"):
        raise StreamvecError(
            f"lora: --vocab {run.vocab} is not supported: an adapter applies to the base model, "
            "whose embedding and head keep the base's rows; pass --vocab base (added tokens' "
            f"rows are dropped), or write the full model with `streamvec combine --vocab "
            f"{run.vocab} --base BASE -o OUT FINETUNED`"
        )
    out_dtype = OUTPUT_DTYPES[dtype]
    tv: Model | None = None
    for spec in terms:
        tau = task_vector_of(
            spec.path,
            base,
            include=include,
            exclude=exclude,
            base_for_stores="ignore",
            strict=run.strict,
            vocab=run.vocab,
        )
        tv = spec.weight * tau if tv is None else tv + spec.weight * tau
    assert tv is not None
    try:
        resolved = tv.resolved()
    except MismatchError as exc:
        # The generic hint offers common and union too, which an adapter cannot honour.
        if VOCAB_HINT not in str(exc):
            raise
        raise MismatchError(str(exc).replace(VOCAB_HINT, _LORA_VOCAB_HINT)) from None
    base_files = resolve_checkpoint(base)
    naming = peft_naming(base_files.root, {n: t.shape for n, t in base_files.tensors.items()})
    selected = [(n, t) for n, t in resolved.tensors.items() if n in naming.targets]
    others = [(n, t) for n, t in resolved.tensors.items() if n not in naming.targets]
    if not selected:
        raise StreamvecError(
            f"no linear-layer or embedding weight PEFT can adapt among the selected tensors of "
            f"{tv.describe()}; check --include/--exclude"
        )
    if task_type == "auto":
        task_type = _task_type(naming)

    modules: list[ExportedModule] = []
    unchanged: list[str] = []
    methods: Counter[str] = Counter()
    base_src = open_model(base).source
    identity = {
        "operation": "lora",
        "expression": tv.describe(),
        "sources": [s.info for s in tv.sources()],
        "base": base_src.info,
        "targets": [[n, list(t.shape), naming.targets[n].module] for n, t in selected],
        "rank_tol": rank_tol,
        "dtype": dtype,
        "task_type": task_type,
        "settings": run.output_identity(),
        **options.attrs(),
    }
    # A and B of every layer at full rank, twice: spilled while factoring, then the adapter.
    expected = 2 * sum(
        (t.shape[0] + t.shape[1]) * min(options.rank, *t.shape) * out_dtype.itemsize
        for _, t in selected
    )
    if not run.resume:
        check_free_space(Path(output).absolute(), expected)
    job = Job(
        output,
        inputs=input_paths([*tv.sources(), base_src]),
        plan=JobPlan(identity, {}, factor_budget(run)),
        resume=run.resume,
        overwrite=run.overwrite,
        expected_bytes=expected,
    )
    with job:
        spill = job.partial / ".factors"
        if job.resumed:
            job.check_done({n: [t] for n, t in selected})
        else:
            spill.mkdir()
        done = job.done_tensors()
        # each matrix is planned with the budget the job records (the unfinished run's)
        run = job.budgeted(run)
        with dask_compute_kwargs(run.scheduler, run.resolved_workers()) as kwargs:
            factorizer = Factorizer(options, run, kwargs, job.budget["bytes"])
            bar = tqdm(selected, desc=Path(output).name, unit="tensor", disable=not run.progress)
            for i, (name, t) in enumerate(bar):
                if name in done:  # factored by the unfinished run: its spilled record
                    module = _read_spilled(spill, i)
                else:
                    module = _export_layer(
                        i,
                        name,
                        t,
                        naming.targets[name],
                        factorizer,
                        options,
                        rank_tol,
                        out_dtype,
                        spill,
                    )
                    job.record_tensor(name, factorizer.input_digests(t))
                if module is None:
                    unchanged.append(name)
                    continue
                modules.append(module)
                methods[module.method] += 1
        if not modules:
            raise StreamvecError(
                f"every selected layer of {tv.describe()} equals the base: nothing to export"
            )
        left_out = {
            n: naming.left_out.get(n, "not a weight of a layer PEFT's LoRA adapts")
            for n, t in others
            if is_float(t.dtype) and _frob_norm(t) > 0.0
        }
        rank = max(m.rank for m in modules)
        pattern = {m.module: m.rank for m in modules if m.rank != rank}
        targets = target_modules_for([m.module for m in modules], naming.modules)
        write_adapter_weights(job.partial / ADAPTER_WEIGHTS, spill, modules, out_dtype)
        config = adapter_config(
            base=str(base),
            task_type=task_type,
            rank=rank,
            pattern=pattern,
            targets=targets,
            fan_in_fan_out=any(m.kind == "conv1d" for m in modules),
        )
        (job.partial / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (job.partial / "README.md").write_text(
            adapter_readme(
                expression=tv.describe(),
                base=str(base),
                how=naming.how,
                modules=modules,
                left_out=left_out,
                unchanged=unchanged,
                rank=rank,
                version=__version__,
                notes=_vocab_notes(resolved.vocab),
            )
        )
        report = {
            "created_by": f"streamvec {__version__}",
            "operation": "lora",
            "expression": tv.describe(),
            "sources": [s.info for s in tv.sources()],
            "naming": naming.how,
            "split": "B = U sqrt(S), A = sqrt(S) Vh; lora_alpha = r (scaling 1)",
            "rank_tol": rank_tol,
            "dtype": dtype_name(out_dtype),
            "vocab": resolved.vocab.describe() if resolved.vocab is not None else None,
            **options.attrs(),
            "modules": {
                m.module: {
                    "tensor": m.tensor,
                    "kind": m.kind,
                    "rank": m.rank,
                    "method": m.method,
                    "residual": m.residual,
                }
                for m in modules
            },
            "unchanged": unchanged,
            "left_out_changed": left_out,
        }
        (job.partial / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
        # the spilled layers go only once the job record is gone: a run stopped before
        # resumes from them
        final = job.commit(scratch=[spill])
    if naming.model_class is None:
        print(f"warning: {naming.how}", file=sys.stderr)
    for name, why in sorted(left_out.items()):
        print(f"warning: {name} changed but is not in the adapter: {why}", file=sys.stderr)
    return LoraReport(
        path=final,
        modules={m.module: m.rank for m in modules},
        rank=rank,
        methods=methods,
        unchanged=unchanged,
        left_out_changed=sorted(left_out),
        seconds=time.perf_counter() - started,
        target_modules=[targets] if isinstance(targets, str) else targets,
        residuals={m.module: m.residual for m in modules},
    )


def export_lora(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    output: str | os.PathLike[str],
    **kwargs: Any,
) -> LoraReport:
    """Write a PEFT LoRA adapter whose ``B A`` is the best rank-r part of ``finetuned - base``.

    The two-checkpoint form of :func:`lora` (same keyword arguments).

    Example:
        >>> export_lora("llama-base", "llama-ft", "adapter", options=SVDOptions(rank=16))
        ... # doctest: +SKIP
    """
    return lora(base, [TermSpec(str(finetuned))], output, **kwargs)
