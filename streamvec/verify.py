"""``streamvec verify``: recompute the per-tensor checksums an output recorded at write time."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamvec.engine import CHECKSUM_ALGO, block_digest, tensor_checksum
from streamvec.errors import InputNotFoundError, StoreError, StreamvecError
from streamvec.io.blocks import BlockReader, matrix_shape
from streamvec.io.zarr_store import is_zarr_store, read_store
from streamvec.sinks import MANIFEST_NAME
from streamvec.tensor import row_ranges


@dataclass(frozen=True)
class VerifyResult:
    path: Path
    checked: int
    total_bytes: int

    def summary(self) -> str:
        return f"{self.path}: all {self.checked} tensors match their recorded checksums"


def _digest(reader: BlockReader, block_rows: int) -> str:
    rows, _ = matrix_shape(reader.shape)
    return tensor_checksum(
        [block_digest(reader.read(r0, r1)) for r0, r1 in row_ranges(rows, block_rows)]
    )


def _checksummed_arrays(store: Path) -> list[tuple[str, BlockReader, dict[str, Any]]]:
    """Every array of a store that carries a checksum, nested ones (SVD factors) included."""
    import json

    from streamvec.dtypes import OUTPUT_DTYPES
    from streamvec.io.blocks import ZarrReader
    from streamvec.names import decode_array_path

    root = json.loads((store / "zarr.json").read_text())
    meta = root["consolidated_metadata"]["metadata"]
    out: list[tuple[str, BlockReader, dict[str, Any]]] = []
    for array_path, node in sorted(meta.items()):
        attrs = node.get("attributes", {})
        if node.get("node_type") != "array" or CHECKSUM_ALGO not in attrs:
            continue
        dtype = OUTPUT_DTYPES.get(attrs.get("dtype", ""))
        if dtype is None:
            dtype = np.dtype(node["data_type"])
        group, _, leaf = array_path.rpartition("/")
        label = attrs.get("name") or decode_array_path(group) + f" [{leaf}]"
        out.append((label, ZarrReader(str(store), array_path, tuple(node["shape"]), dtype), attrs))
    return out


def verify(path: str | os.PathLike[str], *, progress: bool = False) -> VerifyResult:
    """Re-read every tensor of a streamvec output and compare with its recorded checksum.

    Raises:
        StreamvecError: a tensor changed (names them), or the output has no checksums.
    """
    from tqdm.auto import tqdm

    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or directory")
    items: list[tuple[str, BlockReader, dict[str, Any]]] = []
    if is_zarr_store(p):
        read_store(p)  # a streamvec store, finished (consolidated)
        for label, reader, attrs in _checksummed_arrays(p):
            items.append((label, reader, attrs))
    else:
        manifest_path = p / MANIFEST_NAME
        if not manifest_path.is_file():
            raise StoreError(
                f"{p}: no {MANIFEST_NAME}; only outputs written by streamvec can be verified"
            )
        from streamvec.dtypes import dtype_name
        from streamvec.io.blocks import SafetensorsReader
        from streamvec.io.checkpoint import resolve_checkpoint
        from streamvec.sources import open_source

        manifest = json.loads(manifest_path.read_text())
        source = open_source(p)
        stored = resolve_checkpoint(p).tensors
        for name, rec in manifest["tensors"].items():
            tensor_reader: BlockReader
            if name in source.tensors and dtype_name(source.tensors[name].dtype) == rec.get(
                "dtype", dtype_name(source.tensors[name].dtype)
            ):
                # As computed: re-quantized FP8 weights were checksummed as read back (float32).
                tensor_reader = source.tensors[name].reader
            elif name in stored:
                t = stored[name]  # as stored: FP8 weights and scales copied bit for bit
                tensor_reader = SafetensorsReader(str(t.path), t.offset, t.shape, t.dtype)
            else:
                raise StreamvecError(f"{p}: tensor {name!r} recorded in {MANIFEST_NAME} is missing")
            items.append((name, tensor_reader, rec))
    bad: list[str] = []
    total = 0
    for name, reader, rec in tqdm(items, desc="verify", disable=not progress, unit="tensor"):
        if CHECKSUM_ALGO not in rec:
            raise StoreError(f"{p}: tensor {name!r} has no recorded {CHECKSUM_ALGO} checksum")
        if _digest(reader, int(rec["checksum_block_rows"])) != rec[CHECKSUM_ALGO]:
            bad.append(name)
        total += 1
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise StreamvecError(f"{p}: {len(bad)} tensor(s) changed since they were written: {shown}")
    return VerifyResult(p, total, 0)
