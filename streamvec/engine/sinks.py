"""Where computed blocks go: a Zarr store or sharded safetensors, behind one small protocol.

A sink is prepared with the full list of output tensors (so every array or shard header is
created before any data), hands out picklable per-tensor block writers (paths and offsets,
never open handles, so any scheduler can run them), and is finished with the checksums.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from streamvec.io.companions import Companions, copy_companions
from streamvec.io.output import remove_stray_temporaries
from streamvec.io.safetensors.fp8 import Fp8BlockWriter
from streamvec.io.safetensors.layout import TensorSpec
from streamvec.io.safetensors.requantize import has_fp8, strip_quantization_config, tensor_amax
from streamvec.io.safetensors.writer import ShardedSafetensorsWriter
from streamvec.io.writeback import write_at
from streamvec.io.zarr import store as zarr_store
from streamvec.model.tensor import LazyTensor

MANIFEST_NAME = "streamvec.json"
# A manifest lists per-tensor records; even a model of a million tensors stays far below this.
MAX_MANIFEST_BYTES = 256 << 20


def read_manifest(directory: Path) -> dict[str, Any]:
    """The ``streamvec.json`` of a safetensors output, checked before anything relies on it.

    Args:
        directory: the output directory.

    Returns:
        The manifest: a mapping with a ``tensors`` mapping of name to record (each record a
        mapping; a recorded checksum comes with a positive ``checksum_block_rows``).

    Raises:
        StoreError: unreadable, not JSON, too large, or not shaped like a manifest.
    """
    from streamvec.errors import StoreError

    path = directory / MANIFEST_NAME
    fix = "the output is damaged; recompute it (or restore the file)"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise StoreError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; {fix}")
        doc = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise StoreError(f"{path}: cannot read ({exc.strerror}); {fix}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise StoreError(f"{path}: not valid JSON ({exc}); {fix}") from None
    tensors = doc.get("tensors") if isinstance(doc, dict) else None
    if not isinstance(tensors, dict):
        raise StoreError(f"{path}: no 'tensors' mapping of name to record; {fix}")
    for name, rec in tensors.items():
        rows = rec.get("checksum_block_rows") if isinstance(rec, dict) else None
        ok = isinstance(rec, dict) and (
            "xxh3_128" not in rec
            or (isinstance(rows, int) and not isinstance(rows, bool) and rows > 0)
        )
        if not ok:
            raise StoreError(f"{path}: the record of tensor {name!r} is malformed; {fix}")
    return doc


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor and the row-block size it is computed (and checksummed) in."""

    tensor: LazyTensor
    block_rows: int


class BlockWriter(Protocol):
    def write(self, r0: int, block: np.ndarray) -> float:
        """Store rows from ``r0``; returns the seconds of it spent encoding (0.0: none).

        A lossy writer (FP8 re-quantization) replaces ``block``'s values with the values as
        stored, so the checksum recorded after it is of what a reader gets back.
        """
        ...


class Sink(Protocol):
    format: str

    def prepare(
        self, directory: Path, plan: list[PlannedTensor], attrs: dict[str, Any]
    ) -> None: ...

    def reopen(self, directory: Path, plan: list[PlannedTensor], attrs: dict[str, Any]) -> None: ...

    def writer(self, name: str) -> BlockWriter: ...

    def finish(self, checksums: dict[str, dict[str, Any]], attrs: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PwriteBlockWriter:
    """Writes rows of one tensor at its byte offset in a pre-sized safetensors shard."""

    path: str
    offset: int
    row_bytes: int

    def write(self, r0: int, block: np.ndarray) -> float:
        write_at(self.path, self.offset + r0 * self.row_bytes, block)
        return 0.0  # raw bytes: nothing to encode


class ZarrSink:
    """A Zarr v3 store in the layout of :mod:`streamvec.io.zarr.store`.

    Args:
        compression: chunk compression, one of :data:`streamvec.io.zarr.store.COMPRESSIONS`
            (default lz4 + bitshuffle; ``"none"`` trades 2x the bytes for half the CPU).
    """

    format = "zarr"

    def __init__(self, compression: str = "lz4") -> None:
        self.compression = compression
        self.path: Path | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._metadata: dict[str, Any] = {}

    def prepare(self, directory: Path, plan: list[PlannedTensor], attrs: dict[str, Any]) -> None:
        self.path = directory
        specs = []
        for p in plan:
            t = p.tensor
            self._shapes[t.name] = t.shape
            source_dtypes = sorted({str(r.dtype) for _, r in t.terms})
            extra = {"source_dtype": source_dtypes[0] if len(source_dtypes) == 1 else source_dtypes}
            specs.append(zarr_store.ArraySpec(t.name, t.shape, t.dtype, p.block_rows, extra))
        self._metadata = zarr_store.create_store(directory, attrs, specs, self.compression)

    def writer(self, name: str) -> BlockWriter:
        from streamvec.names import encode_array_path

        assert self.path is not None
        # The writer carries the array's metadata (small, picklable) so no worker has to open
        # the array to learn its codecs and chunk grid.
        return zarr_store.ZarrBlockWriter(
            str(self.path), encode_array_path(name), self._shapes[name], self._metadata.get(name)
        )

    def finish(self, checksums: dict[str, dict[str, Any]], attrs: dict[str, Any]) -> None:
        assert self.path is not None
        from streamvec.names import encode_array_path

        # Checksums and the record of empty chunks in one rewrite of each array's metadata, the
        # root attrs with the consolidated metadata in one of the root's.
        by_path = {encode_array_path(n): a for n, a in checksums.items()}
        zarr_store.consolidate(self.path, by_path, attrs)

    def close(self) -> None:
        pass

    def reopen(self, directory: Path, plan: list[PlannedTensor], attrs: dict[str, Any]) -> None:
        """Continue an unfinished store: its arrays exist; writers read their metadata."""
        remove_stray_temporaries(directory)
        self.path = directory
        self._shapes = {p.tensor.name: p.tensor.shape for p in plan}
        self._metadata = {}


def _row_bytes(specs: list[TensorSpec]) -> dict[str, int]:
    """Bytes per row (first axis) of each stored tensor, for offsets of row blocks."""
    return {s.name: s.dtype.itemsize * int(np.prod(s.shape[1:], dtype=np.int64)) for s in specs}


def _stored_specs(plan: list[PlannedTensor]) -> list[TensorSpec]:
    """What is stored: each tensor as its dtype, or an FP8 weight followed by its scales."""
    specs = []
    for p in plan:
        t = p.tensor
        if t.requantize is None:
            specs.append(TensorSpec(t.name, t.dtype, t.shape))
        else:
            q = t.requantize
            specs.append(TensorSpec(t.name, q.fp8, t.shape))
            specs.append(TensorSpec(q.scale_name, q.scale_dtype, q.scale_shape))
    return specs


class SafetensorsSink:
    """Sharded safetensors in the Hugging Face layout, plus the base's non-weight files."""

    format = "safetensors"

    def __init__(
        self,
        shard_size: int,
        extra_files: tuple[str, ...] = (),
        companions: Companions | None = None,
    ) -> None:
        self.shard_size = shard_size
        self.companions = companions or Companions(extra_files)
        self.path: Path | None = None
        self._writer: ShardedSafetensorsWriter | None = None

    def prepare(self, directory: Path, plan: list[PlannedTensor], attrs: dict[str, Any]) -> None:
        self.path = directory
        specs = _stored_specs(plan)
        self._writer = ShardedSafetensorsWriter(
            directory, specs, shard_size=self.shard_size, stem=self.companions.stem
        )
        self._writer.create()
        self._row_bytes = _row_bytes(specs)
        self._plan = {p.tensor.name: p for p in plan}
        copy_companions(directory, self.companions)
        if not has_fp8([s.dtype for s in specs]) and (directory / "config.json").is_file():
            # A dequantized output of an FP8 base: its config must not announce FP8 weights.
            strip_quantization_config(directory / "config.json")

    def writer(self, name: str) -> BlockWriter:
        assert self._writer is not None
        path, offset = self._writer.location(name)
        p = self._plan[name]
        scheme = p.tensor.requantize
        if scheme is None:
            return PwriteBlockWriter(str(path), offset, self._row_bytes[name])
        scale_path, scale_offset = self._writer.location(scheme.scale_name)
        amax = tensor_amax(p.tensor, p.block_rows) if scheme.granularity == "tensor" else None
        return Fp8BlockWriter(
            str(path),
            offset,
            self._row_bytes[name],
            str(scale_path),
            scale_offset,
            self._row_bytes[scheme.scale_name],
            scheme,
            amax,
        )

    def finish(self, checksums: dict[str, dict[str, Any]], attrs: dict[str, Any]) -> None:
        assert self._writer is not None and self.path is not None
        # Blocks were written at location() offsets by the block writers, not via write_rows;
        # the engine has already checked that every block task returned.
        self._writer.finish(fsync=False, require_complete=False)
        # Per tensor: its checksum and where its header puts it (streamvec verify compares).
        tensors = {}
        for name, rec in checksums.items():
            path, offset = self._writer.location(name)
            kept = {k: v for k, v in rec.items() if not k.startswith("block_")}
            tensors[name] = {**kept, "file": path.name, "offset": offset}
        manifest = {"streamvec": attrs, "tensors": tensors}
        (self.path / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def reopen(self, directory: Path, plan: list[PlannedTensor], attrs: dict[str, Any]) -> None:
        """Continue unfinished shards: same layout, checked header by header."""
        remove_stray_temporaries(directory)
        self.path = directory
        specs = _stored_specs(plan)
        self._writer = ShardedSafetensorsWriter(
            directory, specs, shard_size=self.shard_size, stem=self.companions.stem
        )
        self._writer.reopen()
        self._row_bytes = _row_bytes(specs)
        self._plan = {p.tensor.name: p for p in plan}
