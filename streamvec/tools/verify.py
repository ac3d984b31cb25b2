"""``streamvec verify``: check an output streamvec wrote against what it recorded at write time.

A Zarr store is validated as every reader validates it (:mod:`streamvec.io.zarr.access`:
metadata, the set of arrays, every chunk file), then every array is read back, every chunk
against its recorded digest, and the whole against its recorded checksum; an array without a
recorded checksum is a failure, not skipped. A safetensors output is checked against its
``streamvec.json`` manifest: the same shard files, the same tensors, each tensor's header
entry (dtype, shape, file and offset) as recorded, and every byte against its checksum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamvec.dtypes import dtype_name
from streamvec.engine.execute import CHECKSUM_ALGO, block_digest, tensor_checksum
from streamvec.engine.sinks import MANIFEST_NAME, read_manifest
from streamvec.errors import InputNotFoundError, StoreError, StreamvecError
from streamvec.io.blocks import BlockReader, ZarrReader, matrix_shape
from streamvec.io.zarr.store import is_zarr_store
from streamvec.model.tensor import row_ranges

if TYPE_CHECKING:
    from streamvec.model.algebra import Source


@dataclass(frozen=True)
class VerifyResult:
    path: Path
    checked: int
    total_bytes: int

    def summary(self) -> str:
        return f"{self.path}: all {self.checked} tensors match their recorded checksums"


# (label, reader, recorded attrs) of each tensor to re-read.
Item = tuple[str, BlockReader, dict[str, Any]]


def _digest(reader: BlockReader, block_rows: int) -> str:
    rows, _ = matrix_shape(reader.shape)
    return tensor_checksum(
        [block_digest(reader.read(r0, r1)) for r0, r1 in row_ranges(rows, block_rows)]
    )


def _store_items(store: Path) -> list[Item]:
    """Every array of a validated store (SVD factors included), with its recorded attrs."""
    import numpy as np

    from streamvec.dtypes import OUTPUT_DTYPES
    from streamvec.io.zarr.validate import validate_store

    checked = validate_store(store)
    out: list[Item] = []
    for array_path, check in sorted(checked.arrays.items()):
        attrs = checked.nodes[array_path].get("attributes") or {}
        dtype = OUTPUT_DTYPES.get(attrs.get("dtype", "")) or np.dtype(check.dtype)
        reader = ZarrReader(str(store), array_path, check.shape, dtype, check)
        out.append((check.label, reader, attrs))
    return out


def _as_recorded(p: Path, source: Source, recorded: dict[str, Any]) -> Source:
    """The output's tensors as the manifest recorded them.

    A checkpoint source hides FP8 scale tensors and reads FP8 weights dequantized. An output
    records weights it copied (FP8 numbers and scales) as stored, and weights it re-quantized
    as read back (float32, the scale covered by the weight's checksum); this view holds each
    tensor in its recorded form.
    """
    from dataclasses import replace

    from streamvec.io.blocks import SafetensorsReader, file_stamp
    from streamvec.io.safetensors.checkpoint import resolve_checkpoint
    from streamvec.io.safetensors.fp8 import Fp8Reader
    from streamvec.model.algebra import SourceTensor

    if not any(isinstance(t.reader, Fp8Reader) for t in source.tensors.values()):
        return source
    files = resolve_checkpoint(p)
    stamps = {f: file_stamp(f.stat()) for f in files.shards}
    view = {
        t.name: SourceTensor(
            t.name,
            t.shape,
            t.dtype,
            SafetensorsReader(str(t.path), t.offset, t.shape, t.dtype, stamps.get(t.path)),
        )
        for t in files.tensors.values()
    }
    for name, t in source.tensors.items():
        rec = recorded.get(name)
        if not isinstance(t.reader, Fp8Reader) or not isinstance(rec, dict):
            continue
        if rec.get("dtype") == dtype_name(t.dtype):
            view[name] = t
            if t.reader.scheme.scale_name not in recorded:
                del view[t.reader.scheme.scale_name]
    return replace(source, tensors=view)


def _manifest_items(p: Path) -> tuple[list[Item], list[str]]:
    """The tensors of a safetensors output, and every way its headers differ from the manifest."""
    from streamvec.model.sources import open_source

    recorded = read_manifest(p)["tensors"]
    source = _as_recorded(p, open_source(p), recorded)
    problems: list[str] = []
    unrecorded = sorted(set(source.tensors) - set(recorded))
    if unrecorded:
        problems.append(f"tensor {unrecorded[0]!r} is not recorded in {MANIFEST_NAME}")
    files = {str(r["file"]) for r in recorded.values() if isinstance(r, dict) and "file" in r}
    if files:
        present = {f.name for f in p.glob("*.safetensors")}
        if present != files:
            odd = sorted(present ^ files)
            problems.append(f"shard files differ from {MANIFEST_NAME}: {', '.join(odd)}")
    items: list[Item] = []
    for name, rec in recorded.items():
        if name not in source.tensors:
            problems.append(f"tensor {name!r} recorded in {MANIFEST_NAME} is missing")
            continue
        t = source.tensors[name]
        rec = rec if isinstance(rec, dict) else {}
        header = {
            "dtype": dtype_name(t.dtype),
            "shape": list(t.shape),
            "file": Path(getattr(t.reader, "path", "")).name,
            "offset": getattr(t.reader, "offset", None),
        }
        for key, found in header.items():
            if key in rec and rec[key] != found:
                problems.append(
                    f"tensor {name!r} has {key} {found!r} in its header, {rec[key]!r} recorded"
                )
        items.append((name, t.reader, rec))
    return items, problems


def verify(path: str | os.PathLike[str], *, progress: bool = False) -> VerifyResult:
    """Check every tensor of a streamvec output against what was recorded when it was written.

    Args:
        path: a Zarr store or a safetensors output directory written by streamvec.
        progress: show a progress bar.

    Returns:
        How many tensors were checked.

    Raises:
        StreamvecError: anything differs (names the tensors and what differs), a checksum is
            missing, or the output is not one streamvec wrote.

    Example:
        >>> verify("edited-model").summary()  # doctest: +SKIP
        'edited-model: all 291 tensors match their recorded checksums'
    """
    from tqdm.auto import tqdm

    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or directory")
    problems: list[str] = []
    if is_zarr_store(p):
        items = _store_items(p)
    else:
        if not (p / MANIFEST_NAME).is_file():
            raise StoreError(
                f"{p}: no {MANIFEST_NAME}; only outputs written by streamvec can be verified"
            )
        items, problems = _manifest_items(p)
    bad: list[str] = []
    for name, reader, rec in tqdm(items, desc="verify", disable=not progress, unit="tensor"):
        if CHECKSUM_ALGO not in rec or "checksum_block_rows" not in rec:
            bad.append(f"{name} (no recorded {CHECKSUM_ALGO} checksum)")
            continue
        try:
            ok = _digest(reader, int(rec["checksum_block_rows"])) == rec[CHECKSUM_ALGO]
        except StoreError as exc:
            bad.append(f"{name} ({str(exc).removeprefix(f'{p}: ')})")
            continue
        if not ok:
            bad.append(name)
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise StreamvecError(f"{p}: does not match its {MANIFEST_NAME}: {shown}")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise StreamvecError(f"{p}: {len(bad)} tensor(s) changed since they were written: {shown}")
    return VerifyResult(p, len(items), 0)
