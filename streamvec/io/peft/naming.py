"""PEFT module naming: checkpoint tensor names <-> the module names PEFT targets, both ways.

PEFT wraps modules of the model *as loaded*, and names them as the loaded module tree does.
Under transformers 5 that is not always the checkpoint's naming: keys are converted when a
model loads (a ViT's ``vit.encoder.layer.0.attention.attention.query.weight`` on disk is
``vit.encoder.layer.0.attention.q_proj.weight``-style in the module tree, MoE experts are
fused into one parameter). So the mapping is taken from transformers itself:

1. the model class is built from the checkpoint's ``config.json`` on the ``meta`` device
   (no weights, no memory): ``architectures[0]`` for transformers, ``_class_name`` for
   diffusers;
2. each checkpoint key goes through transformers' own conversion rules
   (``get_model_conversion_mapping`` + ``rename_source_key``, what ``from_pretrained`` runs);
3. the module that owns the resulting parameter decides the kind of LoRA layer:
   ``nn.Linear`` (plain), transformers' ``Conv1D`` (stored (in, out): ``fan_in_fan_out``),
   ``nn.Embedding`` (PEFT's ``lora_embedding_A/B``); anything else (MoE routers, norms,
   convolutions, fused experts, biases and other 1-D parameters) is left out with a reason.
   Convolutions (``nn.Conv1d/2d/3d``) are also listed in :attr:`PeftNaming.convs`: streamvec
   does not write LoRA for them, but reads an adapter's LoRA of them as a task vector.

When the class cannot be built (no ``config.json``, an unknown architecture, a library that
is missing), the kinds fall back to names and shapes (2-D ``*.weight`` not named like an
embedding or a norm is linear) and :attr:`PeftNaming.how` says so.

Example:
    >>> naming = peft_naming(Path("gpt2-tiny"), {"h.0.attn.c_attn.weight": (64, 192)})
    ... # doctest: +SKIP
    >>> naming.targets["h.0.attn.c_attn.weight"].kind  # doctest: +SKIP
    'conv1d'
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from streamvec.io.blocks import FileStamp, file_stamp

__all__ = ["PeftNaming", "PeftTarget", "peft_matches", "peft_naming", "target_modules_for"]

Kind = Literal["linear", "conv1d", "embedding", "conv"]


@dataclass(frozen=True)
class PeftTarget:
    """A checkpoint tensor PEFT's LoRA can adapt.

    Attributes:
        tensor: the checkpoint tensor name (``...q_proj.weight``).
        module: the module's name in the loaded model (what ``target_modules`` matches).
        kind: ``linear`` (weight out x in), ``conv1d`` (weight in x out, ``fan_in_fan_out``),
            ``embedding`` (weight num_embeddings x dim, ``lora_embedding_A/B``) or ``conv``
            (an ``nn.ConvNd`` weight out x in/groups x kernel; read from adapters only).
    """

    tensor: str
    module: str
    kind: Kind

    @property
    def transposed(self) -> bool:
        """Whether the update is ``(B @ A).T`` in the checkpoint's orientation."""
        return self.kind in ("conv1d", "embedding")


@dataclass
class PeftNaming:
    """How a checkpoint's tensors map to PEFT targets of its loaded model.

    Attributes:
        targets: checkpoint tensor name -> :class:`PeftTarget`.
        left_out: checkpoint tensor name -> why no LoRA layer can hold it.
        params: checkpoint tensor name -> parameter name in the loaded model (1:1 renames).
        modules: every module name of the loaded model (for unambiguous ``target_modules``).
        model_class: the class built from config.json, or None when kinds came from shapes.
        how: one line saying how the mapping was decided.
        convs: checkpoint tensor name -> :class:`PeftTarget` of kind ``conv``: convolution
            weights, left out of what streamvec writes (they are in ``left_out`` too) but
            read when an adapter holds a LoRA of them.
    """

    targets: dict[str, PeftTarget]
    left_out: dict[str, str]
    params: dict[str, str]
    modules: tuple[str, ...]
    model_class: str | None
    how: str
    convs: dict[str, PeftTarget] = field(default_factory=dict)
    _by_module: dict[str, str] = field(default_factory=dict, repr=False)

    def tensor_of_module(self, module: str) -> str | None:
        """The checkpoint tensor of a loaded module name (the reverse direction)."""
        if not self._by_module:
            self._by_module = {t.module: name for name, t in self.targets.items()}
        return self._by_module.get(module)

    def input_target(self, module: str) -> PeftTarget | None:
        """The target an adapter's LoRA of ``module`` updates: a writable one or a conv."""
        tensor = self.tensor_of_module(module)
        if tensor is not None:
            return self.targets[tensor]
        return next((t for t in self.convs.values() if t.module == module), None)

    def tensor_of_param(self, param: str) -> str | None:
        """The checkpoint tensor of a loaded parameter name (``modules_to_save`` entries)."""
        for tensor, p in self.params.items():
            if p == param:
                return tensor
        return None


def peft_matches(target: str, module: str) -> bool:
    """PEFT's rule for a ``target_modules`` list entry: equal, or a dotted suffix."""
    return module == target or module.endswith("." + target)


def target_modules_for(exported: list[str], modules: tuple[str, ...]) -> list[str] | str:
    """``target_modules`` that wrap exactly ``exported`` among ``modules``.

    Short names (``q_proj``) where they select exactly the exported modules, full dotted names
    otherwise: a digit (``to_out.0`` -> ``0``) or a name shared with modules not exported
    would wrap the wrong ones. If even full names would catch another module (a module whose
    name ends with an exported one's), an anchored regex of the exact names is returned
    (PEFT full-matches a string ``target_modules``).

    Args:
        exported: module names the adapter holds.
        modules: every module name of the loaded model.

    Returns:
        A list of names, or one regex string.
    """
    chosen = set(exported)
    every = set(modules) | chosen
    targets: list[str] = []
    for short in sorted({m.rsplit(".", 1)[-1] for m in exported}):
        mine = sorted(m for m in exported if m.rsplit(".", 1)[-1] == short)
        caught = {m for m in every if peft_matches(short, m)}
        if not short.isdigit() and caught <= chosen:
            targets.append(short)
        else:
            targets.extend(mine)
    caught_all = {m for m in every if any(peft_matches(t, m) for t in targets)}
    if caught_all != chosen:
        return "^(?:" + "|".join(re.escape(m) for m in sorted(chosen)) + ")$"
    return targets


def _module_of(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def _shape_kind(name: str, shape: tuple[int, ...]) -> tuple[Kind | None, str]:
    """Kind from name and shape alone (the fallback)."""
    module, param = _module_of(name)
    short = module.rsplit(".", 1)[-1].lower()
    if len(shape) != 2 or param != "weight" or min(shape) == 0:
        return None, f"{len(shape)}-D {param}: not a LoRA-adaptable weight"
    if "norm" in short:
        return None, "a norm's weight"
    if "embed" in short or short in ("wte", "wpe", "shared", "relative_attention_bias"):
        return "embedding", ""
    return "linear", ""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import logging

    loggers = [logging.getLogger(n) for n in ("transformers", "diffusers", "accelerate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _build_meta_model(root: Path) -> tuple[Any, str]:
    """The model class of ``root/config.json`` instantiated on the meta device.

    Raises:
        RuntimeError: with the reason, when it cannot be built.
    """
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise RuntimeError(f"no config.json in {root}")
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    import torch

    with _quiet(), torch.device("meta"):
        if isinstance(raw.get("_class_name"), str):
            import diffusers

            cls = getattr(diffusers, raw["_class_name"], None)
            if cls is None:
                raise RuntimeError(f"diffusers has no class {raw['_class_name']!r}")
            return cls.from_config(cls.load_config(str(root))), cls.__name__
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(root))
        archs = getattr(config, "architectures", None) or []
        model_cls: Any = getattr(transformers, archs[0], None) if archs else None
        if model_cls is None:
            model_cls = transformers.AutoModel._model_mapping[type(config)]
        return model_cls._from_config(config), model_cls.__name__


def _renamer(model: Any, keys: list[str]) -> dict[str, tuple[str, bool]]:
    """checkpoint key -> (loaded parameter name, converted by a non-rename operation)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:  # diffusers-only environments, older transformers: names as stored
        return {k: (k, False) for k in keys}
    try:
        mapping = get_model_conversion_mapping(model)
    except (AttributeError, TypeError):  # not a transformers PreTrainedModel (diffusers)
        return {k: (k, False) for k in keys}
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = dict(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None) or None
    out: dict[str, tuple[str, bool]] = {}
    # The loader's order: some renamings only fire after a guard key was seen.
    for key in sorted(keys, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta)
        out[key] = (renamed, pattern is not None)
    return out


def _module_kind(module: Any) -> Kind | None:
    import torch

    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return "conv1d" if isinstance(module, Conv1D) else None


def _is_conv(module: Any) -> bool:
    import torch

    return isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))


def _left_out_reason(module: Any, module_name: str) -> str:
    cls = type(module).__name__
    if "router" in cls.lower() or "router" in module_name.lower():
        return f"{cls} is an MoE router, which PEFT does not adapt"
    if "conv" in cls.lower():
        return f"{cls}: LoRA for convolutions is not written by streamvec"
    return f"{cls} is not a layer PEFT's LoRA adapts (Linear, Conv1D, Embedding)"


def peft_naming(root: Path | None, tensors: Mapping[str, tuple[int, ...]]) -> PeftNaming:
    """Map checkpoint tensors to PEFT targets of the loaded model (see the module doc).

    The mapping of one base is built once per process (building the model class costs a few
    seconds of imports), however many adapters refer to it. It is reused only for the same
    folder, the same version of its ``config.json`` (device, inode, size, modification
    time: a config replaced or edited since is read again) and the same tensor names and
    shapes; the few most recent are kept.

    Args:
        root: the checkpoint directory (holding config.json), or None for shapes only.
        tensors: checkpoint tensor name -> shape.

    Returns:
        A :class:`PeftNaming` (shared with other callers of the same key: do not modify it).
    """
    key = str(root.resolve()) if root is not None else None
    config = _config_stamp(root) if root is not None else None
    return _cached_naming(key, config, tuple((n, tuple(s)) for n, s in tensors.items()))


def _config_stamp(root: Path) -> FileStamp | None:
    """The version of ``root/config.json`` (what decides the model class), None if absent."""
    try:
        return file_stamp((root / "config.json").stat())
    except OSError:
        return None


@functools.lru_cache(maxsize=8)
def _cached_naming(
    root: str | None,
    config: FileStamp | None,
    tensors: tuple[tuple[str, tuple[int, ...]], ...],
) -> PeftNaming:
    # ``config`` is only part of the key: a new version of config.json is a new entry.
    return _peft_naming(Path(root) if root is not None else None, dict(tensors))


def _peft_naming(root: Path | None, tensors: Mapping[str, tuple[int, ...]]) -> PeftNaming:
    targets: dict[str, PeftTarget] = {}
    convs: dict[str, PeftTarget] = {}
    left_out: dict[str, str] = {}
    params: dict[str, str] = {}
    try:
        if root is None:
            raise RuntimeError("no checkpoint directory")
        model, cls_name = _build_meta_model(root)
    except Exception as exc:  # any failure to build means: decide from shapes
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        modules = tuple(sorted({_module_of(n)[0] for n in tensors}))
        for name, shape in tensors.items():
            params[name] = name
            kind, why = _shape_kind(name, shape)
            if kind is None:
                left_out[name] = why
                if len(shape) in (3, 4, 5) and name.endswith(".weight"):
                    convs[name] = PeftTarget(name, _module_of(name)[0], "conv")
            else:
                targets[name] = PeftTarget(name, _module_of(name)[0], kind)
        how = (
            f"module kinds from names and shapes (the model class could not be built: "
            f"{reason}); a GPT-2-style Conv1D cannot be recognised this way"
        )
        return PeftNaming(targets, left_out, params, modules, None, how, convs)
    renamed = _renamer(model, list(tensors))
    meta = dict(model.state_dict())
    for name, shape in tensors.items():
        param, converted = renamed[name]
        if converted:
            left_out[name] = (
                "transformers converts it on load (fused, split or reshaped), so no module "
                "holds it as stored"
            )
            continue
        if param not in meta:
            left_out[name] = f"{cls_name} has no parameter {param!r} when loaded"
            continue
        params[name] = param
        module_name, pname = _module_of(param)
        module = model.get_submodule(module_name)
        kind = _module_kind(module)
        if pname != "weight":
            left_out[name] = f"{pname} of {type(module).__name__}: LoRA adapts weights only"
        elif kind is None:
            left_out[name] = _left_out_reason(module, module_name)
            if _is_conv(module) and tuple(meta[param].shape) == tuple(shape):
                convs[name] = PeftTarget(name, module_name, "conv")
        elif tuple(meta[param].shape) != tuple(shape):
            left_out[name] = (
                f"shape {list(shape)} differs from the loaded {list(meta[param].shape)}"
            )
        else:
            targets[name] = PeftTarget(name, module_name, kind)
    modules = tuple(n for n, _ in model.named_modules() if n)
    how = f"module kinds from {cls_name} built from config.json (transformers' key conversion)"
    return PeftNaming(targets, left_out, params, modules, cls_name, how, convs)
