"""The fault suite: outputs over inputs, inputs that change, signals, hostile recipes, full disks.

Every case runs a real command and asserts exit 2 (or 130 for a signal), the one-line
message, nothing under the output name, and every input file unchanged (sha256 before and
after).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from streamvec import synth

from .conftest import run_cli, run_cli_subprocess
from .faults import COMMANDS, snapshot, writing_commands

SHAPE = synth.LlamaShape(hidden=64, intermediate=176, layers=2, heads=2, kv_heads=1, vocab=256)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    base = synth.build_checkpoint(root / "base", shape=SHAPE, shard_size="60kB", seed=0)
    return {
        "base": base,
        "a": synth.build_finetune(base, root / "a", rank=4, seed=1),
        "b": synth.build_finetune(base, root / "b", rank=4, seed=2),
    }


@pytest.fixture
def family(pristine: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy: a case that (wrongly) deletes its inputs must not spoil the others."""
    root = tmp_path / "models"
    return {k: Path(shutil.copytree(v, root / k)) for k, v in pristine.items()}


def _argv(family: dict[str, Path], tmp_path: Path, which: str, out: Path) -> list[str]:
    scratch = tmp_path / "recipes"
    scratch.mkdir(exist_ok=True)
    return [str(x) for x in dict(writing_commands(family, out, scratch))[which]]


# -- outputs never overlap inputs --------------------------------------------------------------


def _overlapping_output(kind: str, family: dict[str, Path], tmp_path: Path) -> Path:
    if kind == "is":
        return family["a"]
    if kind == "contains":
        return family["a"].parent
    if kind == "inside":
        return family["a"] / "sub"
    link = tmp_path / "link"
    link.symlink_to(family["a"], target_is_directory=True)
    return link


@pytest.mark.parametrize("overlap", ["is", "contains", "inside", "symlink"])
@pytest.mark.parametrize("which", COMMANDS)
def test_output_overlapping_an_input_is_refused(
    family: dict[str, Path], tmp_path: Path, which: str, overlap: str, capsys
) -> None:
    out = _overlapping_output(overlap, family, tmp_path)
    argv = _argv(family, tmp_path, which, out)
    before = snapshot(*family.values())
    listing = sorted(os.listdir(out.parent))
    code = run_cli(*argv, "--overwrite", "-q")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the input" in err and "write to another path" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert snapshot(*family.values()) == before, "an input changed"
    assert sorted(os.listdir(out.parent)) == listing, "something was written beside the output"


def test_synth_finetune_inside_its_base_is_refused(family: dict[str, Path]) -> None:
    proc = run_cli_subprocess("synth", family["a"] / "ft", "--finetune-of", family["a"], "-q")
    assert proc.returncode == 2 and "lies inside the input" in proc.stderr, proc.stderr
    assert not (family["a"] / "ft").exists()


def test_overlap_refused_in_a_real_process(family: dict[str, Path], tmp_path: Path) -> None:
    """The same refusal as a user sees it: a real process, one line, exit 2."""
    before = snapshot(*family.values())
    proc = run_cli_subprocess(*_argv(family, tmp_path, "lora", family["a"]), "--overwrite")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{family['a']}: is the input" in proc.stderr
    assert snapshot(*family.values()) == before
