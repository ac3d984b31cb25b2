"""Every command that reads checkpoints (every operation of the table, every merge method)
refuses each hostile input cleanly: exit 2, one line naming what is wrong, nothing written."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvec.errors import StreamvecError
from streamvec.io.safetensors.checkpoint import resolve_checkpoint
from streamvec.ops.merge.registry import get_method
from streamvec.ops.registry import OPERATIONS, MergeMethodEntry

from .conftest import run_cli
from .hostile import CORPUS, _valid

RANK = ("-q", "--rank", "2")


def _recipe(out: Path, method: str, model: Path, base: Path) -> Path:
    """A recipe merging ``model`` (twice) into ``base``, written beside ``out``."""
    path = out.parent / f"{method}.yaml"
    params = "{weight: 0.5}" if get_method(method).mergekit else "{}"
    path.write_text(
        f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
        f"  - model: {model}\n    parameters: {params}\n"
        f"  - model: {model}\n    parameters: {params}\n"
    )
    return path


# (command template, whether the hostile path is BASE, FT or a TERM)
COMMANDS = {
    "info": lambda bad, good, out: ["info", bad],
    "diff-base": lambda bad, good, out: ["diff", bad, good, "-o", out, "-q"],
    "diff-ft": lambda bad, good, out: ["diff", good, bad, "-o", out, "-q"],
    "combine-base": lambda bad, good, out: ["combine", "--base", bad, "-o", out, "-q", good],
    "combine-term": lambda bad, good, out: ["combine", "--base", good, "-o", out, "-q", bad],
    "svd-base": lambda bad, good, out: ["svd", good, "--base", bad, "-o", out, *RANK],
    "svd-ft": lambda bad, good, out: ["svd", bad, "--base", good, "-o", out, *RANK],
    "lora-base": lambda bad, good, out: ["lora", bad, good, "-o", out, *RANK],
    "lora-ft": lambda bad, good, out: ["lora", good, bad, "-o", out, *RANK],
    "decompose-term": lambda bad, good, out: [
        "decompose",
        bad,
        good,
        "--base",
        good,
        "-o",
        out,
        *RANK,
    ],
    "merge-svd-term": lambda bad, good, out: [
        "merge-svd",
        "tsv",
        bad,
        good,
        "--base",
        good,
        "-o",
        out,
        "-q",
    ],
    "merge-base": lambda bad, good, out: ["merge", _recipe(out, "ties", good, bad), "-o", out],
    # every merge method of the table, with the hostile file as a fine-tune
    **{
        f"merge-{name}": (
            lambda bad, good, out, name=name: ["merge", _recipe(out, name, bad, good), "-o", out]
        )
        for name, entry in OPERATIONS.items()
        if isinstance(entry, MergeMethodEntry)
    },
}


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30
    assert len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("case", "build", "fragment"), CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command, case, build, fragment
) -> None:
    bad = build(tmp_path / "bad")
    good = _valid(tmp_path / "good")
    out = tmp_path / "out"
    argv = COMMANDS[command](bad, good, out)  # a recipe is written here, before the snapshot
    before = sorted(p.name for p in tmp_path.iterdir())
    code = run_cli(*map(str, argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamvec: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_float_and_int_mismatch_between_models(tmp_path: Path, capsys) -> None:
    import numpy as np
    import safetensors.numpy

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    safetensors.numpy.save_file({"w": np.zeros(4, np.float32)}, str(a / "model.safetensors"))
    safetensors.numpy.save_file({"w": np.zeros(4, np.int32)}, str(b / "model.safetensors"))
    assert run_cli("diff", a, b, "-o", tmp_path / "o", "-q") == 2
    assert "mixes float and non-float" in capsys.readouterr().err


weight_maps = st.dictionaries(
    st.text(max_size=8),
    st.one_of(
        st.text(max_size=12),
        st.integers(),
        st.none(),
        st.sampled_from(["s1.safetensors", "s2.safetensors", "../s1.safetensors"]),
    ),
    max_size=4,
)
documents = st.one_of(
    st.builds(lambda m: {"weight_map": m}, weight_maps),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=8,
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_index_reader_raises_only_our_error(doc: object) -> None:
    import numpy as np
    import safetensors.numpy

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        safetensors.numpy.save_file({"w": np.zeros(2, np.float32)}, str(d / "s1.safetensors"))
        safetensors.numpy.save_file({"b": np.zeros(2, np.float32)}, str(d / "s2.safetensors"))
        (d / "model.safetensors.index.json").write_text(json.dumps(doc))
        try:
            files = resolve_checkpoint(d)
        except StreamvecError:
            return
        # Accepted: then every tensor the index names is really in its shard.
        assert set(files.tensors) <= {"w", "b"}


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_index_bytes_raise_only_our_error(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "model.safetensors.index.json").write_bytes(raw)
        with pytest.raises(StreamvecError):
            resolve_checkpoint(d)
