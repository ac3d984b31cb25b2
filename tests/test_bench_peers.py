"""`streamvec bench` next to mergekit when it is installed, one line when it is not.

mergekit is not installed for the tests: a stand-in ``mergekit-yaml`` on ``PATH`` (it checks
the config it is given and writes the base's weights as its output) exercises the plumbing;
the real comparison is measured in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from pathlib import Path

import pytest

from streamvec.tools.benchmark import peers

from .conftest import run_cli

FAKE = """#!{python}
import shutil, sys
from pathlib import Path
config, out = Path(sys.argv[1]), Path(sys.argv[2])
text = config.read_text()
assert "merge_method: task_arithmetic" in text and "weight: 0.5" in text, text
assert sys.argv[3:] == ["--no-copy-tokenizer"], sys.argv
base = text.split("base_model: ")[1].split(chr(10))[0].strip('"')
out.mkdir()
for f in Path(base).glob("*.safetensors"):
    shutil.copy(f, out / f.name)
(Path(sys.argv[1]).parent / "mergekit-calls").open("a").write("run" + chr(10))
"""


def test_mergekit_peer_runs_next_to_combine_ckpt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "mergekit-yaml"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ.get('PATH', '')}")
    assert peers.peers_for("combine-ckpt") == [peers.MERGEKIT]
    out, work = tmp_path / "out", tmp_path / "work"
    code = run_cli(
        "bench", "--quick", "--size", "2M", "--steps", "combine-ckpt", "--repeat", "2",
        "--out", out, "--workdir", work, "--keep", "-q", "--no-plots",
    )  # fmt: skip
    assert code == 0
    (record,) = json.loads((out / "bench.json").read_text())["results"]
    peer = record["notes"]["peers"][peers.MERGEKIT]
    assert len(peer["seconds_all"]) == 2 and (work / "mergekit-calls").read_text() == "run\n" * 2
    assert math.isclose(peer["ratio"], record["seconds"] / peer["seconds"])
    assert peer["niter"] is None and peer["mean_residual"] is None and peer["peak_anon_bytes"] > 0
    assert "peers_missing" not in record["notes"]
    assert not (work / "mergekit-out").exists()  # the peer's output is removed


def test_a_missing_peer_is_one_line_and_nothing_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if peers.peers_for("combine-ckpt"):
        pytest.skip("mergekit is installed here")
    out, work = tmp_path / "out", tmp_path / "work"
    code = run_cli(
        "bench", "--quick", "--size", "2M", "--steps", "combine-ckpt",
        "--out", out, "--workdir", work, "--no-plots",
    )  # fmt: skip
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "mergekit" in line]
    assert lines == [
        "  combine-ckpt: no mergekit task_arithmetic comparison "
        "(pip install mergekit (or put its mergekit-yaml on PATH))"
    ]
    (record,) = json.loads((out / "bench.json").read_text())["results"]
    assert "peers" not in record["notes"]
    assert record["notes"]["peers_missing"] == [lines[0].strip()]


def test_the_mergekit_config_is_the_combine_ckpt_edit() -> None:
    text = peers.mergekit_config(Path("/m/base"), Path("/m/ft"))
    assert 'base_model: "/m/base"' in text and '- model: "/m/ft"' in text
    assert "weight: 0.5" in text and "normalize: false" in text and "dtype: bfloat16" in text
