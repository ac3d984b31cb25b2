"""A corpus of damaged or hostile Zarr stores, each made from a copy of a valid one.

Each entry is ``(id, damage, fragment, kind, when)``: ``damage(store)`` changes the copy at
``store`` in place (and may make files next to it); ``fragment`` must appear in the one-line
error; ``kind`` says which valid store it starts from: ``"tv"`` (a task-vector store),
``"raw"`` (the same, uncompressed) or ``"svd"`` (an SVD store); ``when`` is ``"open"`` for
damage found when the store is opened (metadata, chunk files listed) and ``"read"`` for damage
found only when the chunk is read (so ``info``, which reads no chunk, passes), ``"budget"`` for
damage found against ``--memory-limit 400MB``. The damaged tensor is
:data:`TARGET` (its factor ``U`` in an SVD store).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TARGET = "model.w"
TENSORS = {
    TARGET: np.arange(48, dtype=np.float32).reshape(8, 6) / 7,
    "model.v": np.linspace(-1, 1, 40, dtype=np.float32).reshape(10, 4),
    "model.b": np.ones(6, np.float32),
}


def root_doc(store: Path) -> dict[str, Any]:
    return json.loads((store / "zarr.json").read_text())


def target_path(store: Path) -> str:
    """The array path of the damaged array (``TARGET``, or its ``U`` in an SVD store)."""
    meta = root_doc(store)["consolidated_metadata"]["metadata"]
    return f"{TARGET}/U" if f"{TARGET}/U" in meta else TARGET


def edit_node(
    store: Path,
    path: str,
    change: Callable[[dict[str, Any]], None],
    *,
    consolidated: bool = True,
    own: bool = True,
) -> None:
    """Apply ``change`` to a node's metadata: its own zarr.json and/or the consolidated copy."""
    if own:
        file = store / path / "zarr.json"
        node = json.loads(file.read_text())
        change(node)
        file.write_text(json.dumps(node))
    if consolidated:
        doc = root_doc(store)
        change(doc["consolidated_metadata"]["metadata"][path])
        (store / "zarr.json").write_text(json.dumps(doc))


def _edit(change: Callable[[dict[str, Any]], None], **kw: bool) -> Callable[[Path], None]:
    def damage(store: Path) -> None:
        edit_node(store, target_path(store), change, **kw)

    return damage


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(node: dict[str, Any]) -> None:
        node[key] = value

    return change


def _chunks(value: list[int]) -> Callable[[dict[str, Any]], None]:
    def change(node: dict[str, Any]) -> None:
        node["chunk_grid"]["configuration"]["chunk_shape"] = value

    return change


def _codec(codec: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def change(node: dict[str, Any]) -> None:
        node["codecs"] = [node["codecs"][0], codec]

    return change


def _attr(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(node: dict[str, Any]) -> None:
        node["attributes"][key] = value

    return change


def first_chunk(store: Path) -> Path:
    return store / target_path(store) / "c" / "0" / "0"


def _delete_chunk(store: Path) -> None:
    first_chunk(store).unlink()


def _randomize_chunk(store: Path) -> None:
    chunk = first_chunk(store)
    rng = np.random.default_rng(5)
    chunk.write_bytes(rng.bytes(chunk.stat().st_size))


def _truncate_chunk(store: Path) -> None:
    chunk = first_chunk(store)
    chunk.write_bytes(chunk.read_bytes()[:-5])


def _inflating_chunk(store: Path) -> None:
    # A blosc chunk whose header declares 1 GiB: decompressing it would take the memory.
    chunk = first_chunk(store)
    raw = bytearray(chunk.read_bytes())
    raw[4:8] = struct.pack("<I", 1 << 30)
    chunk.write_bytes(bytes(raw))


def _symlink_chunk(store: Path) -> None:
    chunk = first_chunk(store)
    outside = store.parent / f"{store.name}-outside.bin"
    outside.write_bytes(chunk.read_bytes())
    chunk.unlink()
    os.symlink(outside, chunk)


def _dev_zero_chunk(store: Path) -> None:
    chunk = first_chunk(store)
    chunk.unlink()
    os.symlink("/dev/zero", chunk)


def _fifo_chunk(store: Path) -> None:
    chunk = first_chunk(store)
    chunk.unlink()
    os.mkfifo(chunk)


def _symlink_array(store: Path) -> None:
    folder = store / TARGET
    outside = store.parent / f"{store.name}-outside-array"
    folder.rename(outside)
    os.symlink(outside, folder)


def _delete_array(store: Path) -> None:
    import shutil

    shutil.rmtree(store / TARGET)


def _missing_factor(store: Path) -> None:
    import shutil

    shutil.rmtree(store / TARGET / "U")
    doc = root_doc(store)
    del doc["consolidated_metadata"]["metadata"][f"{TARGET}/U"]
    (store / "zarr.json").write_text(json.dumps(doc))


def _duplicate_name(store: Path) -> None:
    def change(node: dict[str, Any]) -> None:
        node["attributes"]["name"] = "model.v"

    edit_node(store, "model.b", change)


def _reserved_path(store: Path) -> None:
    doc = root_doc(store)
    meta = doc["consolidated_metadata"]["metadata"]
    meta["zarr.json"] = meta.pop("model.b")
    (store / "zarr.json").write_text(json.dumps(doc))


def _unlisted_array(store: Path) -> None:
    import shutil

    shutil.copytree(store / "model.b", store / "model.extra")


def _extra_chunk_file(store: Path) -> None:
    (store / target_path(store) / "c" / "99").mkdir()
    (store / target_path(store) / "c" / "99" / "0").write_bytes(b"\0" * 16)


def _root_not_json(store: Path) -> None:
    (store / "zarr.json").write_bytes(b"\xff{not json")


def _not_consolidated(store: Path) -> None:
    doc = root_doc(store)
    del doc["consolidated_metadata"]
    (store / "zarr.json").write_text(json.dumps(doc))


def _huge_chunk(store: Path) -> None:
    """A declared 1 GiB chunk (one zero-filled chunk would inflate to it)."""

    def change(node: dict[str, Any]) -> None:
        node["shape"] = [16384, 16384]
        node["chunk_grid"]["configuration"]["chunk_shape"] = [16384, 16384]
        node["attributes"].pop("block_xxh3_128", None)
        node["attributes"]["empty_chunks"] = [0]

    edit_node(store, target_path(store), change)


def _many_chunks(store: Path) -> None:
    """A billion declared chunks and one file: refused at the first missing, not by a scan."""

    def change(node: dict[str, Any]) -> None:
        node["shape"] = [10**9, 6]
        node["chunk_grid"]["configuration"]["chunk_shape"] = [1, 6]
        node["attributes"].pop("block_xxh3_128", None)
        node["attributes"]["empty_chunks"] = []

    edit_node(store, target_path(store), change)


def _digest_mismatch(store: Path) -> None:
    def change(node: dict[str, Any]) -> None:
        node["attributes"]["xxh3_128"] = "0" * 32

    edit_node(store, target_path(store), change)


CORPUS: list[tuple[str, Callable[[Path], None], str, str, str]] = [
    ("dtype-int32", _edit(_set("data_type", "int32")), "data type 'int32'", "tv", "open"),
    ("dtype-unknown", _edit(_set("data_type", "float7")), "data type 'float7'", "tv", "open"),
    ("dtype-attr-mismatch", _edit(_attr("dtype", "float16")), "does not match", "tv", "open"),
    (
        "codec-gzip",
        _edit(_codec({"name": "gzip", "configuration": {"level": 1}})),
        "'gzip'",
        "tv",
        "open",
    ),
    ("codec-unknown", _edit(_codec({"name": "frob"})), "'frob'", "tv", "open"),
    (
        "codec-blosc-cname",
        _edit(
            _codec(
                {
                    "name": "blosc",
                    "configuration": {
                        "cname": "snappy",
                        "typesize": 4,
                        "shuffle": "shuffle",
                        "clevel": 1,
                    },
                }
            )
        ),
        "not one streamvec writes",
        "tv",
        "open",
    ),
    ("chunk-zero", _edit(_chunks([0, 6])), "positive", "tv", "open"),
    ("chunk-negative", _edit(_chunks([-4, 6])), "positive", "tv", "open"),
    ("chunk-splits-columns", _edit(_chunks([4, 3])), "does not split rows", "tv", "open"),
    ("shape-huge", _edit(_set("shape", [2**40, 2**40])), "exceeds", "tv", "open"),
    ("shape-negative", _edit(_set("shape", [-8, 6])), "non-negative", "tv", "open"),
    ("shape-not-list", _edit(_set("shape", "8x6")), "shape must be", "tv", "open"),
    ("shape-billion-chunks", _many_chunks, "chunk c/1/0 is missing", "tv", "open"),
    ("chunk-declares-1GiB", _huge_chunk, "--memory-limit", "tv", "budget"),
    (
        "metadata-disagree",
        _edit(_set("shape", [4, 12]), consolidated=False),
        "differs",
        "tv",
        "open",
    ),
    ("consolidated-only", _edit(_attr("name", "x"), own=False), "differs", "tv", "open"),
    ("array-deleted", _delete_array, "missing", "tv", "open"),
    ("array-unlisted", _unlisted_array, "not in the consolidated", "tv", "open"),
    ("name-duplicate", _duplicate_name, "both hold tensor 'model.v'", "tv", "open"),
    ("name-reserved-path", _reserved_path, "'zarr.json'", "tv", "open"),
    ("root-not-json", _root_not_json, "not valid JSON", "tv", "open"),
    ("not-consolidated", _not_consolidated, "not consolidated", "tv", "open"),
    ("digest-mismatch", _digest_mismatch, "do not combine", "tv", "open"),
    ("chunk-deleted", _delete_chunk, "is missing", "tv", "open"),
    ("chunk-extra-file", _extra_chunk_file, "unexpected file", "tv", "open"),
    ("chunk-symlink", _symlink_chunk, "symlink", "tv", "open"),
    ("chunk-dev-zero", _dev_zero_chunk, "symlink", "tv", "open"),
    ("chunk-fifo", _fifo_chunk, "not a regular file", "tv", "open"),
    ("array-symlink", _symlink_array, "symlink", "tv", "open"),
    ("chunk-truncated", _truncate_chunk, "declares", "tv", "read"),
    ("chunk-inflating", _inflating_chunk, "declares 1073741824 bytes", "tv", "read"),
    ("chunk-random-raw", _randomize_chunk, "recorded checksum", "raw", "read"),
    ("chunk-random-blosc", _randomize_chunk, "declares", "tv", "read"),
    ("raw-chunk-truncated", _truncate_chunk, "not the 192 of an uncompressed", "raw", "read"),
    ("svd-missing-factor", _missing_factor, "lacks its U factor", "svd", "open"),
    (
        "svd-factor-dtype",
        _edit(_set("data_type", "float16")),
        "expected 2-d float32",
        "svd",
        "open",
    ),
    ("svd-chunk-random", _randomize_chunk, "declares", "svd", "read"),
    ("svd-chunk-deleted", _delete_chunk, "is missing", "svd", "open"),
]
