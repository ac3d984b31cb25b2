"""Every command on tiny real models of every architecture family people merge and edit.

Each family (transformers and diffusers classes, random weights, saved with
``save_pretrained``) runs ``info``, ``diff``, ``combine``, ``svd``, ``decompose``, ``merge``
(TIES) and ``verify``. Outputs must keep the input's file names, load with the family's own
``from_pretrained``, and equal the same edit done in float64 on whole tensors.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import streamvec as sv
from tests.conftest import assert_matches_float64, run_cli
from tests.families import FAMILIES, Family, build_family, loader, read_all


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory):
    built: dict[str, dict[str, Path]] = {}

    def get(name: str) -> dict[str, Path]:
        if name not in built:
            built[name] = build_family(tmp_path_factory.mktemp(name), FAMILIES[name])
        return built[name]

    return get


def weight_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.safetensors*"))


def check_layout(out: Path, family: Family) -> None:
    stem = "diffusion_pytorch_model" if family.library == "diffusers" else "model"
    names = weight_files(out)
    assert names and all(
        n.startswith(stem + "-") or n == f"{stem}.safetensors.index.json" for n in names
    ), names
    assert (out / f"{stem}.safetensors.index.json").is_file()
    assert (out / "config.json").is_file()
    assert (out / "README.md").is_file() and "streamvec" in (out / "README.md").read_text()


def load(out: Path, family: Family) -> object:
    cls = loader(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family.library == "transformers":
            model, info = cls.from_pretrained(str(out), output_loading_info=True)
            assert not info["missing_keys"], info["missing_keys"]
            assert not info["unexpected_keys"], info["unexpected_keys"]
            assert not info["mismatched_keys"], info["mismatched_keys"]
            return model
        return cls.from_pretrained(str(out))


def assert_edit(out: Path, base: dict, terms: list[tuple[float, dict]]) -> None:
    """Every float tensor of ``out`` equals base + sum w (ft - base) done in float64."""
    got = read_all(out)
    assert set(got) == set(base), set(got) ^ set(base)
    for name, b in base.items():
        if b.dtype.kind not in "fV" and str(b.dtype) != "bfloat16":
            np.testing.assert_array_equal(got[name], b)
            continue
        b64 = b.astype(np.float64)
        exact = b64.copy()
        magnitude = np.abs(b64)
        for w, ft in terms:
            f64 = ft[name].astype(np.float64)
            exact += w * (f64 - b64)
            magnitude += abs(w) * (np.abs(f64) + np.abs(b64))
        assert got[name].dtype == b.dtype, name
        assert_matches_float64(got[name], exact, magnitude, 1 + 2 * len(terms), name)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(name: str, family_dirs, tmp_path: Path) -> None:
    family = FAMILIES[name]
    d = family_dirs(name)
    base, ft1, ft2 = d["base"], d["ft1"], d["ft2"]
    B, F1, F2 = read_all(base), read_all(ft1), read_all(ft2)

    assert run_cli("info", base, "--json") == 0

    tau = tmp_path / "tau.zarr"
    assert run_cli("diff", base, ft1, "-o", tau, "-q") == 0
    store = sv.open(tau)
    for t in store:
        want = F1[t].astype(np.float64) - B[t].astype(np.float64)
        got = store[t].compute()
        mag = np.abs(F1[t].astype(np.float64)) + np.abs(B[t].astype(np.float64))
        assert_matches_float64(got, want, mag, 2, t)
    assert (tau / "README.md").is_file()

    edited = tmp_path / "edited"
    assert run_cli("combine", "--base", base, "-o", edited, f"{ft1}:0.5", f"{ft2}:0.3", "-q") == 0
    check_layout(edited, family)
    assert_edit(edited, B, [(0.5, F1), (0.3, F2)])
    load(edited, family)
    assert run_cli("verify", edited, "-q") == 0

    assert run_cli("svd", ft1, "--base", base, "-o", tmp_path / "f.zarr", "--rank", "2", "-q") == 0
    assert run_cli("verify", tmp_path / "f.zarr", "-q") == 0
    dec = tmp_path / "dec"
    assert run_cli("decompose", ft1, ft2, "--base", base, "-o", dec, "--rank", "2", "-q") == 0
    assert (dec / "README.md").is_file()

    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        "merge_method: ties\n"
        f"base_model: {base}\n"
        "parameters: {density: 0.5, weight: 0.5}\n"
        f"models:\n  - model: {ft1}\n  - model: {ft2}\n"
    )
    merged = tmp_path / "merged"
    assert run_cli("merge", recipe, "-o", merged, "-q") == 0
    check_layout(merged, family)
    assert "merge_method: ties" in (merged / "README.md").read_text()
    load(merged, family)
    assert run_cli("verify", merged, "-q") == 0
    manifest = json.loads((merged / "streamvec.json").read_text())
    assert manifest["streamvec"]["kind"] == "model"
