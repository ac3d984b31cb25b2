"""Signals and errors that arrive mid-run leave no lock, no stray partial output, no straggler.

These drive the windows deterministically in-process (a patched step sends the signal, or a
block task waits for the abort), where tests/test_faults.py can only hit them by timing.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

import streamvec.engine.execute as engine
import streamvec.engine.jobs as jobs
from streamvec import signals
from streamvec.errors import StreamvecError
from streamvec.io.output import OutputDir
from tests.conftest import run_cli


def _left(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_inside_a_deferred_step_is_raised_when_it_ends() -> None:
    steps = []
    with signals.installed():
        with pytest.raises(signals.Terminated):
            with signals.deferred():
                _sigterm_self()
                steps.append("after the signal")  # still inside: not cut short
            steps.append("never")  # raised on leaving the deferred step
    assert steps == ["after the signal"]


def test_outside_a_deferred_step_the_signal_is_raised_at_once() -> None:
    with signals.installed():
        with pytest.raises(signals.Terminated):
            _sigterm_self()
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
            raise AssertionError("not raised")


def test_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with signals.installed():
        assert signal.getsignal(signal.SIGTERM) is not before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_signal_while_taking_the_lock_leaves_it_owned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    import streamvec.io.output as output

    real_flock = fcntl.flock

    def flock_then_signal(fd: int, op: int) -> None:
        real_flock(fd, op)
        _sigterm_self()

    monkeypatch.setattr(output.fcntl, "flock", flock_then_signal)
    out = OutputDir(tmp_path / "out", inputs=[])
    with signals.installed(), pytest.raises(signals.Terminated):
        out.open()
    monkeypatch.undo()
    # Raised only once the lock and the partial directory were both made and recorded, so
    # the run's cleanup (abort on error, release on a signal) knows what to remove.
    assert out.partial.is_dir() and out.lock_path.exists()
    out.abort()
    assert _left(tmp_path / "out") == []


def test_refused_open_never_removes_another_runs_partial(tmp_path: Path) -> None:
    first = OutputDir(tmp_path / "out", inputs=[])
    first.open()
    (first.partial / "block").write_bytes(b"theirs")
    second = OutputDir(tmp_path / "out", inputs=[])
    with pytest.raises(StreamvecError, match="another streamvec run"):
        second.open()
    second.abort()  # what a command's error path does
    assert (first.partial / "block").read_bytes() == b"theirs"
    first.abort()
    assert _left(tmp_path / "out") == []


def test_sigterm_while_the_engine_reads_the_job_record_releases_the_lock(
    synth_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "tv"
    argv = ["diff", synth_family["base"], synth_family["a"], "-o", out, "-q", "--resume"]
    partial = out.parent / f".{out.name}.partial"
    partial.mkdir()  # an unfinished run to continue: the engine reads its job record
    real_read_job = jobs.read_job

    def read_job_then_signal(path: Path):  # type: ignore[no-untyped-def]
        _sigterm_self()
        return real_read_job(path)

    monkeypatch.setattr(jobs, "read_job", read_job_then_signal)
    assert run_cli(*argv) == 128 + signal.SIGTERM
    # The lock is released; the partial output stays for --resume, which then finishes.
    assert _left(out) == [f".{out.name}.partial"]
    monkeypatch.undo()
    assert run_cli(*argv) == 0
    assert out.is_dir() and _left(out) == []


def test_blocks_still_running_when_a_block_fails_finish_before_the_cleanup(
    synth_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "tv"
    aborted = threading.Event()
    failed = threading.Event()
    started = threading.Event()
    wrote_after_abort: list[bool] = []
    real_task, real_abort = engine._block_task, OutputDir.abort
    calls = iter(range(10**6))
    lock = threading.Lock()

    def task(t, r0, r1, writer, *args):  # type: ignore[no-untyped-def]
        with lock:
            n = next(calls)
        if n == 0:
            started.wait(10)  # fail once the other worker is inside its block
            failed.set()
            raise StreamvecError(f"{t.name}: a bad block")
        if n == 1:
            # A straggler: still computing when the first block failed. Its write must not
            # land after the partial output was removed (it would bring the directory back).
            started.set()
            failed.wait(10)
            aborted.wait(1.0)
            wrote_after_abort.append(aborted.is_set())
        return real_task(t, r0, r1, writer, *args)

    def abort(self: OutputDir) -> None:
        aborted.set()
        real_abort(self)

    monkeypatch.setattr(engine, "_block_task", task)
    monkeypatch.setattr(OutputDir, "abort", abort)
    argv = ["diff", synth_family["base"], synth_family["a"], "-o", out, "-q", "--workers", "2"]
    assert run_cli(*argv) == 2
    assert wrote_after_abort and not any(wrote_after_abort)
    assert not out.exists() and _left(out) == []


def test_svd_stopped_before_its_store_existed_resumes(
    synth_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM after the job record was written but before the SVD store was created."""
    import streamvec.ops.svd as svd

    out = tmp_path / "f"
    argv = ["svd", synth_family["a"], "--base", synth_family["base"], "-o", out, "--rank", "2"]
    real = svd.Factorizer.__init__

    def signal_then_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _sigterm_self()
        real(self, *args, **kwargs)

    monkeypatch.setattr(svd.Factorizer, "__init__", signal_then_init)
    assert run_cli(*argv, "-q") == 128 + signal.SIGTERM
    assert _left(out) == [f".{out.name}.partial"]
    monkeypatch.undo()
    assert run_cli(*argv, "-q", "--resume") == 0
    assert out.is_dir() and _left(out) == []
