"""``streamvec info``: what a checkpoint or store holds, from headers and metadata only."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from streamvec.dtypes import dtype_name
from streamvec.errors import InputNotFoundError
from streamvec.io.safetensors.checkpoint import resolve_checkpoint
from streamvec.io.zarr.store import is_zarr_store, read_store
from streamvec.units import format_bytes


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready description: kind, tensors (name, dtype, shape, bytes, file), totals."""
    p = Path(path)
    if not p.exists():
        from streamvec.io.hub import parse_hub_id, resolve_hub_id

        if parse_hub_id(str(path)) is None:
            raise InputNotFoundError(f"{p}: no such file or directory")
        p = resolve_hub_id(str(path)).path  # a Hugging Face model id
    if is_zarr_store(p):
        store = read_store(p)
        tensors = [
            {
                "name": a.name,
                "dtype": dtype_name(a.dtype),
                "shape": list(a.shape),
                "bytes": int(a.dtype.itemsize * math.prod(a.shape)),
                "file": a.array_path,
            }
            for a in store.arrays.values()
        ]
        return {
            "path": str(p),
            "type": "zarr",
            **_totals(tensors),
            "attrs": store.attrs,
            "tensors": tensors,
        }
    files = resolve_checkpoint(p)
    tensors = [
        {
            "name": t.name,
            "dtype": dtype_name(t.dtype),
            "shape": list(t.shape),
            "bytes": t.nbytes,
            "file": t.path.name,
        }
        for t in files.tensors.values()
    ]
    return {
        "path": str(p),
        "type": "safetensors",
        "shards": [s.name for s in files.shards],
        **_totals(tensors),
        "metadata": files.metadata,
        "tensors": tensors,
    }


def _totals(tensors: list[dict[str, Any]]) -> dict[str, Any]:
    by_dtype: Counter[str] = Counter()
    for t in tensors:
        by_dtype[t["dtype"]] += t["bytes"]
    return {
        "num_tensors": len(tensors),
        "num_parameters": sum(math.prod(t["shape"]) for t in tensors),
        "total_bytes": sum(t["bytes"] for t in tensors),
        "bytes_by_dtype": dict(by_dtype),
    }


def format_info(info: dict[str, Any], *, limit: int = 40) -> str:
    """Human-readable text for :func:`describe`'s result."""
    lines = [f"{info['path']}  ({info['type']})"]
    if info["type"] == "safetensors":
        lines.append(f"  shards:     {len(info['shards'])}")
    else:
        attrs = info.get("attrs", {})
        lines.append(f"  kind:       {attrs.get('kind')}  ({attrs.get('created_by')})")
        if attrs.get("operation"):
            lines.append(f"  operation:  {attrs.get('operation')}: {attrs.get('expression', '')}")
    lines.append(
        f"  tensors:    {info['num_tensors']}  ({info['num_parameters']:,} parameters, "
        f"{format_bytes(info['total_bytes'])})"
    )
    dtypes = ", ".join(f"{k} {format_bytes(v)}" for k, v in info["bytes_by_dtype"].items())
    lines.append(f"  dtypes:     {dtypes}")
    tensors = info["tensors"]
    shown = tensors if limit <= 0 else tensors[:limit]
    if shown:
        width = max(len(t["name"]) for t in shown)
        lines.append("")
        for t in shown:
            shape = "x".join(map(str, t["shape"])) or "scalar"
            size = format_bytes(t["bytes"])
            lines.append(
                f"  {t['name']:<{width}}  {t['dtype']:<8}  {shape:<14}  {size:>10}  {t['file']}"
            )
        if len(shown) < len(tensors):
            lines.append(f"  ... and {len(tensors) - len(shown)} more (--limit 0 lists all)")
    return "\n".join(lines)
