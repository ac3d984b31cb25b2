"""The public Python API and the entry points keep their names, whatever the module tree.

Lines marked ``retree: keep`` spell the public import paths as users write them; the tree
move (``tools/retree.py``) leaves them as they are.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_names() -> None:
    import streamvec as sv

    for name in sv.__all__:
        assert hasattr(sv, name), name
    assert callable(sv.open) and callable(sv.run) and callable(sv.stats)


def test_merge_api_import_path() -> None:
    import streamvec.merge  # retree: keep
    from streamvec.merge import MergeReport, RunSettings, merge  # retree: keep

    assert streamvec.merge.merge is merge  # retree: keep
    assert MergeReport.__name__ == "MergeReport" and RunSettings.__name__ == "RunSettings"


def test_console_script_entry_point_resolves() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["streamvec"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_python_dash_m_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streamvec.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("streamvec ")


def test_import_streamvec_stays_light() -> None:
    # Importing the package (and so every package __init__ on its path) pulls in none of the
    # optional heavy libraries.
    code = (
        "import sys, streamvec, streamvec.ops.merge; "
        "print(sorted(m for m in ('torch', 'matplotlib', 'transformers', 'peft', 'numba') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_stats_without_spectrum_runs_without_the_svd_stack(tmp_path: Path) -> None:
    # `stats` factors nothing without --spectrum or an SVD store term: dask.array's import
    # (about 0.7 s) was most of its start-up; its compiled loop brings numba, on purpose.
    from tests.conftest import modules_imported_by_cli, write_checkpoint

    rng = np.random.default_rng(0)
    base = rng.standard_normal((64, 32)).astype(np.float32)
    write_checkpoint(tmp_path / "base", {"model.layers.0.mlp.up_proj.weight": base})
    write_checkpoint(tmp_path / "ft", {"model.layers.0.mlp.up_proj.weight": base + 1e-3})
    args = ("stats", tmp_path / "ft", "--base", tmp_path / "base", "-o", tmp_path / "out")
    rc, imported = modules_imported_by_cli(
        *args, "--no-plots", "-q", modules=("dask.array", "numba")
    )
    assert (rc, imported) == (0, ["numba"])
    assert (tmp_path / "out" / "stats.json").is_file()


def test_commands_start_without_the_svd_stack() -> None:
    # Every command builds the whole parser first: the randomized SVD's imports (dask.array,
    # scipy; about half a second) are for the commands that factor, and numba's (stats'
    # compiled loop, about a second with its cached code) for stats, not for every start.
    code = (
        "import sys, streamvec; from streamvec.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('dask.array', 'scipy', 'numba') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
