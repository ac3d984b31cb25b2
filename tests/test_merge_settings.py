"""``streamvec merge`` carries every run setting to the SVD-based merges, or refuses it.

Regression: with a ``tsv``, ``iso_c`` or ``shared_unique`` recipe, ``--resume``,
``--no-check-finite`` and ``--block-size`` were dropped on the way to the SVD commands (their
options were rebuilt with those off) while ``streamvec merge-svd`` refused the same flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamvec.errors import StreamvecError
from tests.conftest import run_cli

SVD_MERGES = {"tsv": "merge_svd", "iso_c": "merge_svd", "shared_unique": "decompose"}


def _recipe(tmp_path: Path, fam: dict[str, Path], method: str) -> Path:
    params = "{rank: 4, threshold: 0.5}" if method == "shared_unique" else "{rank: 4}"
    path = tmp_path / f"{method}.yaml"
    path.write_text(
        f"merge_method: {method}\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['a']}\n"
        f"  - model: {fam['b']}\n"
        f"parameters: {params}\n"
    )
    return path


class _Captured(StreamvecError):
    """Stops the run once the SVD command has been called."""


@pytest.mark.parametrize("method", sorted(SVD_MERGES))
def test_run_settings_reach_the_svd_command(
    synth_family: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    method: str,
) -> None:
    import streamvec.ops.decompose
    import streamvec.ops.merge_svd

    seen: dict[str, Any] = {}

    def spy(*args: Any, run: Any = None, **kwargs: Any) -> Any:
        seen["run"] = run
        raise _Captured("captured")

    function = SVD_MERGES[method]
    module = getattr(streamvec.ops, function)
    monkeypatch.setattr(module, function, spy)
    code = run_cli(
        "merge",
        _recipe(tmp_path, synth_family, method),
        "-o",
        tmp_path / "out",
        "-q",
        "--no-check-finite",
        "--block-size",
        "8kB",
        "--workers",
        "1",
        "--memory-limit",
        "3GB",
        "--resume",
    )
    assert code == 2
    assert "captured" in capsys.readouterr().err
    run = seen["run"]
    # every SVD merge resumes: its factors (or components) and its output pass
    assert run.resume is True
    assert run.check_finite is False
    assert run.block_size == "8kB"
    assert run.workers == 1
    assert run.memory_limit == "3GB"
