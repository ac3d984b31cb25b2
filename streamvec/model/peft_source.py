"""A PEFT LoRA adapter folder as a task-vector source.

An adapter (``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT's
``save_pretrained`` writes it) stands for the task vector PEFT's ``merge_and_unload`` would
add to its base, per target module:

* ``tau = scaling * B @ A`` with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
  ``use_rslora``), ``r`` and ``alpha`` per module from ``rank_pattern`` / ``alpha_pattern``
  (PEFT's matching: a pattern matches a module name it equals or ends with after a dot);
* transposed, ``(B @ A).T``, for layers stored (in, out) (GPT-2's ``Conv1D``; PEFT forces
  ``fan_in_fan_out`` there) and for embedding LoRA (``lora_embedding_A`` r x num_embeddings,
  ``lora_embedding_B`` dim x r);
* for convolutions (``lora_A`` a conv of the layer's kernel, ``lora_B`` a 1x1 conv, as PEFT
  writes LoRA of a diffusers UNet's or VAE's ``nn.Conv2d``), ``B @ A`` with ``A`` flattened to
  (r, in * kernel), reshaped to the weight's (out, in, *kernel);
* tensors the adapter saves whole (``modules_to_save``, the ``base_layer`` of a trained
  embedding) stand for their value minus the base's.

Nothing is materialised: each target is a :class:`~streamvec.io.peft.readers.LoraProductReader`
that forms the rows asked for from the small factors. Adapter module names are those of the
*loaded* model; they are mapped back to checkpoint tensor names through
:mod:`streamvec.io.peft.naming` on the base checkpoint.

The source is *sparse*: a tensor the adapter does not touch is zero in its task vector, so
``base + adapter`` keeps every other tensor of the base.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamvec.errors import MismatchError, StreamvecError
from streamvec.io.blocks import BlockReader, SafetensorsReader, file_stamp
from streamvec.io.fingerprint import fingerprint_files
from streamvec.io.peft.readers import (
    DifferenceReader,
    LoraProductReader,
    SumReader,
)
from streamvec.io.safetensors.checkpoint import resolve_checkpoint
from streamvec.model.algebra import Source, SourceTensor

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterConfig",
    "AdapterError",
    "adapter_source",
    "is_adapter_dir",
    "pattern_value",
    "read_adapter_config",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterError(StreamvecError):
    """An adapter folder is unusable or uses a feature streamvec does not read."""


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (holds ``adapter_config.json``)."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup for one module name.

    The first pattern key ``k`` such that ``module`` matches ``(.*\\.)?(k)$`` wins (PEFT's
    ``get_pattern_key``); no match gives ``default``.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that decide the task vector."""

    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, Any]
    alpha_pattern: dict[str, Any]
    fan_in_fan_out: bool
    modules_to_save: tuple[str, ...]
    base_model_name_or_path: str | None

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's scaling of one module: ``alpha / r`` or ``alpha / sqrt(r)`` (rslora).

        Args:
            module: the module name in the loaded model.
            rank: its rank (the factors' inner size, which PEFT sizes from ``rank_pattern``).
        """
        alpha = float(pattern_value(self.alpha_pattern, module, self.alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


# Config keys naming features that change what the adapter computes; streamvec refuses them
# rather than return a task vector PEFT would not apply.
_REFUSED = {
    "use_dora": "DoRA (use_dora: the update is rescaled by a learned magnitude per column)",
    "lora_bias": "lora_bias (the adapter also trains bias terms)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "layer_replication": "layer_replication (the adapter duplicates layers)",
    "target_parameters": "target_parameters (LoRA on raw parameters such as fused experts)",
    "trainable_token_indices": "trainable_token_indices (trainable token rows)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
}


def read_adapter_config(path: Path) -> AdapterConfig:
    """Read and check an adapter's ``adapter_config.json``.

    Args:
        path: the adapter folder.

    Returns:
        An :class:`AdapterConfig`.

    Raises:
        AdapterError: not a LoRA adapter, or it uses a feature that is refused (named).
    """
    cfg_path = path / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{cfg_path}: not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise AdapterError(
            f"{cfg_path}: peft_type {kind!r} is not supported; streamvec reads LoRA adapters "
            "(peft_type LORA) only. Merge it into its base with PEFT's merge_and_unload() and "
            "pass the merged checkpoint instead"
        )
    for key, what in _REFUSED.items():
        if cfg.get(key) not in (None, False, {}, []):
            raise AdapterError(
                f"{cfg_path}: {what} is not supported; merge it with PEFT's merge_and_unload() "
                "and pass the merged checkpoint instead"
            )
    if cfg.get("bias", "none") != "none":
        raise AdapterError(
            f"{cfg_path}: bias {cfg.get('bias')!r} is not supported (the adapter trains biases); "
            "only bias 'none' is read. Merge it with PEFT's merge_and_unload() and pass the "
            "merged checkpoint instead"
        )
    try:
        r = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{cfg_path}: r and lora_alpha must be numbers") from None
    mts = cfg.get("modules_to_save") or ()
    base = cfg.get("base_model_name_or_path")
    return AdapterConfig(
        r=r,
        alpha=alpha,
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern=dict(cfg.get("rank_pattern") or {}),
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        modules_to_save=tuple(mts) if isinstance(mts, list) else (str(mts),),
        base_model_name_or_path=str(base) if base else None,
    )


@dataclass
class _Entry:
    a: Any = None
    b: Any = None
    embedding: bool = False


def _split_keys(tensors: dict[str, Any], where: Path) -> tuple[dict[str, _Entry], dict[str, Any]]:
    """Adapter file keys -> LoRA pairs by module, and whole tensors by parameter name."""
    pairs: dict[str, _Entry] = {}
    whole: dict[str, Any] = {}
    pattern = re.compile(r"^(.*)\.lora_(A|B|embedding_A|embedding_B)(?:\.[^.]+)?(?:\.weight)?$")
    for key, info in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        m = pattern.match(name)
        if m:
            module, part = m.group(1), m.group(2)
            e = pairs.setdefault(module, _Entry())
            e.embedding = e.embedding or part.startswith("embedding")
            if part.endswith("A"):
                e.a = info
            else:
                e.b = info
            continue
        if ".lora_" in name or name.endswith((".lora_magnitude_vector", ".weight_magnitude")):
            raise AdapterError(f"{where}: tensor {key!r} is a LoRA variant streamvec does not read")
        name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        whole[name] = info
    for module, e in pairs.items():
        if e.a is None or e.b is None:
            raise AdapterError(
                f"{where}: module {module!r} has only lora_{'A' if e.b is None else 'B'}; "
                "the adapter file is incomplete"
            )
    return pairs, whole


def _conv_factors(module: str, e: _Entry, where: Path) -> bool:
    """Whether a module's factors are PEFT's LoRA of a convolution (checked; refused if grouped).

    PEFT's LoRA of an ``nn.ConvNd`` of kernel ``k`` is ``lora_A``, a conv of kernel ``k``
    (r, in, *k), followed by ``lora_B``, a 1x1 conv (out, r, 1, ...). Its merged update
    (``get_delta_weight``) is ``scaling * conv(A^T, B)^T``: with a 1x1 ``B`` that is, at
    every kernel position, ``B[:, :, 0, 0] @ A[:, :, pos]``, i.e. the matrix product of ``B``
    (out, r) and ``A`` flattened to (r, in * prod(k)), reshaped to the weight's shape.

    Raises:
        AdapterError: the factors of a grouped convolution (PEFT refuses to merge those) or
            of a shape PEFT does not write.
    """
    a, b = tuple(e.a.shape), tuple(e.b.shape)
    if len(a) < 3 and len(b) < 3:
        return False
    rank = a[0]
    if len(a) != len(b) or len(a) > 5 or any(d != 1 for d in b[2:]):
        raise AdapterError(
            f"{where}: module {module!r} has factors {list(a)}, {list(b)}, not PEFT's LoRA of "
            "a convolution (lora_A a conv of the layer's kernel, lora_B a 1x1 conv)"
        )
    if b[1] != rank:
        groups = rank // b[1] if b[1] and rank % b[1] == 0 else "?"
        raise AdapterError(
            f"{where}: module {module!r} is a LoRA of a grouped convolution (groups={groups}), "
            "whose update PEFT does not define (its merge_and_unload refuses it too); retrain "
            "the adapter without this module in target_modules"
        )
    return True


def _base_check(cfg: AdapterConfig, path: Path, base_root: Path | None, strict: bool) -> None:
    """Compare the adapter's recorded base with the one given, where it is a local path."""
    recorded = cfg.base_model_name_or_path
    if recorded is None or base_root is None:
        return
    rec = Path(recorded)
    if not rec.exists():
        return  # a hub id or a path of another machine: nothing to compare against here
    if rec.resolve() == base_root.resolve():
        return
    text = (
        f"{path}: adapter was trained on base {recorded}, but the base given is {base_root}; "
        "the task vector is applied to the base given"
    )
    if strict:
        raise MismatchError(text + " (drop --strict to proceed)")
    print(f"warning: {text}", file=sys.stderr)


def recorded_local_base(path: Path) -> Path | None:
    """The base checkpoint an adapter's config records, when it is a local directory.

    Args:
        path: the adapter folder.

    Returns:
        That directory, or None (a Hub id, a path that is not here, or none recorded).
    """
    recorded = read_adapter_config(path).base_model_name_or_path
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def adapter_source(
    path: Path,
    label: str,
    base: Source | None = None,
    base_root: Path | None = None,
    *,
    strict: bool = False,
) -> Source:
    """A sparse task-vector :class:`Source` for a PEFT LoRA adapter folder.

    Args:
        path: the adapter folder.
        label: the path as the user wrote it.
        base: the base checkpoint's source (the caller opens the adapter's recorded local
            base when none is given, :func:`recorded_local_base`); without one, module names
            are taken as checkpoint names (``<module>.weight``) and tensors saved whole are
            refused.
        base_root: the base checkpoint's directory (its config.json names the model class).
        strict: a base other than the adapter's recorded local base is an error.

    Returns:
        A non-point, sparse source.

    Raises:
        AdapterError: refused features, a damaged adapter, or whole tensors without a base.
        MismatchError: a target that is not in the base, or of another shape.
    """
    cfg = read_adapter_config(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        found = sorted(p.name for p in path.iterdir() if p.name.startswith("adapter_model"))
        hint = f" (found {', '.join(found)}; convert it to safetensors)" if found else ""
        raise AdapterError(f"{path}: no {ADAPTER_WEIGHTS}{hint}")
    _base_check(cfg, path, base_root, strict)
    files = resolve_checkpoint(weights)
    pairs, whole = _split_keys(dict(files.tensors), weights)
    naming = None
    if base is not None:
        from streamvec.io.peft.naming import peft_naming

        naming = peft_naming(base_root, {n: t.shape for n, t in base.tensors.items()})

    # The adapter file's version when its header was read: a file replaced during a run is
    # an error naming it, as for checkpoints.
    stamp = file_stamp(weights.stat())

    def reader(info: Any) -> SafetensorsReader:
        return SafetensorsReader(str(info.path), info.offset, info.shape, info.dtype, stamp)

    tensors: dict[str, SourceTensor] = {}
    problems: list[str] = []
    for module, e in pairs.items():
        rank = int(e.a.shape[0])
        conv = _conv_factors(module, e, weights)
        if not conv and (len(e.a.shape) != 2 or len(e.b.shape) != 2 or e.b.shape[1] != rank):
            problems.append(f"{module}: factor shapes {list(e.a.shape)}, {list(e.b.shape)}")
            continue
        transpose = not conv and (e.embedding or cfg.fan_in_fan_out)
        tensor = f"{module}.weight"
        if naming is not None:
            target = naming.input_target(module)
            if target is None:
                problems.append(f"{module} (no layer of the base's loaded model has this name)")
                continue
            if (target.kind == "conv") != conv:
                problems.append(
                    f"{module}: the adapter's factors are {list(e.a.shape)}, "
                    f"{list(e.b.shape)}, but the base's layer is {'not ' if conv else ''}"
                    "a convolution"
                )
                continue
            tensor = target.tensor
            # PEFT decides the orientation by the layer: Conv1D and embeddings transpose,
            # nn.Linear and convolutions do not whatever the config says.
            transpose = target.transposed
        if conv:
            # A convolution's update, flattened to (out, in * kernel), is B @ A (see
            # _conv_factors): the tensor keeps the weight's shape (out, in, *kernel).
            shape: tuple[int, ...] = (int(e.b.shape[0]), *(int(d) for d in e.a.shape[1:]))
        elif transpose:
            shape = (int(e.a.shape[1]), int(e.b.shape[0]))
        else:
            shape = (int(e.b.shape[0]), int(e.a.shape[1]))
        if base is not None and tuple(base.tensors[tensor].shape) != shape:
            problems.append(
                f"{module}: the adapter's update is {list(shape)}, the base's {tensor} is "
                f"{list(base.tensors[tensor].shape)}"
            )
            continue
        scale = cfg.scaling(module, rank)
        r = LoraProductReader(reader(e.a), reader(e.b), scale, transpose, shape)
        tensors[tensor] = SourceTensor(tensor, shape, r.dtype, r)
    for param, info in whole.items():
        if base is None:
            raise AdapterError(
                f"{path}: saves {param} whole (modules_to_save); its task vector is its value "
                "minus the base's: pass the base (--base BASE, or sv.open(adapter, base=BASE))"
            )
        tensor = (naming.tensor_of_param(param) if naming is not None else None) or param
        if tensor not in base.tensors:
            problems.append(f"{param} (saved whole; not in the base)")
            continue
        bt = base.tensors[tensor]
        if tuple(bt.shape) != tuple(info.shape):
            problems.append(f"{param}: saved {list(info.shape)}, base {list(bt.shape)}")
            continue
        d: BlockReader = DifferenceReader(reader(info), bt.reader)
        if tensor in tensors:
            # A trained embedding's base_layer is saved whole next to its LoRA factors: PEFT
            # loads the saved weight, then adds the LoRA update on merge.
            d = SumReader(tensors[tensor].reader, d)
        tensors[tensor] = SourceTensor(tensor, bt.shape, np.dtype(np.float32), d)
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        )
        raise MismatchError(
            f"{path}: the adapter does not fit the base {base_root}: {shown}. Pass the base "
            "model the adapter was trained on"
        )
    if not tensors:
        raise AdapterError(f"{path}: the adapter holds no LoRA factors")
    info = {
        "path": label,
        "kind": "lora_adapter",
        "fingerprint": fingerprint_files([weights, path / ADAPTER_CONFIG]),
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "naming": naming.how if naming is not None else "module names taken as checkpoint names",
    }
    key = f"{path.resolve()}@{base_root.resolve() if base_root else ''}"
    return Source(label, False, key, tensors, info, sparse=True)


def split_model_plus_lora(text: str) -> tuple[str, str] | None:
    """``MODEL+LORA`` (mergekit's syntax for a checkpoint with an adapter merged in), or None.

    A path that exists as written is never split, so names holding ``+`` still work.
    """
    if "+" not in text or Path(text).exists():
        return None
    model, _, lora = text.rpartition("+")
    if model and lora and is_adapter_dir(Path(lora)):
        return model, lora
    return None


def applied_source(model: Source, adapter: Source, label: str) -> Source:
    """A checkpoint with an adapter merged in (``MODEL+LORA``), read block by block.

    Args:
        model: the checkpoint.
        adapter: the adapter's task vector, named through ``model``.
        label: ``MODEL+LORA`` as written.

    Returns:
        A point source: ``model + tau`` where the adapter has a target, ``model`` elsewhere.
        Each tensor keeps the checkpoint's dtype for the output.
    """
    tensors: dict[str, SourceTensor] = {}
    for name, t in model.tensors.items():
        delta = adapter.tensors.get(name)
        if delta is None:
            tensors[name] = t  # the same bytes as the checkpoint's: the same reader
        else:
            tensors[name] = SourceTensor(name, t.shape, t.dtype, SumReader(t.reader, delta.reader))
    info = {
        "path": label,
        "kind": "checkpoint+lora",
        "checkpoint": dict(model.info),
        "adapter": dict(adapter.info),
    }
    key = f"{model.key}+{adapter.key}"
    return Source(label, True, key, tensors, info, model.extra_files, model.ties, model.stem)
