"""Find the tensors of a checkpoint: an HF sharded directory, a one-file directory, or a file.

Only headers are read here. Every shard named by an index must exist inside the checkpoint
directory (a name that escapes it is refused) and must hold exactly the tensors the index
assigns to it. Pickle checkpoints are never unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from streamvec.errors import CheckpointError, HeaderError, InputNotFoundError
from streamvec.io.safetensors.header import Header, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
# Weight file stems of the two libraries people load checkpoints with: transformers writes
# model.safetensors / model-0000i-of-0000N.safetensors + model.safetensors.index.json, diffusers
# the same names on diffusion_pytorch_model. Outputs reuse the input's stem, so they load with
# the same class.
TRANSFORMERS_STEM = "model"
DIFFUSERS_STEM = "diffusion_pytorch_model"
WEIGHT_STEMS = (TRANSFORMERS_STEM, DIFFUSERS_STEM)
# A diffusers pipeline root: components live in subfolders named by this file.
PIPELINE_INDEX = "model_index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files that describe a model rather than hold its weights; copied next to edited checkpoints.
NON_WEIGHT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
CONVERT_HINT = (
    "convert it to safetensors first, e.g. transformers' "
    "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)` "
    "or `safetensors.torch.save_file(torch.load(F, weights_only=True), 'model.safetensors')`"
)


@dataclass(frozen=True)
class CheckpointFiles:
    """The resolved files of a checkpoint and the tensors they hold.

    Attributes:
        root: the checkpoint directory (the file's directory for a single file).
        shards: shard files in index order.
        tensors: name -> location, in shard and data order.
        metadata: the ``__metadata__`` of the first shard.
        stem: the weight file stem outputs are written with (``model``, or
            ``diffusion_pytorch_model`` for a diffusers component).
    """

    root: Path
    shards: tuple[Path, ...]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    stem: str = TRANSFORMERS_STEM

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data over all shards."""
        return sum(t.nbytes for t in self.tensors.values())

    def extra_files(self) -> list[Path]:
        """The non-weight files (config, tokenizer) present next to the weights."""
        return [self.root / n for n in NON_WEIGHT_FILES if (self.root / n).is_file()]


def _shard_path(root: Path, name: object, index_path: Path) -> Path:
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index_path}: weight_map values must be shard file names")
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise CheckpointError(
            f"{index_path}: shard {name!r} points outside the checkpoint directory; refusing it"
        )
    path = root / candidate
    # Resolve symlinks too: a link out of the checkpoint is the same escape.
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise CheckpointError(
            f"{index_path}: shard {name!r} resolves outside the checkpoint directory; refusing it"
        ) from None
    if not path.is_file():
        raise CheckpointError(f"{index_path}: shard {name!r} listed in the index does not exist")
    return path


def _load_index(index_path: Path) -> dict[str, object]:
    """The index's ``weight_map``; a key listed twice keeps its last shard, as ``json`` does."""
    try:
        doc = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_path}: not valid JSON ({exc})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' object mapping tensors to shards")
    return weight_map


def _from_index(root: Path, index_path: Path, stem: str) -> CheckpointFiles:
    """Read an index the way transformers and diffusers load it.

    Both load every tensor of every shard the index names (in sorted file order, a later
    shard replacing a tensor an earlier one also holds), so a tensor the index does not list,
    or lists twice, is still loaded and is accepted here the same way. A listed tensor that no
    listed shard holds would be left randomly initialised by them: that is refused.
    """
    weight_map = _load_index(index_path)
    shard_names = {_shard_path(root, shard, index_path): shard for shard in weight_map.values()}
    shards = sorted(shard_names, key=lambda s: str(shard_names[s]))
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard in shards:
        header = read_header(shard)
        if not metadata:
            metadata = header.metadata
        for name, info in header.tensors.items():
            tensors.pop(name, None)  # a later shard wins, and its position counts
            tensors[name] = info
    absent = [str(n) for n in weight_map if n not in tensors]
    if absent:
        by = {str(n): str(weight_map[n]) for n in absent}
        first = absent[0]
        raise CheckpointError(
            f"{index_path}: shard {by[first]} lacks tensor(s) the index assigns to it, and no "
            f"other listed shard holds them: {_preview(absent)} (transformers would leave "
            "them randomly initialised); regenerate the index"
        )
    return CheckpointFiles(root, tuple(shards), tensors, metadata, stem)


def _not_regular(path: Path) -> CheckpointError:
    # A device (/dev/zero), FIFO or socket would be read forever or block: never open one.
    return CheckpointError(
        f"{path}: not a regular file or directory (a device, FIFO or socket); give a "
        "checkpoint directory or a .safetensors file"
    )


def _from_file(path: Path) -> CheckpointFiles:
    if not path.is_file():
        raise _not_regular(path)
    header: Header = read_header(path)
    stem = DIFFUSERS_STEM if path.name.startswith(DIFFUSERS_STEM) else TRANSFORMERS_STEM
    return CheckpointFiles(path.parent, (path,), dict(header.tensors), header.metadata, stem)


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def resolve_checkpoint(path: str | os.PathLike[str]) -> CheckpointFiles:
    """Locate every tensor of a checkpoint, reading headers only.

    A directory is read as transformers and diffusers load it: ``model.safetensors``, else
    ``model.safetensors.index.json``, else diffusers' ``diffusion_pytorch_model.safetensors``,
    else ``diffusion_pytorch_model.safetensors.index.json``, else its only ``*.safetensors``
    file. So a Mistral-style folder holding both ``model.safetensors`` and
    ``consolidated.safetensors`` (the same weights under mistral_inference's names) reads
    ``model.safetensors``, as transformers does. A diffusers pipeline root (``model_index.json``)
    is refused with the component subfolders to pass instead.

    Args:
        path: a checkpoint directory as above, an index file, or a ``.safetensors`` file.

    Returns:
        The resolved :class:`CheckpointFiles`.

    Raises:
        InputNotFoundError: the path does not exist.
        CheckpointError: no usable safetensors weights (pickles are refused with how to
            convert them), a pipeline root, or an inconsistent index.
        HeaderError: a shard's header is invalid.

    Example:
        >>> resolve_checkpoint("sd/unet").stem  # doctest: +SKIP
        'diffusion_pytorch_model'
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{p}: pickle checkpoints are never loaded; {CONVERT_HINT}")
        if p.name.endswith(".index.json"):
            stem = DIFFUSERS_STEM if p.name.startswith(DIFFUSERS_STEM) else TRANSFORMERS_STEM
            return _from_index(p.parent, p, stem)
        return _from_file(p)
    if not p.is_dir():
        raise _not_regular(p)
    for stem in WEIGHT_STEMS:
        if (p / f"{stem}.safetensors").is_file():
            return _from_file(p / f"{stem}.safetensors")
        index = p / f"{stem}.safetensors.index.json"
        if index.is_file():
            return _from_index(p, index, stem)
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return _from_file(files[0])
    if len(files) > 1:
        raise CheckpointError(
            f"{p}: {len(files)} .safetensors files but no {INDEX_NAME}; pass one file, or add "
            "the index that says which tensors each shard holds"
        )
    if (p / PIPELINE_INDEX).is_file():
        raise CheckpointError(_pipeline_message(p))
    pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{p}: only pickle weights ({_preview(sorted(pickles))}), which are never loaded; "
            f"{CONVERT_HINT}"
        )
    raise CheckpointError(f"{p}: no .safetensors files or {INDEX_NAME} in this directory")


def _pipeline_message(p: Path) -> str:
    """Refuse a diffusers pipeline root, naming the component folders that hold weights.

    A pipeline is several models (UNet, VAE, text encoders) that are edited, and loaded, one
    by one; a single output cannot hold them in the layout diffusers loads.
    """
    parts = sorted(
        d.name
        for d in p.iterdir()
        if d.is_dir() and any(d.glob("*.safetensors")) and (d / "config.json").is_file()
    )
    shown = ", ".join(str(p / d) for d in parts) or "none found"
    return (
        f"{p}: a diffusers pipeline folder ({PIPELINE_INDEX}); streamvec edits one component "
        f"at a time: pass a component subfolder instead ({shown}), and write each output into "
        "a copy of the pipeline folder under the same subfolder name"
    )


__all__ = [
    "DIFFUSERS_STEM",
    "INDEX_NAME",
    "TRANSFORMERS_STEM",
    "CheckpointFiles",
    "HeaderError",
    "resolve_checkpoint",
]
