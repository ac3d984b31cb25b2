"""The one job lifecycle (:class:`streamvec.engine.jobs.Job`) at the points a review found weak.

Each test here failed on the first version of the lifecycle:

* an interrupted ``lora`` whose spilled layers were already removed could not resume;
* a user output ``.foo`` shared its partial output and lock with an output ``foo``;
* the factorizer returned the digests of the task read before, for a tensor of the same name;
* the byte budget of a factorization was taken anew by a resumed run (another plan);
* ``--no-check-finite`` was not part of the engine's job identity;
* a signal during ``merge-svd``'s final rename left its factors beside the finished output;
* ``--int-tensors`` was not part of the engine's job identity (a changed policy was refused,
  if at all, as an input "changed since the unfinished run");
* a signal during an ``--overwrite``'s final renames was raised before the old output was
  removed (``.OUT.old`` was left beside the new output), and the command said "no output was
  finished" about a complete output;
* a resumed SVD command given another ``--memory-limit`` (or ``--workers``, ``--block-size``)
  than the unfinished run's silently used the recorded one;
* a zarr chunk write still in flight in zarr's event loop when a failed run removed its
  partial output made the output's folders again (``test_disk_full[diff]`` left
  ``.OUT.partial`` behind about one run in six);
* a folder of the user's named as an intermediate (``.OUT.components``) was deleted by a
  ``shared_unique`` merge, whatever happened (the removal ran in a ``finally``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

import streamvec as sv
from streamvec.engine.jobs import DONE_LOG, JOB_FILE, whole_tensor_digests
from streamvec.engine.settings import Settings
from streamvec.io.output import OutputDir
from streamvec.ops.combine import TermSpec
from streamvec.ops.factorize import Factorizer, SVDOptions, dask_compute_kwargs, tensor_seed
from streamvec.ops.lora import lora

from .conftest import run_cli, run_cli_subprocess
from .test_reliability import SMALL, kill_after, output_bytes


def test_an_interrupted_lora_resumes_after_its_adapter_files_began(
    synth_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamvec.ops.lora as lora_module

    base, ft = synth_family["base"], synth_family["a"]
    options = SVDOptions(rank=4)
    reference = lora(
        base,
        [TermSpec(str(ft), 1.0)],
        tmp_path / "ref",
        options=options,
        run=Settings(progress=False),
    )
    real = lora_module.adapter_config
    calls = []

    def stop_once(**kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # after every layer is factored and the weights written
        return real(**kwargs)

    monkeypatch.setattr(lora_module, "adapter_config", stop_once)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        lora(base, [TermSpec(str(ft), 1.0)], out, options=options, run=Settings(progress=False))
    assert (tmp_path / ".out.partial" / ".factors").is_dir()  # kept for --resume
    lora(
        base,
        [TermSpec(str(ft), 1.0)],
        out,
        options=options,
        run=Settings(progress=False, resume=True),
    )
    assert output_bytes(out).keys() == output_bytes(reference.path).keys()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (reference.path / name).read_bytes()
    assert not (tmp_path / ".out.partial").exists()


def test_a_hidden_user_output_has_siblings_of_its_own(tmp_path: Path) -> None:
    plain, hidden = OutputDir(tmp_path / "foo", inputs=[]), OutputDir(tmp_path / ".foo", inputs=[])
    assert plain.partial != hidden.partial and plain.lock_path != hidden.lock_path
    intermediate = OutputDir(tmp_path / ".foo.factors", inputs=[], intermediate=True)
    assert intermediate.partial.name == ".foo.factors.partial"


def test_input_digests_are_those_of_the_tensor_just_factored(
    synth_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    a = (sv.open(synth_family["a"]) - sv.open(synth_family["base"])).resolved().tensors[name]
    b = (sv.open(synth_family["b"]) - sv.open(synth_family["base"])).resolved().tensors[name]
    with dask_compute_kwargs("sync", 1) as kwargs:
        f = Factorizer(SVDOptions(rank=2, method="randomized"), Settings(workers=1), kwargs)
        f.factor(a, 2, tensor_seed(0, name))  # held: its digests kept
        monkeypatch.setattr(Factorizer, "_can_hold", lambda *args: False)
        f.factor(b, 2, tensor_seed(0, name))  # streamed: same name, other inputs
        assert f.input_digests(b) == whole_tensor_digests(b)
        assert f.input_digests(b) != whole_tensor_digests(a)


def test_a_resumed_factorization_plans_with_the_recorded_byte_budget(
    synth_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sv"
    cmd = [
        "svd",
        str(synth_family["a"]),
        "--base",
        str(synth_family["base"]),
        "-o",
        str(out),
        "-q",
        "--rank",
        "2",
        "--method",
        "randomized",
        *SMALL,
    ]
    kill_after(cmd, out, 2)
    record = json.loads((tmp_path / ".sv.partial" / JOB_FILE).read_text())
    budget = record["budget"]["bytes"]
    assert isinstance(budget, int) and budget > 0
    seen = []
    real = Factorizer.__init__

    def spy(self, options, run, kwargs, budget=None):  # type: ignore[no-untyped-def]
        seen.append(budget)
        real(self, options, run, kwargs, budget)

    monkeypatch.setattr(Factorizer, "__init__", spy)
    assert run_cli(*cmd, "--resume") == 0
    assert seen == [budget]


def test_resuming_with_the_finite_check_after_a_run_without_it_is_refused(
    synth_family: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "tv"
    cmd = ["diff", str(synth_family["base"]), str(synth_family["a"]), "-o", str(out), "-q", *SMALL]
    kill_after([*cmd, "--no-check-finite"], out, 2)
    assert (tmp_path / ".tv.partial" / DONE_LOG).is_file()
    proc = run_cli_subprocess(*cmd, "--resume")
    assert proc.returncode == 2, proc.stderr
    assert "cannot resume" in proc.stderr and "check_finite" in proc.stderr
    assert (tmp_path / ".tv.partial").is_dir()  # a refused resume deletes nothing


def test_numpy_integers_are_worker_counts() -> None:
    assert Settings(workers=np.int64(2)).resolved_workers() == 2


def test_a_signal_during_merge_svds_final_rename_leaves_no_factors(
    synth_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = OutputDir.commit

    def commit_then_signal(self: OutputDir) -> Path:
        real(self)
        raise KeyboardInterrupt  # as a signal deferred during the renames is raised after them

    monkeypatch.setattr(OutputDir, "commit", commit_then_signal)
    out = tmp_path / "out"
    a, b, base = (str(synth_family[k]) for k in ("a", "b", "base"))
    code = run_cli("merge-svd", "tsv", a, b, "--base", base, "-o", out, "-q", "--rank", "2")
    assert code == 130
    assert out.is_dir()  # the output is complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and nothing is left beside it


def test_resuming_with_another_int_tensor_policy_is_refused(
    synth_family: dict[str, Path], tmp_path: Path
) -> None:
    # The policy decides which file a changed int tensor is read from, and shows in neither
    # the expression nor the attrs: it must be part of the job's identity.
    out = tmp_path / "m"
    base, a = str(synth_family["base"]), str(synth_family["a"])
    cmd = ["combine", "--base", base, f"{a}:0.5", "-o", str(out), "-q", *SMALL]
    kill_after([*cmd, "--int-tensors", "base"], out, 2)
    proc = run_cli_subprocess(*cmd, "--int-tensors", "finetune", "--resume")
    assert proc.returncode == 2, proc.stderr
    assert "cannot resume" in proc.stderr and "int_tensors" in proc.stderr
    assert run_cli(*cmd, "--int-tensors", "base", "--resume") == 0


def test_a_signal_during_the_final_rename_is_raised_once_the_output_is_finished(
    synth_family: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "tv"
    base, a = str(synth_family["base"]), str(synth_family["a"])
    cmd = ["diff", base, a, "-o", str(out), "-q"]
    assert run_cli(*cmd) == 0  # an old output for --overwrite to replace
    real_replace = os.replace

    def replace_then_signal(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_replace(src, dst)
        if Path(dst) == out:  # Ctrl-C just as the new output takes its name
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_signal)
    capsys.readouterr()
    assert run_cli(*cmd, "--overwrite") == 130
    err = capsys.readouterr().err
    assert f"interrupted after {out} was finished; it is complete" in err, err
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv"]  # no old output, no lock
    assert run_cli("verify", out) == 0


def test_a_resume_given_another_budget_is_refused_with_the_recorded_one(
    synth_family: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "sv"
    a, base = str(synth_family["a"]), str(synth_family["base"])
    cmd = ["svd", a, "--base", base, "-o", str(out), "-q", "--rank", "2", "--method", "randomized"]
    kill_after([*cmd, "--memory-limit", "2GB", *SMALL], out, 2)
    proc = run_cli_subprocess(*cmd, "--memory-limit", "1GB", *SMALL, "--resume")
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "cannot resume with --memory-limit 1GB" in line and "2000000000 (2.00 GB)" in line
    assert "rerun with --memory-limit 2000000000" in line and len(line.splitlines()) == 1
    assert (tmp_path / ".sv.partial").is_dir()  # kept for a resume with the recorded limit
    # without the flag (or with the same value) the recorded budget is used
    assert run_cli(*cmd, *SMALL, "--resume") == 0


def test_a_zarr_write_in_flight_does_not_bring_a_removed_output_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zarr
    from zarr.storage import LocalStore

    out = OutputDir(tmp_path / "o", inputs=[])
    out.open(keep_partial=False)
    arr = zarr.create_array(str(out.partial / "a"), shape=(4,), chunks=(1,), dtype="f4")
    real_set = LocalStore.set

    async def slow_set(self, key, value, *args, **kwargs):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.5)  # still in flight when the output is removed
        return await real_set(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", slow_set)

    def write() -> None:
        try:
            arr[:] = np.arange(4, dtype="f4")
        except OSError:
            pass  # its folder was removed under it: that is the point

    writer = threading.Thread(target=write)
    writer.start()
    while not list(asyncio.all_tasks(zarr.core.sync.loop[0])):  # type: ignore[arg-type]
        pass
    out.abort()
    writer.join()
    assert not out.partial.exists()


def test_errors_name_the_output_the_user_asked_for() -> None:
    from streamvec.engine.sinks import MANIFEST_NAME
    from streamvec.io.output import OUTPUT_MANIFESTS, shown_output
    from streamvec.ops.decompose import MANIFEST

    assert set(OUTPUT_MANIFESTS) == {MANIFEST_NAME, MANIFEST}  # what marks streamvec's outputs

    assert shown_output(Path("/d/out")) == Path("/d/out")
    assert shown_output(Path("/d/.out")) == Path("/d/.out")  # a user's own hidden output
    # a part of another run's unfinished output (decompose's unique stores)
    assert shown_output(Path("/d/.out.partial/a.unique.zarr")) == Path("/d/out")
    assert shown_output(Path("/d/.out.partial/.a.zarr.partial/x")) == Path("/d/out")
    # the hidden sibling of merge-svd's factors, of shared_unique's components
    assert shown_output(Path("/d/.out.factors"), intermediate=True) == Path("/d/out")
    assert shown_output(Path("/d/.o.u.t.components"), intermediate=True) == Path("/d/o.u.t")


@pytest.mark.parametrize(
    ("method", "hidden"), [("shared_unique", "components"), ("tsv", "factors")]
)
def test_a_users_folder_under_an_intermediates_name_is_never_replaced(
    synth_family: dict[str, Path], tmp_path: Path, method: str, hidden: str
) -> None:
    from .faults import recipe

    mine = tmp_path / f".out.{hidden}"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    params = "rank: 2, threshold: 0.5" if method == "shared_unique" else "rank: 2"
    path = recipe(tmp_path / "r.yaml", method, synth_family, params)
    proc = run_cli_subprocess("merge", path, "-o", tmp_path / "out", "-q", *SMALL)
    assert proc.returncode == 2, proc.stderr
    assert f"{mine} exists and was not written by streamvec" in proc.stderr
    assert (mine / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_an_output_is_finished_until_it_is_written_anew(tmp_path: Path) -> None:
    # what the CLI and merge-svd ask after a signal: a second run writing the same output in
    # one process (the Python API) is not "finished" because the first one was
    from streamvec.io.output import finished

    out = OutputDir(tmp_path / "o", inputs=[])
    out.open()
    out.commit()
    assert finished(tmp_path / "o")
    again = OutputDir(tmp_path / "o", inputs=[], overwrite=True)
    again.open()
    assert not finished(tmp_path / "o")
    again.abort()
