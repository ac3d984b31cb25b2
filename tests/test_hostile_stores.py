"""Every command that reads a Zarr store refuses each damaged or hostile store cleanly.

Each case: exit code 2, one line on stderr naming the store and what is wrong, nothing left
under the output name, and every input file unchanged (hashed before and after).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from .conftest import run_cli, write_checkpoint
from .hostile_stores import CORPUS, TARGET, TENSORS

Command = Callable[[Path, Path, Path, Path], list[object]]

# (bad store, a good store, the base checkpoint, the output) -> argv
COMMANDS: dict[str, Command] = {
    "info": lambda bad, good, base, out: ["info", bad],
    "verify": lambda bad, good, base, out: ["verify", bad, "-q"],
    "combine": lambda bad, good, base, out: ["combine", "-o", out, "-q", bad, good],
    "combine-base": lambda bad, good, base, out: ["combine", "--base", base, "-o", out, "-q", bad],
    "svd": lambda bad, good, base, out: ["svd", bad, "-o", out, "--rank", "2", "-q"],
    "decompose": lambda bad, good, base, out: [
        "decompose",
        bad,
        good,
        "-o",
        out,
        "--rank",
        "2",
        "-q",
    ],
    "merge-svd": lambda bad, good, base, out: [
        "merge-svd",
        "tsv",
        bad,
        good,
        "-o",
        out,
        "--rank",
        "2",
        "-q",
    ],
    "merge": lambda bad, good, base, out: ["merge", _recipe(bad, base), "-o", out, "-q"],
}


def _recipe(store: Path, base: Path) -> Path:
    recipe = store.parent / "recipe.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\n"
        f"models: [{{model: {store}, parameters: {{weight: 0.5}}}}]\n"
    )
    return recipe


@pytest.fixture(scope="session")
def valid_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base, and task-vector (lz4 and uncompressed) and SVD stores of a fine-tune of it."""
    root = tmp_path_factory.mktemp("valid-stores")
    base = write_checkpoint(root / "base", {k: np.zeros_like(v) for k, v in TENSORS.items()})
    ft = write_checkpoint(root / "ft", TENSORS)
    ft2 = write_checkpoint(root / "ft2", {k: v[::-1].copy() * 2 for k, v in TENSORS.items()})
    stores = {"base": base}
    for name, argv in {
        "tv": ["diff", base, ft, "-o", root / "tv.zarr"],
        "good": ["diff", base, ft2, "-o", root / "good.zarr"],
        "raw": ["diff", base, ft, "-o", root / "raw.zarr", "--compression", "none"],
        "svd": ["svd", root / "tv.zarr", "-o", root / "svd.zarr", "--rank", "2"],
    }.items():
        assert run_cli(*argv, "-q") == 0
        stores[name] = Path(str(argv[argv.index("-o") + 1]))
    return stores


def _fingerprints(root: Path) -> dict[str, str]:
    """Every file under ``root`` by path: content hash, or what it is (never opened)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[str(p)] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif not stat.S_ISDIR(st.st_mode):
                out[str(p)] = f"special:{st.st_mode}"
    return out


def test_corpus_covers_the_reported_kinds() -> None:
    assert len(CORPUS) >= 30
    assert len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("case", "damage", "fragment", "kind", "when"), CORPUS, ids=[c[0] for c in CORPUS]
)
def test_damaged_store_is_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    valid_stores: dict[str, Path],
    command: str,
    case: str,
    damage: Callable[[Path], None],
    fragment: str,
    kind: str,
    when: str,
) -> None:
    if command == "info" and when == "read":
        pytest.skip("info reads no chunk")
    if command in ("info", "verify") and when == "budget":
        pytest.skip("no --memory-limit")
    bad = tmp_path / "bad.zarr"
    shutil.copytree(valid_stores[kind], bad, symlinks=True)
    damage(bad)
    out = tmp_path / "out"
    argv = COMMANDS[command](bad, valid_stores["good"], valid_stores["base"], out)
    before_dir = sorted(p.name for p in tmp_path.iterdir())
    before = _fingerprints(tmp_path) | _fingerprints(valid_stores["base"].parent)
    # Only where the budget is the point: an in-process run counts the test process's own
    # memory against the limit.
    limit = ["--memory-limit", "400MB"] if when == "budget" else []
    code = run_cli(*map(str, argv), *limit)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamvec: error: "), err
    assert fragment in lines[0], lines[0]
    assert str(bad) in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before_dir  # nothing written
    assert _fingerprints(tmp_path) | _fingerprints(valid_stores["base"].parent) == before


def test_valid_stores_pass_every_command(
    tmp_path: Path, valid_stores: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for kind in ("tv", "raw", "svd"):
        for command, argv in COMMANDS.items():
            out = tmp_path / f"{kind}-{command}"
            args = argv(valid_stores[kind], valid_stores["good"], valid_stores["base"], out)
            assert run_cli(*map(str, args)) == 0, (kind, command, capsys.readouterr().err)


def test_no_verify_inputs_reads_a_changed_raw_chunk(
    tmp_path: Path, valid_stores: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The flag skips the checksum (and only it): the changed values are read as they are."""
    import streamvec as sv

    bad = tmp_path / "bad.zarr"
    shutil.copytree(valid_stores["raw"], bad)
    chunk = bad / TARGET / "c" / "0" / "0"
    values = np.frombuffer(chunk.read_bytes(), np.float32).copy()
    values[0] += 1
    chunk.write_bytes(values.tobytes())
    assert run_cli("combine", "-o", tmp_path / "a", "-q", bad) == 2
    assert "recorded checksum" in capsys.readouterr().err
    assert run_cli("combine", "-o", tmp_path / "b", "-q", "--no-verify-inputs", bad) == 0
    got = sv.open(tmp_path / "b")[TARGET].compute()
    assert got.reshape(-1)[0] == values[0]
