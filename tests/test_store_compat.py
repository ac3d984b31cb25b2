"""Stores written by the previous version stay readable, and a deleted chunk is still caught.

``tests/data/store-v0`` was written by streamvec 0.1.0 before empty chunks were recorded
(`streamvec diff base ft -o v0.zarr --block-size 1kB`): a frozen tensor and an all-zero block
of a tuned one have no chunk files. Such gaps are read as zeros only when the whole array then
matches its recorded checksum.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import safetensors.numpy

from tests.conftest import run_cli, run_cli_subprocess

DATA = Path(__file__).parent / "data" / "store-v0"


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "v0"
    shutil.copytree(DATA, root)
    return root


def test_a_store_of_the_previous_version_is_read_and_verified(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    assert not (root / "v0.zarr" / "frozen.weight" / "c").exists()  # skipped, not recorded
    assert run_cli("verify", root / "v0.zarr") == 0
    out = tmp_path / "edited"
    assert run_cli("combine", "--base", root / "base", "-o", out, root / "v0.zarr", "-q") == 0
    base = safetensors.numpy.load_file(str(root / "base" / "model.safetensors"))
    ft = safetensors.numpy.load_file(str(root / "ft" / "model.safetensors"))
    got = {}
    for shard in out.glob("*.safetensors"):
        got.update(safetensors.numpy.load_file(str(shard)))
    for name, want in ft.items():
        # base + float32(ft - base): exact where nothing changed, one rounding elsewhere
        tau = want.astype(np.float64) - base[name].astype(np.float64)
        np.testing.assert_allclose(got[name], want, rtol=2**-23, atol=0, err_msg=name)
        assert np.array_equal(got[name][tau == 0], want[tau == 0]), name


def test_a_deleted_chunk_that_held_data_is_refused(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "v0.zarr" / "tuned.weight" / "c" / "2" / "0").unlink()
    proc = run_cli_subprocess(
        "combine", "--base", root / "base", "-o", tmp_path / "out", root / "v0.zarr"
    )
    assert proc.returncode == 2, proc.stderr
    assert "tuned.weight" in proc.stderr and "does not match its recorded checksum" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert run_cli("verify", root / "v0.zarr") == 2
