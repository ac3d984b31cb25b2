"""One settings type: flags generated from it, validated once, refused in one place.

A contract over the operations table: every writing command refuses each setting it does not
support (exit 2, one line naming the flag and the command), before reading any input.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest

from streamvec.cli.main import build_parser, main
from streamvec.engine.settings import ENGINE_SETTINGS, Settings
from streamvec.errors import StreamvecError
from streamvec.ops.registry import check_settings, commands

# A value other than the default for each setting that has a flag, as flags.
GIVEN = {
    "workers": ["--workers", "2"],
    "scheduler": ["--scheduler", "sync"],
    "memory_limit": ["--memory-limit", "2GB"],
    "overwrite": ["--overwrite"],
    "block_size": ["--block-size", "1MB"],
    "check_finite": ["--no-check-finite"],
    "resume": ["--resume"],
    "device": ["--device", "torch-cpu"],
    "compression": ["--compression", "zstd"],
    "shard_size": ["--shard-size", "1GB"],
    "verify_inputs": ["--no-verify-inputs"],
    "vocab": ["--vocab", "base"],
    "strict": ["--strict"],
    "int_tensors": ["--int-tensors", "base"],
}

# How each command is called (inputs need not exist: settings are checked before any read).
CALLS = {
    "diff": ["diff", "B", "F", "-o", "OUT"],
    "combine": ["combine", "T", "-o", "OUT"],
    "svd": ["svd", "S", "-o", "OUT", "--rank", "2"],
    "lora": ["lora", "B", "F", "-o", "OUT", "--rank", "2"],
    "decompose": ["decompose", "A", "B", "-o", "OUT"],
    "merge-svd": ["merge-svd", "tsv", "A", "B", "-o", "OUT"],
    "merge": ["merge", "R.yaml", "-o", "OUT"],
}

UNSUPPORTED = [(op.name, name) for op in commands() for name in GIVEN if name not in op.settings]


def test_every_flagged_setting_has_a_test_value() -> None:
    flagged = {f.name for f in fields(Settings) if f.metadata.get("flag") is not None}
    assert flagged == set(GIVEN)
    assert set(CALLS) == {op.name for op in commands()}


def test_engine_takes_exactly_the_engine_settings() -> None:
    from streamvec.engine.execute import run

    params = set(inspect.signature(run).parameters)
    not_settings = {"model", "path", "format", "description", "extra_attrs"}
    assert params - not_settings == set(ENGINE_SETTINGS)
    assert set(ENGINE_SETTINGS) <= {f.name for f in fields(Settings)}


@pytest.mark.parametrize("command", sorted(CALLS))
def test_every_command_has_every_settings_flag(command: str) -> None:
    parser = build_parser()
    for name, flags in GIVEN.items():
        args = parser.parse_args([*CALLS[command], *flags])
        assert getattr(args, name) != getattr(Settings(), name), (command, name)


@pytest.mark.parametrize(("command", "setting"), UNSUPPORTED)
def test_unsupported_setting_is_refused_naming_flag_and_command(
    command: str, setting: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in CALLS[command]]
    code = main([*argv, *GIVEN[setting]])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert GIVEN[setting][0] in err and f"`streamvec {command}`" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(CALLS))
def test_bad_local_scheduler_is_exit_2_everywhere(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*CALLS[command], "--scheduler", "local:x"]) == 2
    assert "local:N" in capsys.readouterr().err


def test_api_refuses_what_the_cli_refuses() -> None:
    with pytest.raises(StreamvecError, match="--compression is not supported by `streamvec lora`"):
        check_settings("lora", Settings(compression="zstd"))
    with pytest.raises(StreamvecError, match="--compression is not supported by `streamvec merge`"):
        check_settings("merge", Settings(compression="zstd"))
    check_settings("combine", Settings(resume=True, shard_size="1GB", strict=True))


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"workers": -1}, "--workers"),
        ({"compression": "gzip"}, "--compression"),
        ({"vocab": "all"}, "--vocab"),
        ({"block_size": "0"}, "--block-size"),
        ({"scheduler": "local:0"}, "--scheduler"),
    ],
)
def test_settings_are_validated_once(kwargs: dict[str, object], flag: str) -> None:
    with pytest.raises(StreamvecError, match=flag):
        Settings(**kwargs)  # type: ignore[arg-type]


def test_save_keywords_are_settings() -> None:
    s = Settings.from_kwargs({"workers": 2, "resume": True}, shard_size="1GB")
    assert s.engine_kwargs()["shard_size"] == "1GB"
    assert s.given() == {"workers": 2, "resume": True, "shard_size": "1GB"}
    with pytest.raises(StreamvecError, match="unknown run setting"):
        Settings.from_kwargs({"wokers": 2})
    # to_dict round-trips
    assert Settings(**s.to_dict()) == s


def test_only_resets_what_a_step_does_not_own() -> None:
    s = Settings(workers=3, shard_size="1GB", resume=True)
    step = s.only({"workers"})
    assert (step.workers, step.shard_size, step.resume) == (3, "5GB", False)


def test_save_takes_the_run_settings_by_their_names(
    synth_family: dict[str, Path], tmp_path: Path
) -> None:
    import streamvec as sv

    tau = sv.open(synth_family["a"]) - sv.open(synth_family["base"])
    out = tmp_path / "tau.zarr"
    with pytest.raises(StreamvecError, match="unknown run setting.*wokers"):
        tau.save(out, wokers=2)
    with pytest.raises(StreamvecError, match="--compression must be one of"):
        tau.save(out, compression="gzip")
    with pytest.raises(StreamvecError, match=r"vocab: not a setting of save\(\).*with_vocab"):
        tau.save(out, vocab="union")
    assert not out.exists()
    report = tau.save(out, workers=1, compression="zstd", progress=False)
    assert report.path == out and out.is_dir()


def test_stats_takes_its_run_flags_from_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    # The same flags (one definition), validated the same way, before any input is read.
    assert main(["stats", "T", "--scheduler", "local:x"]) == 2
    assert "local:N" in capsys.readouterr().err
    assert main(["stats", "T", "--workers", "-1"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_an_api_keyword_and_the_settings_hold_one_value(tmp_path: Path) -> None:
    # svd(..., vocab=) and run=Settings(vocab=) say the same; given both, they must agree
    assert Settings().with_keywords(vocab="base").vocab == "base"
    assert Settings(vocab="base").with_keywords(vocab=None).vocab == "base"
    assert Settings(strict=True).with_keywords(strict=False).strict is True
    assert Settings(vocab="base").with_keywords(vocab="base").vocab == "base"
    with pytest.raises(StreamvecError, match="vocab='union' is given twice"):
        Settings(vocab="base").with_keywords(vocab="union")
    from streamvec.ops.svd import SVDOptions, svd

    with pytest.raises(StreamvecError, match="given twice"):
        svd(
            tmp_path / "in.zarr",
            tmp_path / "out.zarr",
            options=SVDOptions(rank=2),
            run=Settings(vocab="union"),
            vocab="base",
        )
