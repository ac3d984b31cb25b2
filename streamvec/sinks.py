"""Where computed blocks go: a Zarr store or sharded safetensors, behind one small protocol.

A sink is prepared with the full list of output tensors (so every array or shard header is
created before any data), hands out picklable per-tensor block writers (paths and offsets,
never open handles, so any scheduler can run them), and is finished with the checksums.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from streamvec.errors import OutputError
from streamvec.io import zarr_store
from streamvec.io.fp8 import Fp8BlockWriter
from streamvec.io.output import remove_stray_temporaries
from streamvec.io.st_writer import ShardedSafetensorsWriter, TensorSpec
from streamvec.io.writeback import start_writeback
from streamvec.requantize import has_fp8, strip_quantization_config, tensor_amax
from streamvec.tensor import LazyTensor

MANIFEST_NAME = "streamvec.json"


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
        data = np.ascontiguousarray(block).view(np.uint8).reshape(-1).data
        pos = self.offset + r0 * self.row_bytes
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                start, length = pos, len(data)
                while data:
                    n = os.pwrite(fd, data, pos)
                    data, pos = data[n:], pos + n
                start_writeback(fd, start, length)
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(
                f"{self.path}: write failed ({exc.strerror}); free space and rerun"
            ) from None
        return 0.0  # raw bytes: nothing to encode


class ZarrSink:
    """A Zarr v3 store in the layout of :mod:`streamvec.io.zarr_store`.

    Args:
        compression: chunk compression, one of :data:`streamvec.io.zarr_store.COMPRESSIONS`
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
        zarr_store.set_array_attrs(self.path, checksums)
        zarr_store.update_root_attrs(self.path, attrs)
        zarr_store.consolidate(self.path)

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

    def __init__(self, shard_size: int, extra_files: tuple[str, ...] = ()) -> None:
        self.shard_size = shard_size
        self.extra_files = extra_files
        self.path: Path | None = None
        self._writer: ShardedSafetensorsWriter | None = None

    def prepare(self, directory: Path, plan: list[PlannedTensor], attrs: dict[str, Any]) -> None:
        self.path = directory
        specs = _stored_specs(plan)
        self._writer = ShardedSafetensorsWriter(directory, specs, shard_size=self.shard_size)
        self._writer.create()
        self._row_bytes = _row_bytes(specs)
        self._plan = {p.tensor.name: p for p in plan}
        for f in self.extra_files:
            shutil.copyfile(f, directory / Path(f).name)
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
        manifest = {"streamvec": attrs, "tensors": checksums}
        (self.path / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def reopen(self, directory: Path, plan: list[PlannedTensor], attrs: dict[str, Any]) -> None:
        """Continue unfinished shards: same layout, checked header by header."""
        remove_stray_temporaries(directory)
        self.path = directory
        specs = _stored_specs(plan)
        self._writer = ShardedSafetensorsWriter(directory, specs, shard_size=self.shard_size)
        self._writer.reopen()
        self._row_bytes = _row_bytes(specs)
        self._plan = {p.tensor.name: p for p in plan}
