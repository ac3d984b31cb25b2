"""A corpus of hostile or broken checkpoints, each built on demand in a temporary directory.

Each entry is ``(id, build, fragment)``: ``build(dir)`` makes the bad checkpoint inside ``dir``
and returns the path to hand to a command; ``fragment`` must appear in the one-line error.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.numpy

GOOD = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}


def _valid(d: Path, name: str = "model.safetensors") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(GOOD, str(d / name))
    return d


def _raw(d: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if length is None else length
    (d / "model.safetensors").write_bytes(struct.pack("<Q", n) + body + data)
    return d


def _entry(dtype: str = "F32", shape: object = (3, 4), offsets: object = (0, 48)) -> dict:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


def _sharded(d: Path, weight_map: dict, extra: Callable[[Path], None] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file({"w": GOOD["w"]}, str(d / "s1.safetensors"))
    safetensors.numpy.save_file({"b": GOOD["b"]}, str(d / "s2.safetensors"))
    if extra:
        extra(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


def _truncate(d: Path) -> Path:
    _valid(d)
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-7])
    return d


def _sparse_huge_header(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", 10**12))
        f.truncate(10**6)
    return d


def _symlink_escape(d: Path) -> Path:
    outside = d.parent / f"{d.name}-outside.safetensors"
    safetensors.numpy.save_file({"w": GOOD["w"]}, str(outside))

    def link(dd: Path) -> None:
        os.symlink(outside, dd / "link.safetensors")

    return _sharded(d, {"w": "link.safetensors", "b": "s2.safetensors"}, link)


def _file(content: bytes, name: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(content)
        return d

    return build


CORPUS: list[tuple[str, Callable[[Path], Path], str]] = [
    ("zero-length", _file(b"", "model.safetensors"), "too short"),
    ("four-bytes", _file(b"\1\2\3\4", "model.safetensors"), "too short"),
    ("header-beyond-file", lambda d: _raw(d, {"w": _entry()}, b"\0" * 48, 5000), "beyond the file"),
    ("absurd-header-length", _sparse_huge_header, "beyond the file"),
    ("header-not-json", lambda d: _raw(d, b"{nope"), "not valid UTF-8 JSON"),
    ("header-not-utf8", lambda d: _raw(d, b"\xff\xfe\xfd"), "not valid UTF-8 JSON"),
    ("header-json-array", lambda d: _raw(d, [1, 2, 3]), "not a JSON object"),
    ("header-json-string", lambda d: _raw(d, "hello"), "not a JSON object"),
    ("unknown-dtype", lambda d: _raw(d, {"w": _entry("F7")}, b"\0" * 48), "unknown dtype"),
    ("negative-shape", lambda d: _raw(d, {"w": _entry(shape=(-3, 4))}, b"\0" * 48), "negative"),
    (
        "overflowing-shape",
        lambda d: _raw(d, {"w": _entry(shape=(2**62, 2**62))}, b"\0" * 48),
        "needs",
    ),
    ("float-shape", lambda d: _raw(d, {"w": _entry(shape=[3.0, 4])}, b"\0" * 48), "non-integer"),
    ("shape-not-list", lambda d: _raw(d, {"w": _entry(shape=12)}, b"\0" * 48), "shape must be"),
    ("offsets-past-end", lambda d: _raw(d, {"w": _entry()}, b"\0" * 40), "truncated"),
    (
        "offsets-size-mismatch",
        lambda d: _raw(d, {"w": _entry(offsets=(0, 40))}, b"\0" * 40),
        "needs 48",
    ),
    ("offsets-reversed", lambda d: _raw(d, {"w": _entry(offsets=(48, 0))}, b"\0" * 48), "span"),
    (
        "offsets-not-ints",
        lambda d: _raw(d, {"w": _entry(offsets=["0", "48"])}, b"\0" * 48),
        "data_offsets",
    ),
    (
        "overlapping",
        lambda d: _raw(
            d,
            {"a": _entry(shape=(2,), offsets=(0, 8)), "b": _entry(shape=(2,), offsets=(4, 12))},
            b"\0" * 12,
        ),
        "overlaps",
    ),
    (
        "gap",
        lambda d: _raw(
            d,
            {"a": _entry(shape=(1,), offsets=(0, 4)), "b": _entry(shape=(1,), offsets=(8, 12))},
            b"\0" * 12,
        ),
        "gap",
    ),
    (
        "duplicate-names",
        lambda d: _raw(
            d,
            b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
            b"\0" * 8,
        ),
        "duplicate key",
    ),
    ("trailing-bytes", lambda d: _raw(d, {"w": _entry()}, b"\0" * 60), "trailing"),
    ("truncated-valid-file", _truncate, "truncated"),
    (
        "metadata-not-strings",
        lambda d: _raw(d, {"__metadata__": {"a": 1}, "w": _entry()}, b"\0" * 48),
        "__metadata__",
    ),
    (
        "missing-field",
        lambda d: _raw(d, {"w": {"dtype": "F32", "shape": [3, 4]}}, b"\0" * 48),
        "missing field",
    ),
    ("empty-name", lambda d: _raw(d, {"": _entry()}, b"\0" * 48), "empty name"),
    (
        "index-not-json",
        lambda d: _sharded(d, {}) and _file(b"{oops", "model.safetensors.index.json")(d),
        "not valid JSON",
    ),
    (
        "index-no-weight-map",
        lambda d: _sharded(d, {}) and _file(b'{"metadata": {}}', "model.safetensors.index.json")(d),
        "weight_map",
    ),
    (
        "index-missing-shard",
        lambda d: _sharded(d, {"w": "s1.safetensors", "b": "s9.safetensors"}),
        "does not exist",
    ),
    (
        "index-dotdot",
        lambda d: _sharded(d, {"w": "../s1.safetensors", "b": "s2.safetensors"}),
        "outside the checkpoint",
    ),
    (
        "index-absolute",
        lambda d: _sharded(d, {"w": "/etc/hostname", "b": "s2.safetensors"}),
        "outside the checkpoint",
    ),
    ("index-symlink-escape", _symlink_escape, "resolves outside"),
    (
        "index-tensor-not-in-shard",
        lambda d: _sharded(d, {"w": "s2.safetensors", "b": "s2.safetensors"}),
        "lacks tensor",
    ),
    (
        "index-value-not-string",
        lambda d: _sharded(d, {"w": 7, "b": "s2.safetensors"}),
        "shard file names",
    ),
    ("empty-directory", lambda d: d.mkdir(parents=True) or d, "no .safetensors"),
    ("pickle-only", _file(b"\x80\x04fake", "pytorch_model.bin"), "pickle"),
    ("pickle-file", lambda d: _file(b"\x80\x04fake", "model.pt")(d) / "model.pt", "pickle"),
    (
        "two-files-no-index",
        lambda d: _valid(d, "a.safetensors") and _valid(d, "b.safetensors"),
        "no model.safetensors.index.json",
    ),
    ("does-not-exist", lambda d: d / "nothing-here", "no such file"),
]
