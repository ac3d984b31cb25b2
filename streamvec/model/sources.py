"""Open checkpoints and stores as lazy models (headers and metadata only, no tensor bytes)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from streamvec.errors import InputNotFoundError, StoreError
from streamvec.io.blocks import BlockReader, SafetensorsReader, file_stamp
from streamvec.io.fingerprint import fingerprint_files
from streamvec.io.safetensors.checkpoint import CheckpointFiles, resolve_checkpoint
from streamvec.io.safetensors.quantized import quantized_tensors
from streamvec.io.zarr.store import is_zarr_store, read_store
from streamvec.model.algebra import Source, SourceModel, SourceTensor
from streamvec.model.ties import TieRules

# Store kinds usable as task-vector terms: dense task vectors, and SVD stores, whose factored
# tensors read back as U S Vh (see streamvec.io.zarr.lowrank).
VECTOR_KINDS = ("task_vector", "svd")


def checkpoint_source(files: CheckpointFiles, label: str) -> Source:
    """A checkpoint as a point :class:`Source`.

    FP8 weights with scales read as float32 (dequantized, see :mod:`streamvec.io.safetensors.fp8`)
    and
    their scale tensors are not tensors of the source: they are never operands. Quantized
    formats streamvec cannot dequantize are refused here.
    """
    # The version of each shard whose header was parsed: a block read from another version
    # (replaced, truncated, rewritten during the run) is an error, never mixed in.
    stamps = {p: file_stamp(p.stat()) for p in files.shards}
    fp8, scales, quant = quantized_tensors(files.root, files.tensors, label, stamps)
    tensors: dict[str, SourceTensor] = {}
    for t in files.tensors.values():
        if t.name in scales:
            continue
        reader: BlockReader = fp8.get(t.name) or SafetensorsReader(
            str(t.path), t.offset, t.shape, t.dtype, stamps.get(t.path)
        )
        tensors[t.name] = SourceTensor(t.name, t.shape, reader.dtype, reader)
    info: dict[str, object] = {
        "path": label,
        "kind": "checkpoint",
        "fingerprint": fingerprint_files(list(files.shards)),
        "bytes": files.total_bytes,
    }
    if quant.method or fp8:
        info["quantization"] = quant.method or "fp8"
    extra = tuple(str(p) for p in files.extra_files())
    key = str(
        files.shards[0].resolve().parent if len(files.shards) > 1 else files.shards[0].resolve()
    )
    return Source(label, True, key, tensors, info, extra, TieRules(files.root), files.stem)


def store_source(path: Path, label: str) -> Source:
    """A task-vector :class:`Source` for a streamvec Zarr store.

    A ``task_vector`` store reads its arrays as they are. An ``svd`` store (written by
    ``streamvec svd``, or the shared components of ``streamvec decompose``) reads each
    factored tensor as rows of ``U @ diag(S) @ Vh`` (float32, computed in float64) and each
    dense tensor as it is, so a low-rank approximation is a term like any task vector.

    Args:
        path: the store directory.
        label: the path as the user wrote it (messages and provenance).

    Returns:
        A non-point source (a vector, not a model).

    Raises:
        StoreError: the store is of another kind or damaged.

    Example:
        >>> src = store_source(Path("tau-r64.zarr"), "tau-r64.zarr")  # doctest: +SKIP
        >>> src.tensors["model.layers.0.self_attn.q_proj.weight"].reader  # doctest: +SKIP
        LowRankReader(store='tau-r64.zarr', ...)
    """
    store = read_store(path)
    if store.kind not in VECTOR_KINDS:
        raise StoreError(
            f"{path}: a {store.kind!r} store cannot be used as a term here (expected one of "
            f"{', '.join(VECTOR_KINDS)})"
        )
    if store.kind == "svd":
        from streamvec.io.zarr.lowrank import read_svd_store

        entries = read_svd_store(path).entries.values()
        tensors = {e.name: SourceTensor(e.name, e.shape, e.dtype, e.reader(path)) for e in entries}
    else:
        tensors = {
            a.name: SourceTensor(a.name, a.shape, a.dtype, a.reader(path))
            for a in store.arrays.values()
        }
    info = {
        "path": label,
        "kind": store.kind,
        "fingerprint": fingerprint_files([path / "zarr.json"]),
    }
    return Source(label, False, str(path.resolve()), tensors, info)


def open_source(
    path: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    strict: bool = False,
) -> Source:
    """A :class:`Source` for a checkpoint, a streamvec Zarr store or a PEFT LoRA adapter.

    Args:
        path: the input.
        base: for an adapter, the base checkpoint whose tensor names (and model class) its
            module names map to; without it the adapter's recorded local base is used, or
            module names are taken as checkpoint names. Ignored for other inputs.
        strict: for an adapter, a base other than its recorded local one is an error.

        A path that does not exist but reads as a Hugging Face model id (``org/name`` or
        ``org/name@revision``) is resolved through ``huggingface_hub`` (see
        :mod:`streamvec.io.hub`); an existing local path always wins.
    """
    p = Path(path)
    if not p.exists():
        from streamvec.io.hub import parse_hub_id, resolve_hub_id

        if parse_hub_id(str(path)) is None:
            raise InputNotFoundError(f"{p}: no such file or directory")
        snap = resolve_hub_id(str(path))
        source = checkpoint_source(resolve_checkpoint(snap.path), str(path))
        info = {**source.info, "hub_id": snap.repo_id, "revision": snap.commit}
        return replace(source, info=info)
    if is_zarr_store(p):
        return store_source(p, str(path))
    from streamvec.model.peft_source import adapter_source, is_adapter_dir, recorded_local_base

    if is_adapter_dir(p):
        if base is None:
            # Without --base, the adapter's recorded base, if it is here, names its modules.
            recorded = recorded_local_base(p)
            if recorded is None:
                return adapter_source(p, str(path), strict=strict)
            return adapter_source(p, str(path), open_source(recorded), recorded, strict=strict)
        base_src = open_source(base)  # a local path or a Hub id
        root = Path(base_src.key)
        return adapter_source(
            p, str(path), base_src, root if root.is_dir() else root.parent, strict=strict
        )
    return checkpoint_source(resolve_checkpoint(p), str(path))


def open(  # noqa: A001 - mirrors the builtin on purpose: sv.open(path)
    path: str | os.PathLike[str],
    *,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    strict: bool = False,
) -> SourceModel:
    """Open a checkpoint or a task-vector store as a lazy model. Reads headers only.

    Args:
        path: a safetensors checkpoint (HF sharded directory, one-file directory or file) or
            a Zarr store written by streamvec.
        include: only tensors matching these globs (or ``re:`` regexes).
        exclude: leave out tensors matching these.
        base: when ``path`` is a PEFT LoRA adapter folder, its base checkpoint (names map
            through the base's loaded module tree; tensors it saves whole are taken relative
            to it). Ignored for other inputs.
        strict: with an adapter, a base other than the adapter's recorded local base is an
            error instead of a warning.

    Returns:
        A lazy mapping of tensor name to :class:`~streamvec.model.tensor.LazyTensor` that supports
        ``+``, ``-``, scalar ``*``, ``.filter()`` and ``.save()``.

    Example:
        >>> import streamvec as sv
        >>> tau = sv.open("llama-ft") - sv.open("llama-base")  # doctest: +SKIP
        >>> tau.save("tau.zarr")  # doctest: +SKIP
        >>> lora = sv.open("my-lora", base="llama-base")  # doctest: +SKIP
        >>> (sv.open("llama-base") + 0.5 * lora).save("edited")  # doctest: +SKIP
    """
    model = SourceModel(open_source(path, base=base, strict=strict))
    if include or exclude:
        return model.filter(include, exclude)  # type: ignore[return-value]
    return model
