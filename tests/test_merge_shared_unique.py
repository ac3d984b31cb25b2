"""The shared/unique components as a recipe method equal decompose + combine done by hand."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import run_cli
from .test_reliability import output_bytes


def test_shared_unique_recipe_equals_decompose_then_combine(
    synth_family: dict[str, Path], tmp_path: Path
) -> None:
    fam = synth_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: shared_unique\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['a']}\n"
        "    parameters: {shared: 2.0, unique: 1.0}\n"  # add the shared part once more
        f"  - model: {fam['c']}\n"
        "    parameters: {shared: 0.0, unique: -1.0}\n"  # negate only what is unique to c
        "parameters: {lambda: 0.5, rank: 4, threshold: 0.5}\n"
    )
    out = tmp_path / "merged"
    assert run_cli("merge", recipe, "-o", out, "-q") == 0
    assert not any(p.name.endswith(".components") for p in tmp_path.iterdir())

    parts = tmp_path / "parts"
    code = run_cli(
        "decompose",
        fam["a"],
        fam["c"],
        "--base",
        fam["base"],
        "-o",
        parts,
        "-q",
        "--rank",
        "4",
        "--threshold",
        "0.5",
    )
    assert code == 0
    comps = json.loads((parts / "decomposition.json").read_text())["components"]
    a, c = comps[str(fam["a"])], comps[str(fam["c"])]
    ref = tmp_path / "ref"
    code = run_cli(
        "combine",
        "--base",
        fam["base"],
        "--scale",
        "0.5",
        "-o",
        ref,
        "-q",
        "--missing",
        "keep-base",
        f"{parts / a['shared']}:2",
        f"{parts / a['unique']}:1",
        f"{parts / c['shared']}:0",
        f"{parts / c['unique']}:-1",
    )
    assert code == 0
    got, want = output_bytes(out), output_bytes(ref)
    for provenance in ("streamvec.json", "README.md"):  # the recipe vs the hand-made terms
        want.pop(provenance)
        got.pop(provenance)
    assert got == want
