"""Reading row blocks of a Zarr array chunk file by chunk file, in the calling thread.

The mirror of the engine's chunk writer (:class:`streamvec.io.zarr_store.ZarrBlockWriter`):
each chunk a block needs is read as a file and decoded with the array's own zarr codec
objects (``_decode_sync``), so the values are exactly what ``zarr.Array.__getitem__``
returns. ``zarr.open_array`` plus ``__getitem__`` per block re-parsed the metadata and sent
every chunk through zarr's single event-loop thread: single-threaded this reader is only a
little faster (0.54 against 0.48 GB/s of decoded float32, ``bench/bench_kernel_io.py``), but
with two engine workers ``combine`` from a 1B store took 5.60 s instead of 7.55 s
(``bench/bench_ab.py``, docs/benchmarks.md). Arrays this does not know to be plain
(sharding, array-to-array codecs, chunks split along other axes) return None, and the caller
goes through zarr.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from zarr.core.metadata.v3 import ArrayV3Metadata


def read_rows(store: str, array_path: str, r0: int, r1: int) -> np.ndarray | None:
    """Rows ``[r0, r1)`` of the array at ``store/array_path`` in its storage dtype, or None.

    Chunks that were never written (all fill value, skipped by the writer) read as the fill
    value, as in zarr.
    """
    meta_file = Path(store) / array_path / "zarr.json"
    try:
        stat = meta_file.stat()
    except OSError:
        return None
    # Keyed on the metadata file's identity: a store rewritten in place is read afresh.
    layout = _layout(str(meta_file), stat.st_mtime_ns, stat.st_size)
    if layout is None:
        return None
    meta, codecs, spec = layout
    shape = tuple(meta.shape)
    chunks = tuple(meta.chunks)
    dtype = spec.dtype.to_native_dtype()
    if not shape:
        return _chunk(meta, codecs, spec, store, array_path, ())
    rows_per_chunk = chunks[0]
    out = np.empty((r1 - r0, *shape[1:]), dtype)
    for ci in range(r0 // rows_per_chunk, (r1 - 1) // rows_per_chunk + 1 if r1 > r0 else 0):
        c0 = ci * rows_per_chunk
        chunk = _chunk(meta, codecs, spec, store, array_path, (ci, *([0] * (len(shape) - 1))))
        lo, hi = max(r0, c0), min(r1, c0 + rows_per_chunk)
        out[lo - r0 : hi - r0] = chunk[lo - c0 : hi - c0]
    return out


@lru_cache(maxsize=1024)
def _layout(meta_file: str, mtime_ns: int, size: int) -> tuple[Any, tuple[Any, ...], Any] | None:
    """Parsed metadata, codecs and chunk spec of a plain array, or None for anything else."""
    from zarr.core.array_spec import ArrayConfig
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.metadata.v3 import ArrayV3Metadata

    from streamvec.io.zarr_store import sync_codecs

    raw = json.loads(Path(meta_file).read_bytes())
    if raw.get("node_type") != "array":
        return None
    meta = ArrayV3Metadata.from_dict(raw)
    codecs = sync_codecs(meta)
    if codecs is None or not all(callable(getattr(c, "_decode_sync", None)) for c in codecs):
        return None
    if tuple(meta.chunks[1:]) != tuple(meta.shape[1:]):
        return None  # chunks split along other axes: not what streamvec writes
    spec = meta.get_chunk_spec(
        (0,) * len(meta.shape),
        ArrayConfig(order="C", write_empty_chunks=True),
        default_buffer_prototype(),
    )
    return meta, codecs, spec


def _chunk(
    meta: ArrayV3Metadata,
    codecs: tuple[Any, ...],
    spec: Any,
    store: str,
    array_path: str,
    coords: tuple[int, ...],
) -> np.ndarray:
    """One whole chunk, decoded (or the fill value where no chunk file exists)."""
    path = Path(store) / array_path / meta.encode_chunk_key(coords)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return np.full(spec.shape, meta.fill_value, dtype=spec.dtype.to_native_dtype())
    buf: Any = spec.prototype.buffer.from_bytes(data)
    for codec in reversed(codecs):
        buf = codec._decode_sync(buf, spec)
    return np.asarray(buf.as_numpy_array()).reshape(spec.shape)
