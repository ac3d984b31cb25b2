"""Crash safety, resume, locking, disk full, non-finite values and untouched inputs."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from streamvec.engine.jobs import DONE_LOG
from streamvec.tools import synth

from .conftest import BF16, run_cli, run_cli_subprocess, write_checkpoint

SHAPE = synth.LlamaShape(hidden=128, intermediate=352, layers=4, heads=2, kv_heads=1, vocab=2048)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rel")
    base = synth.build_checkpoint(root / "base", shape=SHAPE, shard_size="400kB", seed=0)
    return {
        "base": base,
        "a": synth.build_finetune(base, root / "a", rank=4, seed=1),
        "b": synth.build_finetune(base, root / "b", rank=4, seed=2),
    }


# Small blocks (many of them) and a durable log line per block make the kill points meaningful.
SMALL = ("--block-size", "16kB", "--workers", "1")


def command(kind: str, fam: dict[str, Path], out: Path) -> list[str]:
    if kind == "svd":
        return [
            "svd",
            str(fam["a"]),
            "--base",
            str(fam["base"]),
            "-o",
            str(out),
            "-q",
            "--rank",
            "4",
            "--method",
            "randomized",
            *SMALL,
        ]
    if kind == "diff":
        return ["diff", str(fam["base"]), str(fam["a"]), "-o", str(out), "-q", *SMALL]
    return [
        "combine",
        "--base",
        str(fam["base"]),
        "-o",
        str(out),
        "-q",
        *SMALL,
        f"{fam['a']}:0.5",
        f"{fam['b']}:-0.3",
        "--shard-size",
        "600kB",
    ]


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every file of an output, by relative path (stores and checkpoints alike)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def kill_after(cmd: list[str], out: Path, blocks: int, job: str | None = None) -> int:
    """Start the CLI, SIGKILL it once ``blocks`` blocks are logged done; lines logged.

    ``job`` names the job whose done log is watched (default: the output's own; a hidden
    sibling such as ``.OUT.factors`` for the intermediates of the SVD merges).
    """
    env = dict(os.environ, STREAMVEC_SYNC_SECONDS="0")
    proc = subprocess.Popen([sys.executable, "-m", "streamvec.cli", *cmd], env=env)
    log = out.parent / f"{job or '.' + out.name}.partial" / DONE_LOG
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and log.read_text().count("\n") >= blocks:
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    return log.read_text().count("\n") if log.is_file() else 0


@pytest.mark.parametrize("kind", ["diff", "combine", "svd"])
def test_killed_runs_resume_to_identical_output(family, tmp_path: Path, kind: str) -> None:
    from streamvec.compute.linalg.blas import limit_blas_threads

    reference = tmp_path / f"ref-{kind}"
    # The reference runs here with one BLAS thread, the killed and resumed runs in fresh
    # processes with BLAS's default: results must not depend on BLAS threading.
    with limit_blas_threads(1):
        assert run_cli(*command(kind, family, reference)) == 0
    want = output_bytes(reference)
    for point in (1, 25) if kind != "svd" else (1, 12):
        out = tmp_path / f"{kind}-{point}"
        logged = kill_after(command(kind, family, out), out, point)
        assert logged >= point
        assert not out.exists(), "a killed run must not leave a finished-looking output"
        proc = run_cli_subprocess(*command(kind, family, out), "--resume")
        assert proc.returncode == 0, proc.stderr
        assert output_bytes(out) == want, f"resumed {kind} differs from the uninterrupted run"
        assert not (out.parent / f".{out.name}.partial").exists()


@pytest.mark.parametrize("kind", ["diff", "combine"])
def test_a_run_stopped_before_its_first_block_resumes(
    family, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after its job record but before its output files existed (a SIGTERM at that
    moment made --resume fail with "cannot reopen"): --resume starts over."""
    from streamvec.engine import sinks

    reference = tmp_path / "ref"
    assert run_cli(*command(kind, family, reference)) == 0
    out = tmp_path / "out"
    sink = sinks.ZarrSink if kind == "diff" else sinks.SafetensorsSink

    def stopped(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as the SIGTERM handler raises it

    with monkeypatch.context() as m:
        m.setattr(sink, "prepare", stopped)
        assert run_cli(*command(kind, family, out)) == 130
    assert (tmp_path / ".out.partial").is_dir() and not out.exists()
    assert run_cli(*command(kind, family, out), "--resume") == 0
    assert output_bytes(out) == output_bytes(reference)


def test_resume_refuses_a_different_job(family, tmp_path: Path) -> None:
    out = tmp_path / "tau.zarr"
    kill_after(command("diff", family, out), out, 2)
    proc = run_cli_subprocess(*command("diff", family, out), "--dtype", "bfloat16", "--resume")
    assert proc.returncode == 2
    assert "cannot resume" in proc.stderr and "tensors" in proc.stderr
    # the unfinished job is still there to be resumed with the right parameters
    assert run_cli(*command("diff", family, out), "--resume") == 0
    assert zarr.open_group(str(out), mode="r").attrs["streamvec"]["kind"] == "task_vector"


def test_without_resume_an_unfinished_job_is_started_over(family, tmp_path: Path) -> None:
    out = tmp_path / "tau.zarr"
    kill_after(command("diff", family, out), out, 2)
    assert run_cli(*command("diff", family, out)) == 0
    assert run_cli("verify", out, "-q") == 0


def test_two_runs_refuse_each_other(family, tmp_path: Path) -> None:
    out = tmp_path / "tau.zarr"
    fd = os.open(tmp_path / ".tau.zarr.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running streamvec would hold it
    try:
        proc = run_cli_subprocess(*command("diff", family, out))
    finally:
        os.close(fd)
    assert proc.returncode == 2 and "another streamvec run" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("kind", ["diff", "combine"])
def test_disk_full_is_reported_and_cleaned_up(
    family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, kind: str
) -> None:
    calls = {"n": 0}

    def full(*args: object, **kwargs: object) -> int:
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    if kind == "combine":
        monkeypatch.setattr(os, "pwrite", full)
    else:
        import streamvec.io.zarr.store as zs

        monkeypatch.setattr(zs, "_write_file", full)
    out = tmp_path / "out"
    assert run_cli(*command(kind, family, out)) == 2
    err = capsys.readouterr().err
    # the zarr block writes fail in block tasks, and the job names the output ("disk full");
    # the safetensors writer names its shard with the system's words
    said = f"cannot write {out}: disk full" if kind == "diff" else "No space left"
    assert said in err and "free disk space" in err, err
    assert calls["n"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_nonfinite_values_fail_by_default(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((40, 8)).astype(BF16), "v": np.ones(5, np.float32)}
    ft = {k: v.copy() for k, v in base.items()}
    ft["w"][17, 3] = np.nan
    ft["w"][30, 0] = np.inf
    b, f = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "f", ft)
    proc = run_cli_subprocess("diff", b, f, "-o", tmp_path / "t.zarr")
    assert proc.returncode == 2
    assert "w: 2 values, first at row 17" in proc.stderr
    assert "already holds NaN/inf" in proc.stderr
    assert not (tmp_path / "t.zarr").exists()
    # Asked for explicitly, they are written through.
    assert run_cli("diff", b, f, "-o", tmp_path / "t.zarr", "-q", "--no-check-finite") == 0


def digest_tree(path: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_inputs_are_never_modified(family, tmp_path: Path) -> None:
    before = {k: digest_tree(v) for k, v in family.items()}
    modes = {str(p): p.stat().st_mode for v in family.values() for p in v.rglob("*")}
    assert run_cli(*command("diff", family, tmp_path / "a.zarr")) == 0
    assert run_cli(*command("combine", family, tmp_path / "m")) == 0
    assert (
        run_cli(
            "combine",
            "--base",
            family["base"],
            "-o",
            tmp_path / "m2",
            "-q",
            str(tmp_path / "a.zarr"),
            f"{family['b']}:-1",
        )
        == 0
    )
    assert run_cli("info", family["base"]) == 0
    assert run_cli("verify", tmp_path / "m", "-q") == 0
    store_before = digest_tree(tmp_path / "a.zarr")
    assert run_cli("combine", "-o", tmp_path / "c.zarr", "-q", str(tmp_path / "a.zarr")) == 0
    assert digest_tree(tmp_path / "a.zarr") == store_before
    assert {k: digest_tree(v) for k, v in family.items()} == before
    assert {str(p): p.stat().st_mode for v in family.values() for p in v.rglob("*")} == modes


@pytest.mark.parametrize("kind", ["diff", "combine", "svd"])
def test_resume_removes_temporaries_of_writes_cut_short(family, tmp_path: Path, kind: str) -> None:
    """A kill between a temporary file's creation and its rename leaves litter; resume drops it."""
    reference = tmp_path / f"ref-{kind}"
    assert run_cli(*command(kind, family, reference)) == 0
    out = tmp_path / f"{kind}-out"
    kill_after(command(kind, family, out), out, 1)
    partial = out.parent / f".{out.name}.partial"
    # What zarr's LocalStore, the chunk writer and the index writer leave when killed there.
    litter = [
        partial / "zarr.0123456789abcdef0123456789abcdef.partial",
        partial / "some" / "c" / "0.fedcba9876543210fedcba9876543210.partial",
        partial / ".model.safetensors.index.json.k3j2h1.tmp",
    ]
    for path in litter:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    keep = partial / "notes.partial.txt"  # not a temporary's name: left alone
    keep.write_text("x")
    proc = run_cli_subprocess(*command(kind, family, out), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert (out / "notes.partial.txt").read_text() == "x"
    (out / "notes.partial.txt").unlink()
    for d in sorted((p for p in out.rglob("*") if p.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()  # the planted "some/c" directories, now empty
    assert output_bytes(out) == output_bytes(reference)
