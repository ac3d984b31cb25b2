"""``streamvec verify`` on every kind of output: task vectors, checkpoints, SVD stores."""

from __future__ import annotations

from pathlib import Path

import zarr

from .conftest import run_cli, run_cli_subprocess


def test_verify_svd_store_factors(synth_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    fam = synth_family
    assert run_cli("svd", fam["a"], "--base", fam["base"], "-o", out, "--rank", "4", "-q") == 0
    assert run_cli("verify", out, "-q") == 0
    name = "model.layers.0.self_attn.q_proj.weight"
    arr = zarr.open_array(str(out), path=f"{name}/Vh", mode="r+")
    data = arr[...]
    data[1, 2] += 1.0
    arr[...] = data
    proc = run_cli_subprocess("verify", out)
    assert proc.returncode == 2
    assert f"{name} [Vh]" in proc.stderr


def test_verify_checkpoint_detects_flipped_byte(
    synth_family: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "m"
    assert (
        run_cli("combine", "--base", synth_family["base"], "-o", out, "-q", str(synth_family["a"]))
        == 0
    )
    assert run_cli("verify", out, "-q") == 0
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    proc = run_cli_subprocess("verify", out)
    assert proc.returncode == 2 and "changed since they were written" in proc.stderr
