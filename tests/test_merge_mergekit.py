"""The same recipe through mergekit and streamvec (optional: needs mergekit, skipped otherwise).

mergekit is found from ``STREAMVEC_MERGEKIT_YAML`` (the path of its ``mergekit-yaml``, e.g. in
an isolated venv), an importable ``mergekit``, or ``mergekit-yaml`` on PATH. Each mergekit run
takes ~20 s (torch and transformers imports), so the whole comparison is the slow part of the
suite when enabled; ``bench/bench_merge.py`` runs the full matrix and classifies differences.

Inputs are float32 so that magnitude ties (frequent in bf16 task vectors, and broken by
mergekit's unstable sort arbitrarily) do not blur the comparison; mergekit computes in
float32 (``dtype: float32``, every delta, product and sum rounded), streamvec in float64, so
the outputs must agree within 1 ulp or within mergekit's own float32 rounding error (bounded
here by 8 float32 roundings of the operands' magnitude).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import streamvec as sv
from streamvec.ops.merge import RunSettings, merge
from tests.conftest import ulp_distance


def _mergekit() -> list[str] | None:
    exe = os.environ.get("STREAMVEC_MERGEKIT_YAML")
    if exe:
        return [exe]
    if importlib.util.find_spec("mergekit") is not None:
        return [sys.executable, "-c", "from mergekit.scripts.run_yaml import main; main()"]
    found = shutil.which("mergekit-yaml")
    return [found] if found else None


MERGEKIT = _mergekit()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MERGEKIT is None, reason="mergekit not available"),
]


@pytest.fixture(scope="module")
def f32_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from streamvec.tools import synth

    root = tmp_path_factory.mktemp("mk-f32")
    shape = synth.LlamaShape(hidden=64, intermediate=176, layers=2, heads=2, kv_heads=1, vocab=256)
    base = synth.build_checkpoint(root / "base", shape=shape, dtype="float32", seed=0)
    out = {"base": base}
    for i, m in enumerate("abc"):
        only = "*.self_attn.*" if m == "c" else None
        out[m] = synth.build_finetune(base, root / m, rank=4, seed=i + 1, only=only)
    return out


def _run_both(family: dict[str, Path], tmp: Path, method: str, per: list[dict], **top: object):
    lines = [f"merge_method: {method}", f"base_model: {family['base']}", "models:"]
    for m, p in zip("abc", per, strict=True):
        lines += [f"  - model: {family[m]}", f"    parameters: {json.dumps(p)}"]
    for k, v in {"dtype": "float32", **top}.items():
        lines.append(f"{k}: {json.dumps(v)}")
    recipe = tmp / "recipe.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    merge(recipe, tmp / "sv", settings=RunSettings(workers=2))
    assert MERGEKIT is not None
    proc = subprocess.run(
        [*MERGEKIT, str(recipe), str(tmp / "mk"), "--no-copy-tokenizer", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = sv.open(tmp / "sv")
    theirs = sv.open(tmp / "mk")
    return ours, theirs


W = (0.5, 0.3, 0.7)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.4}),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
        ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.02}),
    ],
)
def test_deterministic_methods_agree_within_one_ulp(f32_family, tmp_path: Path, method, extra):
    per = [{"weight": w, **extra} for w in W]
    ours, theirs = _run_both(f32_family, tmp_path, method, per, parameters={"lambda": 1.2})
    base = sv.open(f32_family["base"])
    fts = [sv.open(f32_family[m]) for m in "abc"]
    for name, t in theirs.items():
        got, want = ours[name].compute(), t.compute()
        mag = np.abs(base[name].compute().astype(np.float64)) + sum(
            np.abs(f[name].compute().astype(np.float64)) for f in fts
        )
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        bad = (ulp_distance(got, want) > 1) & (diff > 8 * 2.0**-24 * mag)
        assert not bad.any(), f"{method} {name}: {int(bad.sum())} elements differ"


@pytest.mark.parametrize(("method", "density"), [("dare_linear", 0.3), ("della", 0.5)])
def test_randomised_methods_agree_in_statistics(f32_family, tmp_path: Path, method, density):
    per = [{"weight": w, "density": density} for w in W]
    ours, theirs = _run_both(f32_family, tmp_path, method, per)
    base = sv.open(f32_family["base"])
    changed, l1 = [0.0, 0.0], [0.0, 0.0]
    for name, t in theirs.items():
        b = base[name].compute().astype(np.float64)
        for j, x in enumerate((ours[name].compute(), t.compute())):
            d = x.astype(np.float64) - b
            changed[j] += float((d != 0).sum())
            l1[j] += float(np.abs(d).sum())
    assert abs(changed[0] / changed[1] - 1) < 0.02
    assert abs(l1[0] / l1[1] - 1) < 0.02
