"""The Zarr v3 store layout (format 1): creating arrays, and reading a store back.

Root group attrs hold ``{"streamvec": {"format": 1, "kind": ..., "sources": [...],
"created_by": ...}}``; each tensor is one array whose path is the tensor name
percent-encoded (see :func:`streamvec.names.encode_array_path`) and whose attrs hold
``{"name", "source_dtype", "dtype", "xxh3_128", "checksum_block_rows"}``. Zarr 3 has no
bfloat16, so bf16 arrays are stored as their raw ``uint16`` bits with ``"dtype": "bfloat16"``
in the attrs; streamvec's readers view them back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamvec.dtypes import BFLOAT16, OUTPUT_DTYPES, SAFETENSORS_DTYPES, dtype_name
from streamvec.errors import StoreError
from streamvec.io.blocks import ZarrReader
from streamvec.names import decode_array_path, encode_array_path

FORMAT = 1


def _compressors() -> list[Any]:
    from zarr.codecs import BloscCodec

    # lz4 + bitshuffle: ~2.6x on real bf16 deltas stored as float32 at ~1 GB/s encode (zstd
    # compressed slightly better and ran far slower); see docs/store.md.
    return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]


def is_zarr_store(path: Path) -> bool:
    """True when ``path`` is a Zarr v3 group directory."""
    return path.is_dir() and (path / "zarr.json").is_file()


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype Zarr stores for ``dtype`` (bf16 as its uint16 bits)."""
    return np.dtype(np.uint16) if np.dtype(dtype) == BFLOAT16 else np.dtype(dtype)


@dataclass(frozen=True)
class ArraySpec:
    """One array to pre-create."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int
    attrs: dict[str, Any]


def create_store(path: Path, root_attrs: dict[str, Any], arrays: list[ArraySpec]) -> None:
    """Create the group and pre-create every array (chunks = the row blocks)."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs["streamvec"] = root_attrs
    for spec in arrays:
        chunks = (spec.chunk_rows, *spec.shape[1:]) if spec.shape else ()
        arr = group.create_array(
            name=encode_array_path(spec.name),
            shape=spec.shape,
            chunks=chunks,
            dtype=storage_dtype(spec.dtype),
            compressors=_compressors(),
            fill_value=0,
            # Skip writing chunks that are all zero (frozen layers): costs one scan per chunk.
            config={"write_empty_chunks": False},
        )
        arr.attrs.update({"name": spec.name, "dtype": dtype_name(spec.dtype), **spec.attrs})


@dataclass(frozen=True)
class ZarrBlockWriter:
    """Writes row blocks of one array; picklable (holds the path, not an open array)."""

    store: str
    array_path: str
    shape: tuple[int, ...]

    def write(self, r0: int, block: np.ndarray) -> None:
        import zarr

        arr = zarr.open_array(self.store, path=self.array_path, mode="r+")
        data = block.view(np.uint16) if block.dtype == BFLOAT16 else block
        if not self.shape:
            arr[...] = data.reshape(())
        else:
            arr[r0 : r0 + data.shape[0]] = data.reshape((data.shape[0], *self.shape[1:]))


def set_array_attrs(path: Path, updates: dict[str, dict[str, Any]]) -> None:
    """Add attrs to arrays by tensor name (checksums known only after the run)."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    for name, attrs in updates.items():
        group[encode_array_path(name)].attrs.update(attrs)


def update_root_attrs(path: Path, updates: dict[str, Any]) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs["streamvec"])  # type: ignore[arg-type]
    attrs.update(updates)
    group.attrs["streamvec"] = attrs


def consolidate(path: Path) -> None:
    import warnings

    import zarr

    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not in the v3 spec yet; zarr-python reads
        # it, and it turns listing a store of thousands of arrays into one file read.
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(str(path))


@dataclass(frozen=True)
class StoreArray:
    name: str
    array_path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    attrs: dict[str, Any]

    def reader(self, store: Path) -> ZarrReader:
        return ZarrReader(str(store), self.array_path, self.shape, self.dtype)


@dataclass(frozen=True)
class StoreInfo:
    path: Path
    attrs: dict[str, Any]
    arrays: dict[str, StoreArray]

    @property
    def kind(self) -> str:
        return str(self.attrs.get("kind", "?"))


def read_store(path: str | os.PathLike[str]) -> StoreInfo:
    """List a streamvec Zarr store from its (consolidated) metadata; reads no chunk."""
    p = Path(path)
    try:
        root = json.loads((p / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{p}: not a readable Zarr v3 store ({exc})") from None
    attrs = root.get("attributes", {}).get("streamvec") if isinstance(root, dict) else None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise StoreError(
            f"{p}: a Zarr store, but not one written by streamvec (format {FORMAT} attrs missing)"
        )
    meta = (root.get("consolidated_metadata") or {}).get("metadata")
    if not isinstance(meta, dict):
        raise StoreError(f"{p}: store metadata is not consolidated (unfinished store?)")
    arrays: dict[str, StoreArray] = {}
    for array_path, node in meta.items():
        if not isinstance(node, dict) or node.get("node_type") != "array" or "/" in array_path:
            continue
        a = node.get("attributes", {})
        name = a.get("name", decode_array_path(array_path))
        dname = a.get("dtype")
        dtype = OUTPUT_DTYPES.get(dname) or _numpy_dtype(node.get("data_type"), p, name)
        arrays[name] = StoreArray(name, array_path, tuple(node["shape"]), dtype, a)
    return StoreInfo(p, attrs, arrays)


def _numpy_dtype(data_type: Any, store: Path, name: str) -> np.dtype:
    if isinstance(data_type, str):
        try:
            return np.dtype(data_type)
        except TypeError:
            pass
    known = {str(d): d for d in SAFETENSORS_DTYPES.values()}
    if isinstance(data_type, str) and data_type in known:
        return known[data_type]
    raise StoreError(f"{store}: array {name!r} has unsupported data type {data_type!r}")
