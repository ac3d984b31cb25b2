"""Validating a streamvec Zarr store before any chunk is read, like a safetensors header.

:func:`validate_store` reads the root ``zarr.json`` and every node's own ``zarr.json`` (each a
regular file inside the store, no symlink on the way), and checks, with bounds:

- the root is a format-1 streamvec group with consolidated metadata, equal node for node to
  the metadata each array and group holds itself, with no node on disk that it does not list;
- every array has a data type and codecs from the allow-list of what streamvec writes
  (``bytes`` little-endian, optionally followed by one ``blosc`` codec with lz4 or zstd), a
  regular chunk grid of positive sizes that splits rows only, a declared shape of at most
  :data:`MAX_DIMS` axes and :data:`MAX_ELEMENTS` elements, and one chunk small enough to
  decode within the memory budget;
- tensor names (the ``name`` attr) are unique strings, and array paths are not reserved names;
- every chunk the grid declares is a regular file in the array folder, or is listed in the
  array's ``empty_chunks`` attr (chunks skipped because they were all zero); no other file
  lies among the chunks;
- recorded per-block checksums (``block_xxh3_128``) combine to the tensor's ``xxh3_128``.

Each checked array becomes an :class:`~streamvec.io.zarr.access.ArrayCheck`: what each of its
chunks must be when it is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from streamvec.errors import StoreError
from streamvec.io.zarr.access import (
    BLOCK_DIGESTS_ATTR,
    EMPTY_CHUNKS_ATTR,
    TENSOR_DIGEST_ATTR,
    ArrayCheck,
    ReadPolicy,
    load_zarr,
    open_inside,
    read_policy,
    read_small_file,
)
from streamvec.names import RESERVED_PATHS, decode_array_path
from streamvec.units import format_bytes

# What streamvec writes: float arrays, and bf16 as its uint16 bits (attrs "dtype": "bfloat16").
DATA_TYPES = {"float16": 2, "float32": 4, "float64": 8, "uint16": 2}
BLOSC_CNAMES = ("lz4", "zstd")
BLOSC_SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")
MAX_DIMS = 16
# 2**40 elements: 4 TiB of float32 in one tensor, far beyond any model's largest tensor.
MAX_ELEMENTS = 1 << 40
# Missing chunks an array of a store written before empty chunks were recorded may have (each
# is confirmed through the array's checksum); more is a damaged or hostile store.
MAX_LEGACY_GAPS = 1_000_000


@dataclass(frozen=True)
class ValidatedStore:
    """A store whose metadata passed :func:`validate_store`.

    Attributes:
        path: the store directory.
        attrs: the ``streamvec`` root attrs.
        nodes: every node's metadata by path (as consolidated).
        arrays: the check of every array by path.
    """

    path: Path
    attrs: dict[str, Any]
    nodes: dict[str, dict[str, Any]]
    arrays: dict[str, ArrayCheck]


def _fail(message: str) -> StoreError:
    return StoreError(message)


def _json(root: Path, rel: str) -> Any:
    raw = read_small_file(root, rel)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"{root}: {rel} is not valid JSON ({exc})") from None


def _ints(value: Any, what: str, where: str, *, positive: bool) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise _fail(f"{where}: {what} must be a list of at most {MAX_DIMS} integers, got {value!r}")
    out = []
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int) or d < (1 if positive else 0):
            need = "positive" if positive else "non-negative"
            raise _fail(f"{where}: {what} {value!r} must hold {need} integers")
        out.append(d)
    return tuple(out)


def _codec_name(codec: Any) -> str:
    name = codec.get("name") if isinstance(codec, dict) else codec
    return repr(name)[:60]


def _check_codecs(codecs: Any, where: str) -> bool:
    """True when compressed (bytes + blosc), False for bytes alone; refuses anything else."""
    allowed = "little-endian bytes, then optionally blosc lz4 or zstd"
    if not isinstance(codecs, list) or not 1 <= len(codecs) <= 2:
        shown = [_codec_name(c) for c in codecs][:4] if isinstance(codecs, list) else codecs
        raise _fail(f"{where}: codecs {shown!r} are not ones streamvec writes ({allowed})")
    first = codecs[0]
    if not (
        isinstance(first, dict)
        and first.get("name") == "bytes"
        and (first.get("configuration") or {}).get("endian", "little") == "little"
    ):
        raise _fail(f"{where}: codec {_codec_name(first)} is not one streamvec writes ({allowed})")
    if len(codecs) == 1:
        return False
    second = codecs[1]
    cfg = second.get("configuration") if isinstance(second, dict) else None
    if (
        not isinstance(second, dict)
        or second.get("name") != "blosc"
        or not isinstance(cfg, dict)
        or cfg.get("cname") not in BLOSC_CNAMES
        or cfg.get("shuffle") not in BLOSC_SHUFFLES
        or not isinstance(cfg.get("typesize"), int)
        or not 1 <= cfg["typesize"] <= 8
    ):
        detail = f" {cfg.get('cname')!r}"[:40] if isinstance(cfg, dict) else ""
        raise _fail(
            f"{where}: codec {_codec_name(second)}{detail} is not one streamvec writes ({allowed})"
        )
    return True


def _check_array(
    root: Path, path: str, node: dict[str, Any], label: str, policy: ReadPolicy
) -> ArrayCheck:
    where = f"{root}: array {label!r}"
    if node.get("zarr_format") != 3:
        raise _fail(f"{where}: zarr_format is not 3")
    data_type = node.get("data_type")
    if not isinstance(data_type, str) or data_type not in DATA_TYPES:
        raise _fail(
            f"{where}: data type {data_type!r} is not one streamvec writes "
            f"({', '.join(DATA_TYPES)})"
        )
    attrs = node.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise _fail(f"{where}: attributes are not a JSON object")
    tag = attrs.get("dtype", data_type)
    if tag != data_type and not (tag == "bfloat16" and data_type == "uint16"):
        raise _fail(f"{where}: attrs dtype {tag!r} does not match its data type {data_type!r}")
    shape = _ints(node.get("shape"), "shape", where, positive=False)
    if math.prod(shape) > MAX_ELEMENTS:
        raise _fail(f"{where}: declared shape {list(shape)} exceeds {MAX_ELEMENTS} elements")
    grid = node.get("chunk_grid") or {}
    if not isinstance(grid, dict) or grid.get("name") != "regular":
        raise _fail(f"{where}: chunk grid {grid!r} is not a regular grid")
    chunks = _ints(
        (grid.get("configuration") or {}).get("chunk_shape"), "chunk shape", where, positive=True
    )
    if len(chunks) != len(shape) or (shape and chunks[1:] != tuple(max(1, d) for d in shape[1:])):
        raise _fail(
            f"{where}: chunk shape {list(chunks)} does not split rows of shape {list(shape)} "
            "(streamvec writes whole rows per chunk)"
        )
    key_enc = node.get("chunk_key_encoding")
    if key_enc != {"name": "default", "configuration": {"separator": "/"}}:
        raise _fail(f"{where}: chunk key encoding {key_enc!r} is not the default '/'")
    if node.get("storage_transformers") not in (None, []):
        raise _fail(f"{where}: storage transformers are not supported")
    fill = node.get("fill_value")
    if fill not in (0, 0.0):
        raise _fail(f"{where}: fill value {fill!r} is not 0")
    compressed = _check_codecs(node.get("codecs"), where)
    itemsize = DATA_TYPES[data_type]
    chunk_bytes = math.prod(chunks) * itemsize
    limit = policy.chunk_limit()
    if chunk_bytes > limit:
        raise _fail(
            f"{where}: one chunk decodes to {format_bytes(chunk_bytes)}, more than the "
            f"{format_bytes(limit)} a chunk may take under this memory limit; raise "
            "--memory-limit (chunks may take a quarter of it)"
        )
    rows = shape[0] if shape else 1
    chunk_rows = chunks[0] if shape else 1
    n_chunks = -(-rows // chunk_rows) if math.prod(shape) else 0
    empty = attrs.get(EMPTY_CHUNKS_ATTR)
    if empty is None:
        empty_set: frozenset[int] = frozenset()
    elif isinstance(empty, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_chunks for i in empty
    ):
        empty_set = frozenset(empty)
    else:
        raise _fail(f"{where}: attr {EMPTY_CHUNKS_ATTR} must list chunk indices < {n_chunks}")
    digests = _block_digests(attrs, n_chunks, chunk_rows, where)
    check = ArrayCheck(
        str(root),
        path,
        label,
        shape,
        chunk_rows,
        n_chunks,
        chunk_bytes,
        np.dtype(data_type),
        compressed,
        empty_set,
        digests,
        policy.verify,
        empty is not None,
    )
    gaps = _check_chunk_files(root, check)
    if not gaps:
        return check
    # A store written before empty chunks were recorded skipped all-zero chunks silently. Its
    # gaps are read as zeros only if the whole array then matches its recorded checksum
    # (checked once, on first read: streamvec.io.zarr.chunks), so a deleted chunk that held
    # data is still an error and old stores stay readable.
    recorded, block_rows = attrs.get(TENSOR_DIGEST_ATTR), attrs.get("checksum_block_rows")
    if not isinstance(recorded, str) or not isinstance(block_rows, int) or block_rows < 1:
        raise check.missing(min(gaps))
    return dataclasses.replace(check, empty=frozenset(gaps), legacy_digest=(recorded, block_rows))


def _block_digests(
    attrs: dict[str, Any], n_chunks: int, chunk_rows: int, where: str
) -> tuple[bytes, ...] | None:
    blocks = attrs.get(BLOCK_DIGESTS_ATTR)
    if blocks is None:
        return None
    if (
        not isinstance(blocks, list)
        # An empty tensor has no chunk, and one (empty) block when it was written.
        or (len(blocks) != n_chunks and not (n_chunks == 0 and len(blocks) <= 1))
        or (n_chunks > 1 and attrs.get("checksum_block_rows") != chunk_rows)
    ):
        raise _fail(f"{where}: attr {BLOCK_DIGESTS_ATTR} does not list one digest per chunk")
    try:
        digests = tuple(bytes.fromhex(b) for b in blocks)
    except (TypeError, ValueError):
        raise _fail(f"{where}: attr {BLOCK_DIGESTS_ATTR} holds non-hex digests") from None
    if any(len(d) != 16 for d in digests):
        raise _fail(f"{where}: attr {BLOCK_DIGESTS_ATTR} holds digests that are not 16 bytes")
    if xxhash.xxh3_128_hexdigest(b"".join(digests)) != attrs.get(TENSOR_DIGEST_ATTR):
        raise _fail(
            f"{where}: its block digests do not combine to its recorded {TENSOR_DIGEST_ATTR} "
            "checksum; the metadata was changed: rewrite the store"
        )
    return digests


def _chunk_index(check: ArrayCheck, rel: str) -> int | None:
    """The row-chunk index of a chunk file path (``c/3/0/0``), or None if it is not one."""
    parts = rel.split("/")
    tail = ["0"] * (len(check.shape) - 1)
    if len(parts) != len(check.shape) + 1 or parts[0] != "c" or parts[2:] != tail:
        return None
    index = parts[1]
    if not index.isdigit() or (index != "0" and index.startswith("0")):
        return None
    i = int(index)
    return i if i < check.n_chunks else None


def _check_chunk_files(root: Path, check: ArrayCheck) -> set[int]:
    """Every chunk is a file or recorded empty; nothing else lies among them.

    Work is bounded by the files present, not by the declared grid: a huge declared shape
    with few files is refused at its first missing chunk.

    Returns:
        The missing chunks of an array from a store that predates the record of empty
        chunks (at most ``MAX_LEGACY_GAPS``), for the caller to confirm; else nothing.
    """
    where = check.where()
    found: set[int] = set()
    base = root / check.array_path
    if not check.shape:
        if os.path.lexists(base / "c"):
            os.close(open_inside(root, f"{check.array_path}/c"))
            found.add(0)
    elif os.path.lexists(base / "c"):
        os.close(open_inside(root, f"{check.array_path}/c", directory=True))
        for dirpath, dirnames, filenames in os.walk(base / "c", followlinks=False):
            rel_dir = os.path.relpath(dirpath, base)
            for d in dirnames:
                if os.path.islink(os.path.join(dirpath, d)):
                    raise _fail(f"{where}: {rel_dir}/{d} is a symlink; copy the data in its place")
            for name in filenames:
                rel = f"{rel_dir}/{name}"
                index = _chunk_index(check, rel)
                if index is None:
                    raise _fail(
                        f"{where}: unexpected file {rel} among its chunks (the chunk grid has "
                        f"{check.n_chunks}); remove it or rewrite the store"
                    )
                st = os.lstat(os.path.join(dirpath, name))
                if not stat.S_ISREG(st.st_mode):
                    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                    raise _fail(f"{where}: chunk {rel} is {kind}; a store holds only regular files")
                found.add(index)
    if len(found | check.empty) == check.n_chunks:
        return set()
    if not check.empty_recorded and check.n_chunks - len(found) <= MAX_LEGACY_GAPS:
        return set(range(check.n_chunks)) - found
    # Some chunk is neither a file nor recorded empty: name the first (found within
    # len(found) + len(empty) + 1 steps, whatever the declared grid).
    i = 0
    while i in found or i in check.empty:
        i += 1
    raise check.missing(i)


def _label(node: dict[str, Any], path: str) -> str:
    group, _, leaf = path.rpartition("/")
    if group:
        return f"{decode_array_path(group)} [{leaf}]"
    name = (node.get("attributes") or {}).get("name")
    return name if isinstance(name, str) else decode_array_path(path)


def _comparable(node: Any) -> Any:
    """A node's metadata without the (nested, empty) consolidated view zarr adds to groups."""
    if isinstance(node, dict) and node.get("node_type") == "group":
        return {k: v for k, v in node.items() if k != "consolidated_metadata"}
    return node


def _node_paths_on_disk(root: Path) -> set[str]:
    """Every folder of the store holding a ``zarr.json`` (the nodes), symlinks refused."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = os.path.relpath(dirpath, root)
        if rel != "." and "zarr.json" in filenames:
            found.add(rel.replace(os.sep, "/"))
        for d in list(dirnames):
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                raise _fail(
                    f"{root}: {os.path.relpath(full, root)} is a symlink; a store's folders must "
                    "be inside it (copy the data in place of the link)"
                )
            if d == "c" and rel != ".":
                dirnames.remove(d)  # chunks: checked per array
    return found


def validate_store(
    path: str | os.PathLike[str], policy: ReadPolicy | None = None
) -> ValidatedStore:
    """Check a streamvec store's metadata and chunk files; read no chunk's contents.

    Args:
        path: the store directory.
        policy: how it will be read (default: :func:`read_policy`).

    Returns:
        The :class:`ValidatedStore`, with one :class:`ArrayCheck` per array.

    Raises:
        StoreError: the store is not one streamvec wrote, is unfinished, or is damaged (the
            message names the store, the array and what is wrong).

    Example:
        >>> v = validate_store("tau.zarr")  # doctest: +SKIP
        >>> sorted(v.arrays)[:1]  # doctest: +SKIP
        ['lm_head.weight']
    """
    policy = policy or read_policy()
    load_zarr()
    root = Path(path)
    try:
        doc = _json(root, "zarr.json")
    except FileNotFoundError:
        raise _fail(f"{root}: not a readable Zarr v3 store (no zarr.json)") from None
    except OSError as exc:
        raise _fail(f"{root}: not a readable Zarr v3 store ({exc.strerror})") from None
    if not isinstance(doc, dict) or doc.get("node_type") != "group" or doc.get("zarr_format") != 3:
        raise _fail(f"{root}: zarr.json is not a Zarr v3 group")
    attrs = (doc.get("attributes") or {}).get("streamvec")
    if not isinstance(attrs, dict) or attrs.get("format") != 1:
        raise _fail(
            f"{root}: a Zarr store, but not one written by streamvec (format 1 attrs missing)"
        )
    meta = (doc.get("consolidated_metadata") or {}).get("metadata")
    if not isinstance(meta, dict):
        raise _fail(f"{root}: store metadata is not consolidated (unfinished store?)")
    arrays: dict[str, ArrayCheck] = {}
    names: dict[str, str] = {}
    for node_path, node in meta.items():
        if not isinstance(node_path, str) or not isinstance(node, dict):
            raise _fail(f"{root}: consolidated metadata entry {node_path!r} is not a node")
        parts = node_path.split("/")
        if len(parts) > 2 or any(p in ("", ".", "..") or p in RESERVED_PATHS for p in parts):
            raise _fail(f"{root}: node path {node_path!r} is not one streamvec writes")
        label = _label(node, node_path)
        try:
            own = _json(root, f"{node_path}/zarr.json")
        except FileNotFoundError:
            raise _fail(
                f"{root}: array {label!r} is listed in the metadata but {node_path}/zarr.json is "
                "missing (deleted?); the store is damaged: rewrite it"
            ) from None
        if _comparable(own) != _comparable(node):
            raise _fail(
                f"{root}: {node_path}/zarr.json differs from the store's consolidated metadata "
                f"for {label!r}; the store was changed after it was written: rewrite it"
            )
        kind = node.get("node_type")
        if len(parts) == 2:
            parent = meta.get(parts[0])
            if (
                kind != "array"
                or not isinstance(parent, dict)
                or parent.get("node_type") != "group"
            ):
                raise _fail(f"{root}: node {node_path!r} is not one streamvec writes")
        if len(parts) == 1:
            name = (node.get("attributes") or {}).get("name")
            if name is not None and (not isinstance(name, str) or not name):
                raise _fail(f"{root}: {node_path}: attr name {name!r} is not a tensor name")
            name = name or label
            if name in names:
                raise _fail(
                    f"{root}: arrays {names[name]!r} and {node_path!r} both hold tensor {name!r}; "
                    "a store holds each tensor once"
                )
            names[name] = node_path
        if kind == "array":
            arrays[node_path] = _check_array(root, node_path, node, label, policy)
        elif kind != "group":
            raise _fail(f"{root}: node {node_path!r} has node_type {kind!r}")
    unlisted = sorted(_node_paths_on_disk(root) - set(meta))
    if unlisted:
        raise _fail(
            f"{root}: {unlisted[0]} is on disk but not in the consolidated metadata (the store "
            "was changed after it was written); rewrite it"
        )
    if attrs.get("kind") == "svd":
        _check_svd_layout(root, meta, arrays)
    return ValidatedStore(root, attrs, meta, arrays)


# The factors of each factored tensor of an SVD store: (name, axes, data type).
SVD_FACTORS = (("U", 2, "float32"), ("S", 1, "float64"), ("Vh", 2, "float32"))


def _check_svd_layout(root: Path, meta: dict[str, Any], arrays: dict[str, ArrayCheck]) -> None:
    """Each group of an SVD store holds exactly its U, S and Vh factors, of fitting shapes."""
    for node_path, node in meta.items():
        if "/" in node_path:
            if node_path.rpartition("/")[2] not in {f for f, _, _ in SVD_FACTORS}:
                raise _fail(f"{root}: node {node_path!r} is not a factor (U, S or Vh)")
            continue
        if node.get("node_type") != "group":
            continue
        name = _label(node, node_path)
        shapes = []
        for f, ndim, kind in SVD_FACTORS:
            check = arrays.get(f"{node_path}/{f}")
            if check is None:
                raise _fail(f"{root}: tensor {name!r} lacks its {f} factor; rewrite the store")
            if len(check.shape) != ndim or check.dtype != np.dtype(kind):
                raise _fail(
                    f"{root}: tensor {name!r} factor {f} is {check.dtype} {list(check.shape)}; "
                    f"expected {ndim}-d {kind}"
                )
            shapes.append(check.shape)
        (_, k), (k2,), (k3, _) = shapes
        if not k == k2 == k3:
            raise _fail(
                f"{root}: tensor {name!r} factors U {shapes[0]}, S {shapes[1]}, Vh {shapes[2]} "
                "disagree on the rank"
            )


def array_check(store: str, array_path: str, policy: ReadPolicy | None = None) -> ArrayCheck:
    """The :class:`ArrayCheck` of one array from its own metadata (no consolidated view).

    For readers made without a validated store; :func:`validate_store` checks more.
    """
    root = Path(store)
    try:
        node = _json(root, f"{array_path}/zarr.json")
    except FileNotFoundError:
        raise _fail(f"{root}: array {array_path!r} is missing ({array_path}/zarr.json)") from None
    if not isinstance(node, dict) or node.get("node_type") != "array":
        raise _fail(f"{root}: {array_path} is not an array")
    return _check_array(root, array_path, node, _label(node, array_path), policy or read_policy())
