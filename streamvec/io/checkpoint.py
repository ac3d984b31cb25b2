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
from streamvec.io.header import Header, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
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
    """

    root: Path
    shards: tuple[Path, ...]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

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


def _from_index(root: Path, index_path: Path) -> CheckpointFiles:
    try:
        doc = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_path}: not valid JSON ({exc})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' object mapping tensors to shards")
    by_shard: dict[Path, list[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(_shard_path(root, shard, index_path), []).append(tensor)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard, names in by_shard.items():
        header = read_header(shard)
        if not metadata:
            metadata = header.metadata
        lacking = [n for n in names if n not in header.tensors]
        if lacking:
            raise CheckpointError(
                f"{index_path}: shard {shard.name} lacks tensor(s) the index assigns to it: "
                f"{_preview(lacking)}"
            )
        unlisted = sorted(set(header.tensors) - set(names))
        if unlisted:
            raise CheckpointError(
                f"{shard}: holds tensor(s) the index does not list: {_preview(unlisted)}; "
                "regenerate the index"
            )
        for name in names:
            tensors[name] = header.tensors[name]
    return CheckpointFiles(root, tuple(by_shard), tensors, metadata)


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
    return CheckpointFiles(path.parent, (path,), dict(header.tensors), header.metadata)


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def resolve_checkpoint(path: str | os.PathLike[str]) -> CheckpointFiles:
    """Locate every tensor of a checkpoint, reading headers only.

    Args:
        path: a directory with ``model.safetensors.index.json``, a directory with exactly
            one ``*.safetensors`` file, or a ``.safetensors`` file.

    Returns:
        The resolved :class:`CheckpointFiles`.

    Raises:
        InputNotFoundError: the path does not exist.
        CheckpointError: no usable safetensors weights (pickles are refused with how to
            convert them), or an inconsistent index.
        HeaderError: a shard's header is invalid.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{p}: pickle checkpoints are never loaded; {CONVERT_HINT}")
        if p.name.endswith(".index.json"):
            return _from_index(p.parent, p)
        return _from_file(p)
    if not p.is_dir():
        raise _not_regular(p)
    index = p / INDEX_NAME
    if index.is_file():
        return _from_index(p, index)
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return _from_file(files[0])
    if len(files) > 1:
        raise CheckpointError(
            f"{p}: {len(files)} .safetensors files but no {INDEX_NAME}; pass one file, or add "
            "the index that says which tensors each shard holds"
        )
    pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{p}: only pickle weights ({_preview(sorted(pickles))}), which are never loaded; "
            f"{CONVERT_HINT}"
        )
    raise CheckpointError(f"{p}: no .safetensors files or {INDEX_NAME} in this directory")


__all__ = ["INDEX_NAME", "CheckpointFiles", "HeaderError", "resolve_checkpoint"]
