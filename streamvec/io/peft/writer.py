"""Writing a PEFT LoRA adapter folder: weights, ``adapter_config.json`` and ``README.md``.

Factors are spilled to ``.npy`` files as each module is factored, so only one module's
factors are held; :func:`write_adapter_weights` then streams them into one safetensors file
under PEFT's key names:

* linear and ``Conv1D`` layers: ``base_model.model.<module>.lora_A.weight`` (r x in) and
  ``...lora_B.weight`` (out x r);
* embeddings: ``base_model.model.<module>.lora_embedding_A`` (r x num_embeddings) and
  ``...lora_embedding_B`` (dim x r).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamvec.io.safetensors.layout import TensorSpec, encode_header

__all__ = ["ExportedModule", "adapter_config", "adapter_readme", "write_adapter_weights"]

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ExportedModule:
    """One module of a written adapter.

    Attributes:
        index: spill file index.
        tensor: checkpoint tensor name.
        module: loaded module name (PEFT's).
        kind: ``linear``, ``conv1d`` or ``embedding``.
        rank: its rank.
        a_shape: shape of A as stored.
        b_shape: shape of B as stored.
        residual: ``||tau - B A||_F / ||tau||_F``.
        method: how it was factored.
    """

    index: int
    tensor: str
    module: str
    kind: str
    rank: int
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    residual: float
    method: str

    def keys(self) -> tuple[str, str]:
        """PEFT's keys of A and B in the adapter file."""
        base = f"{PEFT_PREFIX}{self.module}"
        if self.kind == "embedding":
            return f"{base}.lora_embedding_A", f"{base}.lora_embedding_B"
        return f"{base}.lora_A.weight", f"{base}.lora_B.weight"


def write_adapter_weights(
    path: Path, spill: Path, modules: list[ExportedModule], dtype: np.dtype
) -> None:
    """Write ``adapter_model.safetensors`` from the spilled factors, one tensor at a time.

    Args:
        path: the file to write.
        spill: directory holding ``{index}.A.npy`` and ``{index}.B.npy``.
        modules: the exported modules.
        dtype: the factors' dtype (bf16 spilled as raw uint16 bits).
    """
    order: list[Path] = []
    specs: list[TensorSpec] = []
    for m in sorted(modules, key=lambda m: m.module):
        key_a, key_b = m.keys()
        specs.append(TensorSpec(key_a, dtype, m.a_shape))
        order.append(spill / f"{m.index}.A.npy")
        specs.append(TensorSpec(key_b, dtype, m.b_shape))
        order.append(spill / f"{m.index}.B.npy")
    prefix, offsets = encode_header(specs, {"format": "pt"})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(prefix)
        for spec, (begin, end), file in zip(specs, offsets, order, strict=True):
            data = np.load(file)
            if data.nbytes != end - begin or data.shape != spec.shape:
                raise RuntimeError(f"internal error: spilled factor {file} does not match {spec}")
            f.write(np.ascontiguousarray(data).tobytes())


def adapter_config(
    *,
    base: str,
    task_type: str | None,
    rank: int,
    pattern: dict[str, int],
    targets: list[str] | str,
    fan_in_fan_out: bool,
) -> dict[str, Any]:
    """``adapter_config.json`` of an exported adapter (scaling 1 for every module).

    Args:
        base: ``base_model_name_or_path``.
        task_type: PEFT task type (None for models without one, e.g. a diffusers UNet).
        rank: ``r``.
        pattern: module -> rank where it differs from ``r`` (``alpha_pattern`` matches it).
        targets: ``target_modules``.
        fan_in_fan_out: True when some target is a ``Conv1D`` (PEFT corrects it per layer).
    """
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": rank,
        # Full-name patterns: PEFT matches a pattern key as a dotted suffix, so a full name
        # picks exactly its module.
        "rank_pattern": dict(pattern),
        "alpha_pattern": dict(pattern),  # alpha_i = r_i: scaling 1 for every module
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def adapter_readme(
    *,
    expression: str,
    base: str,
    how: str,
    modules: list[ExportedModule],
    left_out: dict[str, str],
    unchanged: list[str],
    rank: int,
    version: str,
    notes: list[str] | None = None,
) -> str:
    """The adapter's ``README.md``: inputs, naming, per-module error, what was left out.

    ``notes`` are extra lines of the summary list (e.g. the vocabulary policy applied).
    """
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags: [lora, streamvec]",
        "---",
        "",
        "# LoRA adapter written by streamvec",
        "",
        f"- task vector: `{expression}`",
        f"- base model: `{base}`",
        f"- rank: r <= {rank}; B = U sqrt(S), A = sqrt(S) Vh, lora_alpha = r (scaling 1)",
        f"- target names: {how}",
        f"- written by streamvec {version}",
        *(f"- {n}" for n in notes or ()),
        "",
    ]
    if left_out:
        lines += [
            "## Changed tensors this adapter does NOT hold",
            "",
            "These tensors differ from the base but no LoRA layer of PEFT can hold them; a "
            "model with only this adapter applied keeps the base's values there.",
            "",
            "| tensor | why |",
            "| --- | --- |",
            *(f"| `{n}` | {why} |" for n, why in sorted(left_out.items())),
            "",
        ]
    errors = [m.residual for m in modules]
    lines += [
        "## Modules",
        "",
        f"{len(modules)} modules; relative error ||tau - B A|| / ||tau|| per module: "
        f"max {max(errors):.3g}, median {float(np.median(errors)):.3g}. "
        f"{len(unchanged)} selected layers were unchanged and are not targets.",
        "",
        "| module | tensor | layer | rank | relative error |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| `{m.module}` | `{m.tensor}` | {m.kind} | {m.rank} | {m.residual:.3g} |"
            for m in sorted(modules, key=lambda m: m.module)
        ),
        "",
    ]
    return "\n".join(lines)
