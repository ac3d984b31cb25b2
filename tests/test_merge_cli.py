"""``streamvec merge``: recipes run as they are; anything unsupported is exit 2 naming it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import streamvec as sv
from streamvec.errors import StreamvecError
from streamvec.ops.merge import METHODS, parse_recipe
from streamvec.ops.merge.binding import bind
from streamvec.ops.merge.params import ParamSpec, check_setting, evaluate, layer_position


@pytest.fixture
def merge_cli() -> Callable[..., int]:
    """``streamvec.cli.main.main``, returning the exit code."""
    import streamvec.cli.main as cli

    return lambda *args: cli.main([str(a) for a in args])


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def basic(family: dict[str, Path], method: str = "ties", extra: str = "") -> str:
    return (
        f"merge_method: {method}\n"
        f"base_model: {family['base']}\n"
        "models:\n"
        f"  - model: {family['a']}\n"
        "    parameters: {weight: 0.6, density: 0.5}\n"
        f"  - model: {family['b']}\n"
        "    parameters:\n"
        "      weight: 0.4\n"
        "      density: [{filter: self_attn, value: 0.3}, {value: 0.7}]\n"
        f"{extra}"
    )


def test_runs_a_recipe_end_to_end(
    synth_family: dict[str, Path], tmp_path: Path, merge_cli: Callable[..., int], capsys
) -> None:
    rec = write(
        tmp_path / "r.yaml", basic(synth_family, extra="dtype: float32\nout_dtype: bfloat16\n")
    )
    code = merge_cli("merge", rec, "-o", tmp_path / "out", "--workers", "2")
    assert code == 0, capsys.readouterr().err
    assert "merge ties" in capsys.readouterr().out
    out = sv.open(tmp_path / "out")
    base = sv.open(synth_family["base"])
    assert set(out) == set(base)
    # int buffers pass through from the base; float tensors take out_dtype
    for name, t in out.items():
        if base[name].dtype.kind == "i":
            assert np.array_equal(t.compute(), base[name].compute())
        else:
            assert t.dtype.name == "bfloat16"
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("slices: []\n", "'slices'"),
        ("modules: {}\n", "'modules'"),
        ("tokenizer: {source: union}\n", "'tokenizer'"),
        ("chat_template: chatml\n", "'chat_template'"),
        ("tokenizer_source: model:other\n", "tokenizer_source"),
        ("frobnicate: 1\n", "'frobnicate'"),
        ("dtype: int8\n", "dtype"),
        ("parameters: {lambda: 1, densty: 0.5}\n", "densty"),
        ("seed: -3\n", "seed"),
    ],
)
def test_unsupported_fields_exit_2_naming_them(
    synth_family: dict[str, Path],
    tmp_path: Path,
    merge_cli: Callable[..., int],
    capsys,
    extra: str,
    field: str,
) -> None:
    rec = write(tmp_path / "r.yaml", basic(synth_family, extra=extra))
    code = merge_cli("merge", rec, "-o", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2
    assert field in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda t: t.replace("weight: 0.4", "weight: 0.4\n      lambda: 2"), "global parameter"),
        (lambda t: t.replace("weight: 0.4", "wieght: 0.4"), "wieght"),
        (lambda t: t.replace("density: 0.5", "density: lots"), "density must be a number"),
        (lambda t: t.replace("weight: 0.6, ", ""), "required parameter 'weight'"),
        (lambda t: t.replace("{value: 0.7}", "{value: 0.7, when: x}"), "when"),
        (lambda t: t.replace("merge_method: ties", "merge_method: slerp"), "unknown merge_method"),
        (lambda t: t.replace("- model: ", "- model: /nonexistent/org-model-", 1), "Hugging Face"),
        (
            lambda t: t.replace(
                "    parameters: {weight: 0.6, density: 0.5}", "    revision: main"
            ),
            "revision",
        ),
    ],
)
def test_recipe_errors_are_one_line(
    synth_family: dict[str, Path], tmp_path: Path, merge_cli, capsys, mutate, needle: str
) -> None:
    rec = write(tmp_path / "r.yaml", mutate(basic(synth_family)))
    assert merge_cli("merge", rec, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.startswith("streamvec: error:") and err.count("\n") == 1


def test_base_listed_among_models_is_the_base(synth_family: dict[str, Path]) -> None:
    text = basic(synth_family) + f"  - model: {synth_family['base']}\n"
    import yaml

    req = bind(parse_recipe(yaml.safe_load(text)))
    assert [e.path for e in req.entries] == [str(synth_family["a"]), str(synth_family["b"])]
    with pytest.raises(StreamvecError, match="is the base_model"):
        bind(parse_recipe(yaml.safe_load(text + "    parameters: {weight: 1}\n")))
    dup = basic(synth_family) + f"  - model: {synth_family['a']}\n    parameters: {{weight: 1}}\n"
    with pytest.raises(StreamvecError, match="already listed"):
        bind(parse_recipe(yaml.safe_load(dup)))


def test_list_and_dry_run(synth_family: dict[str, Path], tmp_path: Path, merge_cli, capsys) -> None:
    assert merge_cli("merge", "--list") == 0
    listing = capsys.readouterr().out
    for name in METHODS:
        assert name in listing
    assert "Yadav" in listing and "density" in listing
    rec = write(tmp_path / "r.yaml", basic(synth_family, "dare_ties", "seed: 4\n"))
    assert merge_cli("merge", rec, "--dry-run", "--seed", "9") == 0
    out = capsys.readouterr().out
    assert "dare_ties" in out and "seed: 9" in out
    assert not list(tmp_path.glob("out*"))
    assert merge_cli("merge", rec) == 2
    assert "-o OUT" in capsys.readouterr().err


def test_cli_subprocess_exit_code_when_wired(synth_family: dict[str, Path], tmp_path: Path) -> None:
    from tests.conftest import run_cli_subprocess

    probe = run_cli_subprocess("merge", "--list")
    if probe.returncode != 0:
        pytest.skip("`merge` is not wired into streamvec.cli.main yet")
    rec = write(tmp_path / "r.yaml", basic(synth_family, extra="slices: []\n"))
    proc = run_cli_subprocess("merge", rec, "-o", tmp_path / "out")
    assert proc.returncode == 2 and "'slices'" in proc.stderr
    assert sys.executable


# -- parameter settings, mergekit's rules --------------------------------------------------------

W = ParamSpec("weight", float, 1.0, "model", "")
B = ParamSpec("normalize", bool, False, "global", "")


def test_conditional_values_first_substring_match_wins() -> None:
    s = [{"filter": "self_attn", "value": 0.9}, {"filter": "attn", "value": 0.5}, {"value": 0.1}]
    check_setting(W, s, "w")
    assert evaluate(W, s, "model.layers.0.self_attn.q_proj.weight", 0, "w") == 0.9
    assert evaluate(W, s, "model.layers.0.cross_attn.q_proj.weight", 0, "w") == 0.5
    assert evaluate(W, s, "model.norm.weight", 0, "w") == 0.1
    assert evaluate(W, [{"filter": "mlp", "value": 2}], "lm_head.weight", 0, "w") is None
    assert evaluate(W, {"filter": "*", "value": 3}, "x", 0, "w") == 3.0


def test_gradients_interpolate_over_layers() -> None:
    g = [0.0, 1.0, 0.5]
    assert evaluate(W, g, "n", 0.0, "w") == 0.0
    assert evaluate(W, g, "n", 0.25, "w") == 0.5
    assert evaluate(W, g, "n", 0.75, "w") == 0.75
    assert evaluate(W, g, "n", 1.0, "w") == 0.5
    assert layer_position("model.layers.3.mlp.up_proj.weight", 7) == 0.5
    assert layer_position("model.embed_tokens.weight", 7) == 0.0
    assert evaluate(B, ["true", False], "n", 0.9, "b") is True


def test_value_types_are_checked() -> None:
    assert W.coerce("1e-3", "w") == 0.001  # YAML 1.1 reads 1e-3 as text; mergekit takes it
    assert B.coerce("yes", "b") is True
    for bad in (True, "abc", float("nan"), [1]):
        with pytest.raises(StreamvecError, match="weight"):
            W.coerce(bad, "w")
    with pytest.raises(StreamvecError, match="one form"):
        check_setting(W, [0.5, {"value": 1}], "w")
