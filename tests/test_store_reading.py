"""Regression tests for reading and verifying stores: reserved names, verify's blind spots,
the codec registry race, and the chunk checks against an independent reference (zarr)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

import streamvec as sv
from streamvec.names import decode_array_path, encode_array_path

from .conftest import run_cli, run_cli_subprocess, write_checkpoint

RESERVED = ["zarr.json", "c", ".zattrs", ".zgroup", ".zarray", ".zmetadata", "__x", ".."]


def test_reserved_names_are_encoded_and_read_back(tmp_path: Path) -> None:
    """A checkpoint tensor named ``zarr.json`` crashed ``diff`` with an internal error."""
    rng = np.random.default_rng(0)
    ft = {name: rng.standard_normal((3, 2)).astype(np.float32) for name in RESERVED}
    base = write_checkpoint(tmp_path / "base", {k: np.zeros_like(v) for k, v in ft.items()})
    fine = write_checkpoint(tmp_path / "ft", ft)
    out = tmp_path / "tau.zarr"
    assert run_cli("diff", base, fine, "-o", out, "-q") == 0
    tau = sv.open(out)
    assert set(tau) == set(RESERVED)
    for name, want in ft.items():
        path = encode_array_path(name)
        assert decode_array_path(path) == name
        arr = zarr.open_array(str(out), path=path, mode="r")  # the real library reads it
        assert arr.attrs["name"] == name
        np.testing.assert_array_equal(arr[...], want)
        np.testing.assert_array_equal(tau[name].compute(), want)
    assert run_cli("verify", out, "-q") == 0


@pytest.fixture()
def bf16_output(tmp_path: Path) -> Path:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    base, ft = tmp_path / "base", tmp_path / "ft"
    for d, seed in ((base, 0), (ft, 1)):
        d.mkdir()
        g = torch.Generator().manual_seed(seed)
        tensors = {"w": torch.randn(6, 4, generator=g).bfloat16(), "b": torch.ones(4).bfloat16()}
        save_file(tensors, str(d / "model.safetensors"))
    out = tmp_path / "edited"
    assert run_cli("combine", "--base", base, "-o", out, "-q", ft) == 0
    assert run_cli("verify", out, "-q") == 0
    return out


def test_verify_fails_when_a_header_dtype_changes(bf16_output: Path) -> None:
    shard = next(bf16_output.glob("*.safetensors"))
    raw = shard.read_bytes()
    assert raw.count(b'"BF16"') == 2
    # Same header length (JSON allows the space): only the dtype of one tensor changes.
    shard.write_bytes(raw.replace(b'"BF16"', b'"F16" ', 1))
    proc = run_cli_subprocess("verify", bf16_output)
    assert proc.returncode == 2, proc.stderr
    assert "dtype 'float16' in its header, 'bfloat16' recorded" in proc.stderr


def test_verify_fails_when_a_shard_is_added(bf16_output: Path) -> None:
    shard = next(bf16_output.glob("*.safetensors"))
    shutil.copy(shard, bf16_output / "model-extra.safetensors")
    proc = run_cli_subprocess("verify", bf16_output)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    ft = {"a": rng.standard_normal((16, 4)).astype(np.float32), "b": np.ones(4, np.float32)}
    base = write_checkpoint(tmp_path / "base", {k: np.zeros_like(v) for k, v in ft.items()})
    fine = write_checkpoint(tmp_path / "ft", ft)
    out = tmp_path / "tau.zarr"
    assert run_cli("diff", base, fine, "-o", out, "-q", "--compression", "none") == 0
    return out


def test_verify_fails_when_an_array_is_deleted(store: Path) -> None:
    shutil.rmtree(store / "a")
    proc = run_cli_subprocess("verify", store)
    assert proc.returncode == 2 and "'a'" in proc.stderr and "missing" in proc.stderr


def test_verify_reports_a_missing_checksum(store: Path) -> None:
    """A chunk randomized after its checksum attrs were removed passed verify."""
    keys = ("xxh3_128", "block_xxh3_128", "checksum_block_rows")
    own = store / "a" / "zarr.json"
    node = json.loads(own.read_text())
    for k in keys:
        node["attributes"].pop(k, None)
    own.write_text(json.dumps(node))
    root = json.loads((store / "zarr.json").read_text())
    root["consolidated_metadata"]["metadata"]["a"] = node
    (store / "zarr.json").write_text(json.dumps(root))
    chunk = store / "a" / "c" / "0" / "0"
    chunk.write_bytes(np.random.default_rng(9).bytes(chunk.stat().st_size))
    proc = run_cli_subprocess("verify", store)
    assert proc.returncode == 2 and "a (no recorded xxh3_128 checksum)" in proc.stderr


def test_chunk_reads_equal_zarr_and_each_is_checked(store: Path) -> None:
    """Values equal zarr's own reading; a flipped value is caught by the chunk's digest."""
    want = zarr.open_array(str(store), path="a", mode="r")[...]
    np.testing.assert_array_equal(sv.open(store)["a"].compute(), want)
    chunk = store / "a" / "c" / "0" / "0"
    values = np.frombuffer(chunk.read_bytes(), np.float32).copy()
    values[3] = -values[3]
    chunk.write_bytes(values.tobytes())
    with pytest.raises(sv.errors.StoreError, match="recorded checksum"):
        sv.open(store)["a"].compute()


@pytest.mark.parametrize("swap", ["zstd-codec", "big-endian"])
def test_a_codec_swapped_after_opening_is_refused(tmp_path: Path, swap: str) -> None:
    """An array whose codecs change after the store was opened (blosc replaced by another
    codec, or the bytes made big-endian: as many codecs as before) is refused by name, not
    decoded with the codecs it was validated with."""
    ft = {"a": np.random.default_rng(4).standard_normal((16, 4)).astype(np.float32)}
    base = write_checkpoint(tmp_path / "base", {"a": np.zeros((16, 4), np.float32)})
    fine = write_checkpoint(tmp_path / "ft", ft)
    store = tmp_path / "tau.zarr"
    assert run_cli("diff", base, fine, "-o", store, "-q") == 0  # lz4 by default
    tensor = sv.open(store)["a"]  # validated now: bytes, then blosc
    meta_file = store / "a" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc"]
    if swap == "zstd-codec":
        meta["codecs"][1] = {"name": "zstd", "configuration": {"level": 1, "checksum": False}}
    else:
        meta["codecs"][0]["configuration"] = {"endian": "big"}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(sv.errors.StoreError, match="metadata changed since the store was opened"):
        tensor.compute()


RACE = textwrap.dedent(
    """
    import json, sys, threading
    from pathlib import Path
    import numpy as np
    from streamvec.io.blocks import ZarrReader
    from streamvec.io.zarr.store import read_store

    store = sys.argv[1]
    meta = json.loads((Path(store) / "zarr.json").read_text())["consolidated_metadata"]
    arrays = [(p, n) for p, n in meta["metadata"].items() if n["node_type"] == "array"]
    n = 16
    barrier = threading.Barrier(n)
    errors = []

    def work(i):
        path, node = arrays[i % len(arrays)]
        reader = ZarrReader(store, path, tuple(node["shape"]), np.dtype(node["data_type"]))
        barrier.wait()  # every thread decodes metadata for the first time at once
        try:
            reader.read(0, 1)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(errors[0] if errors else "ok")
    """
)


def test_first_metadata_decode_in_many_threads(store: Path) -> None:
    """``combine --workers 8`` sometimes failed: UnknownCodecError: Unknown codec: 'bytes'.

    Each run is a fresh process (a fresh codec registry) whose 16 threads read their first
    chunk at the same moment.
    """
    for _ in range(6):
        proc = subprocess.run(
            [sys.executable, "-c", RACE, str(store)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_opening_a_store_loads_zarr_before_any_worker(store: Path) -> None:
    """The root of that race: a worker thread importing zarr for the first time could find
    ``zarr.core.metadata.v3`` imported while another thread had not yet run ``zarr.codecs``
    (which registers 'bytes'). Opening a store now loads zarr and resolves its codecs in the
    opening thread, so no worker is the first to import or look up anything."""
    code = textwrap.dedent(
        f"""
        import sys
        import streamvec as sv
        assert "zarr" not in sys.modules
        sv.open({str(store)!r})
        assert "zarr.codecs" in sys.modules, "zarr not loaded when the store was opened"
        from zarr.registry import get_codec_class
        get_codec_class("bytes"); get_codec_class("blosc")
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
