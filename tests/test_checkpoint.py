"""Resolving checkpoints: HF sharded directories, one-file directories, files; refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from streamvec.errors import CheckpointError, InputNotFoundError
from streamvec.io.safetensors.checkpoint import INDEX_NAME, resolve_checkpoint


def sharded(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    safetensors.numpy.save_file({"a": np.zeros(3, np.float32)}, str(d / "s1.safetensors"))
    safetensors.numpy.save_file({"b": np.ones((2, 2), np.float32)}, str(d / "s2.safetensors"))
    index = {
        "metadata": {"total_size": 28},
        "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"},
    }
    (d / INDEX_NAME).write_text(json.dumps(index))
    return d


def set_map(d: Path, weight_map: dict[str, str]) -> None:
    (d / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_directory(tmp_path: Path) -> None:
    files = resolve_checkpoint(sharded(tmp_path))
    assert list(files.tensors) == ["a", "b"]
    assert [s.name for s in files.shards] == ["s1.safetensors", "s2.safetensors"]
    assert files.total_bytes == 28


def test_single_file_and_one_file_directory(tmp_path: Path) -> None:
    d = tmp_path / "one"
    d.mkdir()
    safetensors.numpy.save_file({"w": np.zeros(4, np.float16)}, str(d / "model.safetensors"))
    assert list(resolve_checkpoint(d).tensors) == ["w"]
    assert list(resolve_checkpoint(d / "model.safetensors").tensors) == ["w"]


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ({"a": "../s1.safetensors", "b": "s2.safetensors"}, "outside the checkpoint"),
        ({"a": "/etc/passwd", "b": "s2.safetensors"}, "outside the checkpoint"),
        ({"a": "nope.safetensors", "b": "s2.safetensors"}, "does not exist"),
        ({"a": "s2.safetensors", "b": "s2.safetensors"}, "lacks tensor"),
        ({"a": 3, "b": "s2.safetensors"}, "shard file names"),
    ],
)
def test_bad_index(tmp_path: Path, weight_map: dict, message: str) -> None:
    d = sharded(tmp_path)
    set_map(d, weight_map)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(d)


def test_shard_with_tensors_the_index_does_not_list(tmp_path: Path) -> None:
    # transformers loads every tensor of every listed shard, listed or not: so does streamvec.
    d = sharded(tmp_path)
    two = {"a": np.zeros(3, np.float32), "x": np.zeros(1, np.float32)}
    safetensors.numpy.save_file(two, str(d / "s1.safetensors"))
    assert sorted(resolve_checkpoint(d).tensors) == ["a", "b", "x"]


def test_index_symlink_escape(tmp_path: Path) -> None:
    d = sharded(tmp_path)
    outside = tmp_path / "outside.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(3, np.float32)}, str(outside))
    os.symlink(outside, d / "link.safetensors")
    set_map(d, {"a": "link.safetensors", "b": "s2.safetensors"})
    with pytest.raises(CheckpointError, match="resolves outside"):
        resolve_checkpoint(d)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"weight_map": {}}', '{"weight_map": 5}'])
def test_index_not_usable(tmp_path: Path, text: str) -> None:
    d = sharded(tmp_path)
    (d / INDEX_NAME).write_text(text)
    with pytest.raises(CheckpointError):
        resolve_checkpoint(d)


def test_pickles_are_refused_with_how_to_convert(tmp_path: Path) -> None:
    d = tmp_path / "old"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="never loaded.*save_pretrained"):
        resolve_checkpoint(d)
    with pytest.raises(CheckpointError, match="never loaded"):
        resolve_checkpoint(d / "pytorch_model.bin")


def test_empty_and_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no .safetensors"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(InputNotFoundError):
        resolve_checkpoint(tmp_path / "absent")


def test_several_files_without_index(tmp_path: Path) -> None:
    for n in ("x", "y"):
        safetensors.numpy.save_file(
            {n: np.zeros(1, np.float32)}, str(tmp_path / f"{n}.safetensors")
        )
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        resolve_checkpoint(tmp_path)
