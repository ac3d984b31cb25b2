"""Issue 19: attention-only fine-tuning on a small ViT, the reduced run of the experiment.

Runs ``TransformerConfig.reduced()`` for seed 0 (two tasks, one negation target, a 4x4
disentanglement grid) in a temporary directory: pre-training, four arms (full, attention-only,
the size-matched MLP-only control, NTK-linearised), every task vector a ``streamvec diff``
(``--include`` for the partial arms) and every edited model a ``streamvec combine``.

Asserted: the arms train what they say (the attention and MLP arms the same number of weights
within 1%, their task vectors holding only those tensors), every fine-tune learns its task, and
the effects that held in every seed of the reduced run (seeds 0-4, see below). The comparison
the page is about (attention-only against the MLP-only control) did not go the papers' way at
this scale, so it is reported in docs/tutorial-transformer.md and not asserted in either
direction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("torch")

import streamvec as sv
from examples.digits.transformer import TransformerConfig, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("transformer")
    return run(TransformerConfig.reduced(seed=0), out), out


def test_arms_train_what_they_say(run_dir: tuple[dict[str, Any], Path]) -> None:
    results, out = run_dir
    weights = results["trained_weights"]
    assert abs(weights["attention"] - weights["mlp"]) <= 0.01 * weights["attention"]
    assert weights["full"] == weights["linearised"] > weights["attention"] + weights["mlp"]
    attention = sv.open(out / "vectors" / "attention-mirror.zarr")
    assert list(attention) and all(".attn." in n and "_proj." in n for n in attention)
    mlp = sv.open(out / "vectors" / "mlp-mirror.zarr")
    assert list(mlp) and all(".mlp.fc" in n for n in mlp)
    commands = (out / "commands.sh").read_text()
    assert "--include '*.attn.*_proj.*'" in commands
    assert results["streamvec_commands"] == sum(
        line.startswith("streamvec ") for line in commands.splitlines()
    )


def test_every_arm_learns_and_is_measured(run_dir: tuple[dict[str, Any], Path]) -> None:
    results, out = run_dir
    pre = results["pretrained"]
    for arm, a in results["arms"].items():
        # rot270 is never seen in pre-training (about 10-17%); every arm learns it.
        assert a["finetuned"]["rot270"] >= pre["rot270"] + 0.5, arm
        grid = a["disentanglement"]
        assert len(grid) == len(grid[0]) == 4
        # At alpha = (0, 0) the edited model is the pre-trained one in both terms: no error.
        zero = results["config"]["alphas"].index(0.0)
        assert grid[zero][zero] == 0.0, arm
    saved = json.loads((out / "results.json").read_text())
    assert saved["arms"].keys() == results["arms"].keys()
