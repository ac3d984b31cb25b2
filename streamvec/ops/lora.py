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
Only 2-D ``*.weight`` tensors of linear layers are exported: embeddings, norms, biases and
other tensors are not LoRA-adaptable and are reported when they changed.

Output, in the directory PEFT's ``save_pretrained`` writes:

* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r x in) and
  ``...lora_B.weight`` (out x r);
* ``adapter_config.json``: ``peft_type`` LORA, ``task_type``, ``r``, ``lora_alpha``,
  ``target_modules`` (short names such as ``q_proj`` when every such module of the base is
  exported, else full module names), ``rank_pattern``, ``alpha_pattern``,
  ``base_model_name_or_path``;
* ``streamvec_lora.json``: per module rank, method, relative residual, and what was left out.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamvec import __version__
from streamvec.dtypes import OUTPUT_DTYPES, dtype_name, is_float
from streamvec.errors import StreamvecError
from streamvec.io.blocks import matrix_shape
from streamvec.io.output import OutputDir, check_free_space
from streamvec.io.st_writer import TensorSpec, encode_header
from streamvec.linalg.rsvd import sum_of_squares
from streamvec.ops.svd import (
    Factorizer,
    RunOptions,
    SVDOptions,
    dask_compute_kwargs,
    task_vector_of,
    tensor_seed,
)
from streamvec.sources import input_paths
from streamvec.sources import open as open_model
from streamvec.tensor import LazyTensor, row_ranges, rows_per_block

__all__ = ["DEFAULT_RANK_TOL", "LoraReport", "export_lora", "is_linear_weight"]

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

    def summary(self) -> str:
        """One line for the terminal."""
        smaller = sum(1 for r in self.modules.values() if r < self.rank)
        text = (
            f"wrote {self.path} (LoRA adapter): {len(self.modules)} modules, r={self.rank} "
            f"({smaller} with a smaller rank), targets {', '.join(self.target_modules[:6])}"
            f"{' ...' if len(self.target_modules) > 6 else ''}, in {self.seconds:.1f} s"
        )
        if self.left_out_changed:
            text += (
                f"; {len(self.left_out_changed)} changed tensor(s) are not linear layers and "
                f"are not in the adapter (see {REPORT_NAME})"
            )
        return text


def _module_of(name: str) -> str:
    return name[: -len(".weight")]


def _target_modules(exported: list[str], base_linear: list[str]) -> list[str]:
    """Short names (``q_proj``) where they select exactly the exported modules, else full names.

    PEFT matches a ``target_modules`` entry against a module name when it is equal to it or a
    dot-suffix of it; a short name would also wrap modules that are not in the adapter (e.g.
    outside ``--include``), so those get their full names instead.
    """
    by_short: dict[str, set[str]] = {}
    for module in base_linear:
        by_short.setdefault(module.rsplit(".", 1)[-1], set()).add(module)
    chosen = set(exported)
    targets: list[str] = []
    for short in sorted({m.rsplit(".", 1)[-1] for m in exported}):
        mine = {m for m in exported if m.rsplit(".", 1)[-1] == short}
        if by_short.get(short, set()) <= chosen:
            targets.append(short)
        else:
            targets.extend(sorted(mine))
    return targets


def _frob_norm(t: LazyTensor) -> float:
    rows, _ = matrix_shape(t.shape)
    total = 0.0
    for r0, r1 in row_ranges(rows, rows_per_block(t.shape)):
        block = t.read_rows(r0, r1).astype(np.float64)
        total += sum_of_squares(block)
    return float(np.sqrt(total))


def export_lora(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    options: SVDOptions,
    rank_tol: float = DEFAULT_RANK_TOL,
    dtype: str = "float32",
    task_type: str = "CAUSAL_LM",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    run: RunOptions | None = None,
) -> LoraReport:
    """Write a PEFT LoRA adapter whose ``B A`` is the best rank-r part of each linear delta.

    Args:
        base: the base checkpoint.
        finetuned: the fine-tuned checkpoint (same names and shapes).
        output: the adapter directory; it appears only when complete.
        options: SVD options; ``options.rank`` is the adapter's maximum rank ``K``.
        rank_tol: relative singular-value cutoff for each module's rank (see module doc).
        dtype: adapter weight dtype: float32 (default), float16 or bfloat16.
        task_type: PEFT task type recorded in the config.
        include: only tensors matching these patterns.
        exclude: leave out tensors matching these.
        run: workers, scheduler, memory limit, progress, overwrite.

    Returns:
        A :class:`LoraReport`.

    Raises:
        StreamvecError: bad input, no linear layer changed, or a layer that cannot be
            factored within the memory budget.

    Example:
        >>> export_lora("llama-base", "llama-ft", "adapter", options=SVDOptions(rank=16))
        ... # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    run = run or RunOptions()
    run.refuse_resume("lora")
    if not (0.0 <= rank_tol < 1.0):
        raise StreamvecError(f"--rank-tol must be in [0, 1), got {rank_tol}")
    if dtype not in ADAPTER_DTYPES:
        raise StreamvecError(f"--dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {dtype!r}")
    out_dtype = OUTPUT_DTYPES[dtype]
    tv = task_vector_of(finetuned, base, include=include, exclude=exclude)
    resolved = tv.resolved()
    selected = [(n, t) for n, t in resolved.tensors.items() if is_linear_weight(n, t.shape)]
    others = [(n, t) for n, t in resolved.tensors.items() if not is_linear_weight(n, t.shape)]
    if not selected:
        raise StreamvecError(
            f"no linear-layer weight (2-D *.weight, not an embedding) among the selected "
            f"tensors of {finetuned}; check --include/--exclude"
        )
    base_src = open_model(base).source
    base_linear = [
        _module_of(n) for n, st in base_src.tensors.items() if is_linear_weight(n, st.shape)
    ]

    modules: dict[str, dict[str, Any]] = {}
    unchanged: list[str] = []
    methods: Counter[str] = Counter()
    out = OutputDir(output, overwrite=run.overwrite, inputs=input_paths([*tv.sources(), base_src]))
    # A and B of every layer at full rank, twice: spilled while factoring, then the adapter.
    out.expected_bytes = 2 * sum(
        (t.shape[0] + t.shape[1]) * min(options.rank, *t.shape) * out_dtype.itemsize
        for _, t in selected
    )
    check_free_space(out.final, out.expected_bytes)
    with out, dask_compute_kwargs(run.scheduler, run.resolved_workers()) as kwargs:
        factorizer = Factorizer(options, run, kwargs)
        spill = out.partial / ".factors"
        spill.mkdir()
        bar = tqdm(selected, desc=Path(output).name, unit="tensor", disable=not run.progress)
        for i, (name, t) in enumerate(bar):
            result, plan = factorizer.factor(t, options.rank, tensor_seed(options.seed, name))
            s = result.S
            if s.size == 0 or s[0] <= 0.0:
                unchanged.append(name)
                continue
            r = int(np.count_nonzero(s > rank_tol * s[0]))
            root = np.sqrt(s[:r])  # (r,)
            b = (result.U[:, :r].astype(np.float64) * root).astype(out_dtype)  # (out, r)
            a = (root[:, None] * result.Vh[:r].astype(np.float64)).astype(out_dtype)  # (r, in)
            np.save(spill / f"{i}.A.npy", a.view(np.uint16) if dtype == "bfloat16" else a)
            np.save(spill / f"{i}.B.npy", b.view(np.uint16) if dtype == "bfloat16" else b)
            sq = result.frob_norm**2
            residual = np.sqrt(max(0.0, sq - float(np.sum(s[:r] ** 2))) / sq) if sq else 0.0
            modules[_module_of(name)] = {
                "index": i,
                "tensor": name,
                "rank": r,
                "shape": list(t.shape),
                "method": plan.method,
                "residual": float(residual),
                "singular_values": [float(x) for x in s[: min(len(s), 8)]],
            }
            methods[plan.method] += 1
        if not modules:
            raise StreamvecError(
                f"every selected linear layer of {finetuned} equals the base: nothing to export"
            )
        left_out_changed = [n for n, t in others if is_float(t.dtype) and _frob_norm(t) > 0.0]
        rank = max(m["rank"] for m in modules.values())
        pattern = {mod: m["rank"] for mod, m in modules.items() if m["rank"] != rank}
        targets = _target_modules(list(modules), base_linear)
        _write_adapter(out.partial / ADAPTER_WEIGHTS, spill, modules, out_dtype)
        shutil.rmtree(spill)
        config = {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": str(base),
            "r": rank,
            "lora_alpha": rank,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),  # alpha_i = r_i: scaling 1 for every module
            "target_modules": targets,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "revision": None,
        }
        (out.partial / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        report = {
            "created_by": f"streamvec {__version__}",
            "operation": "lora",
            "expression": tv.describe(),
            "sources": [s.info for s in tv.sources()],
            "split": "B = U sqrt(S), A = sqrt(S) Vh; lora_alpha = r (scaling 1)",
            "rank_tol": rank_tol,
            "dtype": dtype_name(out_dtype),
            **options.attrs(),
            "modules": {
                k: {kk: vv for kk, vv in v.items() if kk != "index"} for k, v in modules.items()
            },
            "unchanged": unchanged,
            "left_out_changed": left_out_changed,
        }
        (out.partial / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
        final = out.commit()
    return LoraReport(
        path=final,
        modules={k: v["rank"] for k, v in modules.items()},
        rank=rank,
        methods=methods,
        unchanged=unchanged,
        left_out_changed=left_out_changed,
        seconds=time.perf_counter() - started,
        target_modules=targets,
    )


def _write_adapter(
    path: Path, spill: Path, modules: dict[str, dict[str, Any]], dtype: np.dtype
) -> None:
    """Write the adapter safetensors file from the spilled factors, one tensor at a time."""
    order: list[tuple[str, Path]] = []
    specs: list[TensorSpec] = []
    for module in sorted(modules):
        info = modules[module]
        r = info["rank"]
        out_f, in_f = info["shape"]
        for part, shape in (("A", (r, in_f)), ("B", (out_f, r))):
            specs.append(TensorSpec(f"{PEFT_PREFIX}{module}.lora_{part}.weight", dtype, shape))
            order.append((specs[-1].name, spill / f"{info['index']}.{part}.npy"))
    prefix, offsets = encode_header(specs, {"format": "pt"})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(prefix)
        for spec, (begin, end), (_, file) in zip(specs, offsets, order, strict=True):
            data = np.load(file)
            if data.nbytes != end - begin or data.shape != spec.shape:
                raise RuntimeError(f"internal error: spilled factor {file} does not match {spec}")
            f.write(np.ascontiguousarray(data).tobytes())
