"""The fault suite: outputs over inputs, inputs that change, signals, hostile recipes, full disks.

Every case runs a real command and asserts exit 2 (or 130 for a signal), the one-line
message, nothing under the output name, and every input file unchanged (sha256 before and
after).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from streamvec.engine.jobs import DONE_LOG
from streamvec.io.safetensors.checkpoint import resolve_checkpoint
from streamvec.tools import synth

from .conftest import run_cli, run_cli_subprocess
from .faults import (
    COMMANDS,
    act_during_run,
    assert_refused,
    hostile_recipes,
    snapshot,
    writing_commands,
)
from .test_reliability import SHAPE as BIG
from .test_reliability import command, kill_after

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


# -- what resume checks ------------------------------------------------------------------------

RESUMABLE = ["diff", "svd"]


@pytest.fixture(scope="module")
def big_pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Large enough (with 16 kB blocks) that a run can be stopped in the middle."""
    root = tmp_path_factory.mktemp("faults-big")
    base = synth.build_checkpoint(root / "base", shape=BIG, shard_size="400kB", seed=0)
    return {
        "base": base,
        "a": synth.build_finetune(base, root / "a", rank=4, seed=1),
        "b": synth.build_finetune(base, root / "b", rank=4, seed=2),
        "other": synth.build_finetune(base, root / "other", rank=4, seed=7),
    }


@pytest.fixture
def big(big_pristine: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "models"
    return {k: Path(shutil.copytree(v, root / k)) for k, v in big_pristine.items()}


def _logged(out: Path) -> list[tuple[str, int]]:
    log = out.parent / f".{out.name}.partial" / DONE_LOG
    return [tuple(json.loads(line)[:2]) for line in log.read_text().splitlines()]


def _flip_byte_of(ft: Path, tensor: str, row: int) -> Path:
    """Flip one byte of ``tensor``'s row ``row`` in place (same size, same header)."""
    t = resolve_checkpoint(ft).tensors[tensor]
    cols = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
    where = t.offset + row * cols * t.dtype.itemsize
    with open(t.path, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x40]))
    return Path(t.path)


@pytest.mark.parametrize("kind", RESUMABLE)
def test_resume_refuses_a_byte_flipped_in_a_finished_block(big, tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    cmd = command(kind, big, out)
    kill_after(cmd, out, 3)
    name, r0 = _logged(out)[0]
    changed = _flip_byte_of(big["a"], name, r0)
    before = snapshot(*big.values())
    proc = run_cli_subprocess(*cmd, "--resume")
    assert_refused(proc, "cannot resume", str(changed), "changed since the unfinished run")
    assert not out.exists()
    assert snapshot(*big.values()) == before
    # the unfinished job stays; without --resume the run starts over and succeeds
    assert run_cli(*cmd) == 0


@pytest.mark.parametrize("kind", RESUMABLE)
def test_resume_refuses_a_finetune_replaced_by_another(big, tmp_path: Path, kind: str) -> None:
    """Same names, shapes, dtypes and sizes (the header fingerprint is equal): the data differ."""
    out = tmp_path / "out"
    cmd = command(kind, big, out)
    kill_after(cmd, out, 3)
    for shard in big["other"].glob("*.safetensors"):
        assert shard.stat().st_size == (big["a"] / shard.name).stat().st_size
        shutil.copyfile(shard, big["a"] / shard.name)
    proc = run_cli_subprocess(*cmd, "--resume")
    assert_refused(proc, "cannot resume", str(big["a"]), "changed since the unfinished run")
    assert not out.exists()


@pytest.mark.parametrize(
    ("which", "job"), [("lora", None), ("decompose", None), ("merge-svd", ".out.factors")]
)
def test_resume_of_an_svd_command_refuses_a_changed_input(
    big, tmp_path: Path, which: str, job: str | None
) -> None:
    """The SVD commands log whole tensors with the digests of every input they read."""
    out = tmp_path / "out"
    cmd = _big_argv(big, tmp_path, which, out)
    kill_after(cmd, out, 2, job)
    log = out.parent / f"{job or '.out'}.partial" / DONE_LOG
    name = json.loads(log.read_text().splitlines()[0])[0]
    changed = _flip_byte_of(big["a"], name, 0)
    proc = run_cli_subprocess(*cmd, "--resume")
    assert_refused(proc, "cannot resume", str(changed), "changed since the unfinished run")
    assert not out.exists()
    # the unfinished job stays; without --resume the run starts over and succeeds
    assert (out.parent / f"{job or '.out'}.partial").is_dir()
    assert run_cli(*cmd) == 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]


def test_resume_refuses_a_damaged_job_record(big, tmp_path: Path) -> None:
    """A job record is written whole or not at all, so an unreadable one was damaged since:
    refused by name rather than silently starting over."""
    out = tmp_path / "out"
    cmd = command("diff", big, out)
    kill_after(cmd, out, 3)
    record = out.parent / f".{out.name}.partial" / "streamvec-job.json"
    record.write_text(record.read_text()[:40])
    proc = run_cli_subprocess(*cmd, "--resume")
    assert_refused(proc, "cannot resume", str(record), "unreadable")
    assert record.parent.is_dir()  # kept: nothing is deleted by a refused resume
    assert run_cli(*cmd) == 0


# -- inputs that change during a run, and signals ---------------------------------------------

SLOW = ("--block-size", "16kB", "--workers", "1", "-q")


def _big_argv(big: dict[str, Path], tmp_path: Path, which: str, out: Path) -> list[str]:
    return [*_argv(big, tmp_path, which, out), *SLOW]


def _last_shard(ft: Path) -> Path:
    """The last shard holding weights (the very last one holds only an int buffer)."""
    return [p for p in sorted(ft.glob("*.safetensors")) if p.stat().st_size > 100_000][-1]


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists(), "an output appeared"
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not left, f"left behind: {left}"


@pytest.mark.parametrize("which", COMMANDS)
def test_input_truncated_during_the_run(big, tmp_path: Path, which: str) -> None:
    out = tmp_path / "out"
    # shared_unique reads the fine-tunes only while decomposing, before its output appears;
    # its last phase combines the components with the base, so that is the input to cut.
    cut = "base" if which == "merge-shared_unique" else "a"
    shard = _last_shard(big[cut])
    others = snapshot(*(big[k] for k in ("base", "a", "b") if k != cut))

    def truncate(proc) -> None:
        os.truncate(shard, shard.stat().st_size // 2)

    proc, acted = act_during_run(_big_argv(big, tmp_path, which, out), out, truncate)
    if not acted:
        pytest.skip("the command finished before the input could be truncated")
    assert proc.returncode == 2, proc.stderr_text
    lines = proc.stderr_text.strip().splitlines()
    assert len(lines) == 1 and str(shard) in lines[0], proc.stderr_text
    _assert_nothing_left(out)
    assert snapshot(*(big[k] for k in ("base", "a", "b") if k != cut)) == others


@pytest.mark.parametrize("which", ["diff", "svd", "lora", "merge-ties"])
def test_input_replaced_during_the_run(big, tmp_path: Path, which: str) -> None:
    out = tmp_path / "out"
    shard = _last_shard(big["a"])
    replacement = big["other"] / shard.name

    def replace(proc) -> None:
        os.replace(replacement, shard)  # same size and header, other data: a new file

    proc, acted = act_during_run(_big_argv(big, tmp_path, which, out), out, replace)
    if not acted:
        pytest.skip("the command finished before the input could be replaced")
    assert proc.returncode == 2, proc.stderr_text
    assert "was replaced by another file" in proc.stderr_text and str(shard) in proc.stderr_text
    _assert_nothing_left(out)


@pytest.mark.parametrize("which", COMMANDS)
def test_sigterm_is_like_ctrl_c(big, tmp_path: Path, which: str) -> None:
    out = tmp_path / "out"
    before = snapshot(*big.values())
    argv = _big_argv(big, tmp_path, which, out)
    proc, acted = act_during_run(argv, out, lambda p: p.send_signal(signal.SIGTERM))
    if not acted:
        pytest.skip("the command finished before the signal")
    assert proc.returncode == 143, proc.stderr_text
    assert proc.stderr_text.strip().splitlines() == [
        line for line in proc.stderr_text.strip().splitlines() if "terminated (SIGTERM)" in line
    ], proc.stderr_text
    assert not out.exists()
    assert snapshot(*big.values()) == before
    # Every command keeps what it finished (its own job, or an intermediate's, such as the
    # SVD merges' .out.factors.partial) and releases its locks: --resume continues it.
    left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
    assert all(name.endswith(".partial") for name in left), left
    if left:
        assert "--resume" in proc.stderr_text
        assert run_cli(*argv, "--resume") == 0
        assert out.is_dir()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# -- hostile recipes ---------------------------------------------------------------------------

HOSTILE = ["alias-bomb", "deep-nesting", "50MB", "dev-zero", "fifo", "dev-zero-model", "fifo-model"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_recipe_is_refused(family: dict[str, Path], tmp_path: Path, case: str) -> None:
    recipe = {c: (p, f) for c, p, f in hostile_recipes(tmp_path / "r", family)}
    path, fragment = recipe[case]
    out = tmp_path / "merged"
    before = snapshot(*family.values())
    proc = run_cli_subprocess("merge", path, "-o", out, "-q")  # bounded by its timeout
    assert_refused(proc, fragment)
    _assert_nothing_left(out)
    assert snapshot(*family.values()) == before


# -- disk full, damaged manifests --------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest):
    """A 64 kB tmpfs, or of the size given by indirect parametrization (needs root; skipped
    where mounting is not permitted)."""
    import subprocess

    where = tmp_path / "disk"
    where.mkdir()
    size = getattr(request, "param", "64k")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.parametrize("which", COMMANDS)
def test_disk_full(family: dict[str, Path], tmp_path: Path, small_disk: Path, which: str) -> None:
    out = small_disk / "result"
    before = snapshot(*family.values())
    proc = run_cli_subprocess(*_argv(family, tmp_path, which, out), "-q")
    # names the output (or the hidden sibling it is being written to) and the way out
    assert_refused(proc, f"{small_disk}/", "result", "free disk space")
    assert "free" in proc.stderr and ("needs" in proc.stderr or "No space" in proc.stderr)
    _assert_nothing_left(out)
    assert snapshot(*family.values()) == before


@pytest.mark.parametrize("small_disk", ["160k"], indirect=True)  # room for the job files
def test_a_disk_that_fills_during_the_writes_is_named_as_the_output(
    family: dict[str, Path], tmp_path: Path, small_disk: Path
) -> None:
    # --resume skips the free-space check made before a run: the disk fills while the blocks
    # are written, and the error (raised in a block task) used to name the unfinished copy
    # (.result.partial), not the output asked for
    out = small_disk / "result"
    proc = run_cli_subprocess("diff", family["base"], family["a"], "-o", out, "-q", "--resume")
    assert_refused(proc, f"cannot write {out}: disk full", "free disk space")
    assert ".partial" not in proc.stderr
    _assert_nothing_left(out)


@pytest.mark.parametrize(
    "content",
    [b"not json {", b"\xff\xfe", b"[1, 2]", b'{"tensors": {"w": {"xxh3_128": "00"}}}'],
    ids=["not-json", "not-utf8", "not-a-mapping", "no-block-rows"],
)
def test_damaged_manifest_is_refused_by_verify(
    family: dict[str, Path], tmp_path: Path, content: bytes
) -> None:
    out = tmp_path / "edited"
    assert run_cli(*_argv(family, tmp_path, "combine", out), "-q") == 0
    (out / "streamvec.json").write_bytes(content)
    proc = run_cli_subprocess("verify", out, "-q")
    assert_refused(proc, "streamvec.json", "recompute it")
