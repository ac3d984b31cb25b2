"""``streamvec bench``: every step runs end to end and reports sane, complete figures.

Never asserts on time beyond its sign: the machine is shared, only the presence, sign and
internal consistency of figures are checked.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamvec.cli.main import build_parser
from streamvec.tools import benchmark as bench
from streamvec.tools.benchmark import RESULT_FIELDS, format_table, plots, run_bench
from streamvec.tools.benchmark import cache as page_cache

from .conftest import BF16, run_cli

ENGINE_STAGES = {"read", "compute", "encode", "write", "checksum", "blocks_wall", "finish_wall"}


def _check_record(r: dict[str, Any], mode: str, repeat: int) -> None:
    assert set(RESULT_FIELDS) <= set(r), set(RESULT_FIELDS) - set(r)
    assert r["mode"] == mode and r["params"] > 0
    assert r["input_bytes"] > 0 and r["output_bytes"] > 0 and r["output_logical_bytes"] > 0
    for key in (
        "seconds",
        "input_gbps",
        "output_gbps",
        "read_roofline_gbps",
        "write_roofline_gbps",
        "write_roofline_nosync_gbps",
        "ratio_input_to_read_roofline",
        "ratio_output_to_write_roofline",
        "roofline_seconds",
        "ratio_to_roofline",
    ):
        assert r[key] > 0, key
    # The ratios are what the docs say they are, computed from the record's own figures.
    roof = (
        r["input_bytes"] / r["read_roofline_gbps"] + r["output_bytes"] / r["write_roofline_gbps"]
    ) / 1e9
    assert math.isclose(r["roofline_seconds"], roof, rel_tol=1e-9)
    assert math.isclose(r["ratio_to_roofline"], r["seconds"] / r["roofline_seconds"], rel_tol=1e-9)
    assert r["peak_anon_bytes"] > 0 and r["memory_limit_bytes"] > 0
    assert len(r["seconds_all"]) == repeat
    if r["step"] in bench.REPORTING:
        assert set(r["stage_seconds"]) >= ENGINE_STAGES
        assert all(v >= 0 for v in r["stage_seconds"].values())
        assert 0 < r["engine_seconds"] <= r["seconds"] and r["engine_workers"] >= 1
        if mode == "subprocess":
            assert r["startup_seconds"] > 0
        else:
            assert r["startup_seconds"] is None
    else:
        assert r["stage_seconds"] is None and r["engine_seconds"] is None
        assert r["startup_seconds"] is None and r["engine_workers"] is None


def _check_results(data: dict, steps: list[str], mode: str) -> None:
    assert set(data) >= {"machine", "settings", "results", "result_fields", "plots"}
    assert data["machine"]["cpus"] >= 1
    assert [r["step"] for r in data["results"]] == steps
    for r in data["results"]:
        _check_record(r, mode, data["settings"]["repeat"])


def _check_plots(out: Path, names: list[str]) -> None:
    image = pytest.importorskip("matplotlib.image")
    assert names == ["bench-throughput.png", "bench-memory.png", "bench-time-split.png"]
    for name in names:
        pixels = image.imread(out / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_quick_bench_every_step_as_subprocesses(tmp_path: Path) -> None:
    """The CLI entry point, every step as a real subprocess (what users run), with plots."""
    out, work = tmp_path / "out", tmp_path / "work"
    code = run_cli("bench", "--quick", "--size", "2M", "--out", out, "--workdir", work, "-q")
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    _check_results(data, list(bench.STEPS), "subprocess")
    by_step = {r["step"]: r for r in data["results"]}
    # Same task vector, stored without compression: same logical bytes, more on disk.
    raw, lz4 = by_step["diff-raw"], by_step["diff"]
    assert raw["output_logical_bytes"] == lz4["output_logical_bytes"]
    assert raw["output_bytes"] > lz4["output_bytes"]
    assert {r["cache"] for r in data["results"]} == {"warm"}
    assert all(r["cache_resident_fraction"] is None for r in data["results"])
    # torch.svd_lowrank (installed for the tests) ran next to each svd run, on the same store.
    peer = by_step["svd"]["notes"]["peers"]["torch.svd_lowrank"]
    assert len(peer["seconds_all"]) == data["settings"]["repeat"]
    assert math.isclose(peer["ratio"], by_step["svd"]["seconds"] / peer["seconds"])
    # the peer's whole process (start-up included) is longer than its timed loop
    assert peer["process_seconds"] > peer["seconds"] > 0
    assert math.isclose(peer["process_ratio"], by_step["svd"]["seconds"] / peer["process_seconds"])
    assert 0 < peer["mean_residual"] < 1 and 0 < peer["step_mean_residual"] < 1
    assert [r for r in data["results"] if r["step"] != "svd" and "peers" in r["notes"]] == []
    if plots.available():
        _check_plots(out, data["plots"])
    # Without --keep the checkpoints and outputs are gone; the given workdir itself stays.
    assert work.is_dir() and not any(work.iterdir())


def _fadvise_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Cold runs in tests evict only their own files: never the shared machine's whole cache."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    unwritable = tmp_path / "drop_caches"
    unwritable.mkdir()  # writing a directory fails, as /proc/sys/vm/drop_caches does unprivileged
    monkeypatch.setattr(page_cache, "DROP_CACHES", unwritable)


def test_bench_in_process_cold_keep_and_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamvec.tools import synth

    _fadvise_only(monkeypatch, tmp_path)
    work = tmp_path / "work"
    kwargs: dict[str, Any] = dict(
        workdir=work, steps=("combine-ckpt",), memory_limit="1GB", in_process=True, quiet=True
    )
    first = run_bench(["2M"], json_path=tmp_path / "a.json", keep=True, plots=False, **kwargs)
    assert (work / "base-2M").is_dir() and (work / "edited-ckpt-2M").is_dir()
    assert not (work / "tau-2M.zarr").exists()  # nothing asked for diff's store

    def no_rebuild(*args: object, **kw: object) -> None:
        raise AssertionError("the pair left by --keep should have been reused")

    monkeypatch.setattr(synth, "build_checkpoint", no_rebuild)
    second = run_bench(
        ["2M"], json_path=tmp_path / "b.json", repeat=2, cold=True, plots=False, **kwargs
    )
    # Without keep this time, the multi-GB files go once the size is measured.
    assert not (work / "base-2M").exists() and not (work / "edited-ckpt-2M").exists()
    assert first[0].input_bytes == second[0].input_bytes
    data = json.loads((tmp_path / "b.json").read_text())
    _check_results(data, ["combine-ckpt"], "in-process")
    record = data["results"][0]
    assert record["memory_limit_bytes"] == 10**9
    assert data["settings"]["cold_method"] == "fadvise"
    assert record["cache"] == "cold (fadvise)", record["notes"]["cache_resident_fraction_all"]
    assert record["cache_resident_fraction"] is None or record["cache_resident_fraction"] <= 0.05
    # --no-plots: none written, none listed.
    assert data["plots"] == [] and not list(tmp_path.glob("*.png"))
    table = format_table(second)
    assert "2M" in table and "combine-ckpt" in table and "x roofline" in table
    assert "cold (fadvise)" in table


def test_cold_is_not_claimed_when_the_inputs_stay_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A drop_caches that accepts the write but drops nothing: the check must catch it.
    fake = tmp_path / "drop_caches"
    fake.write_text("0")
    monkeypatch.setattr(page_cache, "DROP_CACHES", fake)
    data = tmp_path / "input.bin"
    data.write_bytes(os.urandom(1 << 20))  # just written: in the page cache
    cache = bench.PageCache.cold()
    assert cache.method == "drop_caches" and fake.read_text() == "1"
    left = cache.drop([data])
    if left is None:
        pytest.skip("mincore is not available here: residency cannot be checked")
    assert left > 0.5
    assert cache.label(left).startswith("not cold (drop_caches left")
    assert cache.label(0.0) == "cold (drop_caches)" and bench.PageCache().label(None) == "warm"


def test_cold_without_any_method_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    unwritable = tmp_path / "drop_caches"
    unwritable.mkdir()
    monkeypatch.setattr(page_cache, "DROP_CACHES", unwritable)
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    assert run_cli("bench", "--quick", "--cold", "--out", tmp_path, "--workdir", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert "--cold" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bench.json").exists()


def test_missing_matplotlib_skips_plots_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(plots, "available", lambda: False)
    run_bench(
        ["2M"],
        workdir=tmp_path / "work",
        json_path=tmp_path / "bench.json",
        steps=("diff",),
        in_process=True,
        quiet=True,
    )
    err = capsys.readouterr().err
    assert "pip install 'streamvec[bench]'" in err and len(err.strip().splitlines()) == 1
    data = json.loads((tmp_path / "bench.json").read_text())
    _check_results(data, ["diff"], "in-process")
    assert data["plots"] == [] and not list(tmp_path.glob("*.png"))


def _fake_record(step: str, size: str, params: int, stages: bool) -> dict[str, Any]:
    return {
        "step": step,
        "size": size,
        "params": params,
        "input_bytes": 4 * params,
        "roofline_seconds": 0.5,
        "input_gbps": 0.2,
        "peak_anon_bytes": 200 << 20,
        "memory_limit_bytes": 8 << 30,
        "seconds": 5.0,
        "engine_seconds": 4.0 if stages else None,
        "startup_seconds": 1.0 if stages else None,
        "engine_workers": 2 if stages else None,
        "workers": None,
        "cache": "warm",
        "stage_seconds": {
            "read": 1.0,
            "compute": 2.0,
            "encode": 1.0,
            "write": 1.0,
            "checksum": 1.0,
            "blocks_wall": 3.5,
            "finish_wall": 0.3,
        }
        if stages
        else None,
        "notes": {"load_average_1min_all": [1.5]},
    }


def test_plots_of_several_sizes_and_the_time_split(tmp_path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    results = [
        _fake_record(step, size, params, step == "diff")
        for size, params in (("0.1B", 10**8), ("1B", 10**9))
        for step in ("diff", "svd")
    ]
    data = {"machine": {"cpus": 2}, "settings": {"mode": "subprocess"}, "results": results}
    names = plots.write_plots(data, tmp_path, prefix="multi")
    assert names == ["multi-throughput.png", "multi-memory.png", "multi-time-split.png"]
    for name in names:
        assert image.imread(tmp_path / name).shape[0] > 100
    # Stages are worker-seconds: divided by 2 workers (3.0 s of 3.5 s blocks wall), plus what
    # the blocks' wall clock saw beyond them, setup, finish and start-up: the wall time.
    split = dict(plots.time_split(results[0]))
    assert split["compute"] == 1.0 and math.isclose(split[plots.OTHER], 0.5)
    assert math.isclose(split[plots.SETUP], 4.0 - 3.5 - 0.3)
    assert math.isclose(sum(split.values()), results[0]["seconds"])
    assert plots.time_split(results[1]) == []


def test_steps_and_rooflines() -> None:
    assert bench.steps_to_run(["svd"]) == ["diff", "svd"]
    assert bench.steps_to_run(["merge", "combine-ckpt"]) == ["combine-ckpt", "merge"]
    assert bench.parse_steps("merge,diff") == ["diff", "merge"]
    assert bench.roofline_seconds(2 * 10**9, 10**9, 2.0, 0.5) == 3.0


def test_docs_list_every_result_field() -> None:
    """docs/benchmarks.md documents each field a record holds, by its JSON name."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    assert [f for f in (*RESULT_FIELDS, "notes") if f"`{f}`" not in docs] == []
    assert all(f"`{step}`" in docs for step in bench.STEPS)


def test_the_command_line_has_bench() -> None:
    args = build_parser().parse_args(
        ["bench", "--quick", "--size", "1B", "--out", "x", "--cold", "--no-plots"]
    )
    assert args.quick and args.size == ["1B"] and args.out == Path("x")
    assert args.cold and args.no_plots and args.steps == ",".join(bench.STEPS)
    assert callable(args.func)


def test_unknown_steps_are_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("bench", "--quick", "--steps", "diff,bogus", "--out", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert "--steps" in err and "bogus" in err and len(err.splitlines()) == 1


# -- the store write path the benchmark measures ----------------------------------------------
# ZarrBlockWriter encodes and writes whole chunks itself (the speed-up measured above); these
# check that it writes exactly the files zarr's own Array.__setitem__ writes.


def _store_cases() -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    return {
        "m": (np.dtype(np.float32), (37, 5), 8),  # partial last chunk
        "v": (np.dtype(np.float32), (13,), 4),
        "s": (np.dtype(np.float32), (), 1),
        "b": (BF16, (20, 6), 7),
        "z": (np.dtype(np.float32), (16, 4), 4),  # all-zero chunks, one holding only -0.0
        "c4": (np.dtype(np.float64), (5, 2, 3, 2), 2),
        "e": (np.dtype(np.float32), (0, 3), 1),
        "h": (np.dtype(np.float16), (3, 4), 3),
    }


def _write_store(
    path: Path, values: dict[str, np.ndarray], compression: str, via_zarr: bool
) -> None:
    from streamvec.io.blocks import matrix_shape
    from streamvec.io.zarr import store as zs

    cases = _store_cases()
    specs = [
        zs.ArraySpec(k, sh, dt, cr, {"source_dtype": "bfloat16"})
        for k, (dt, sh, cr) in cases.items()
    ]
    metas = zs.create_store(path, {"format": 1}, specs, compression)
    for k, (_, shape, chunk_rows) in cases.items():
        writer = zs.ZarrBlockWriter(str(path), k, shape, metas[k])
        rows, cols = matrix_shape(shape)
        matrix = values[k].reshape(rows, cols)
        for r0 in range(0, max(rows, 1), chunk_rows):
            block = matrix[r0 : r0 + chunk_rows]
            if via_zarr:
                raw = block.view(np.uint16) if block.dtype == BF16 else block
                writer._write_with_zarr(
                    r0, raw.reshape((raw.shape[0], *shape[1:]) if shape else ())
                )
            else:
                writer.write(r0, block)
    zs.set_array_attrs(
        path, {k: {"xxh3_128": "0", "checksum_block_rows": c[2]} for k, c in cases.items()}
    )
    zs.consolidate(path, root_attrs={"kind": "task_vector"})


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
def test_store_fast_path_writes_what_zarr_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    import zarr

    from streamvec.io.zarr import store as zs

    rng = np.random.default_rng(0)
    values = {}
    for k, (dt, shape, _) in _store_cases().items():
        v = np.asarray(rng.standard_normal(shape) * 1e-3, dtype=np.float32).astype(dt)
        if k == "z":
            v[:8] = 0
            v[12:16] = 0
            v[12, 1] = -0.0  # not the fill value's bits: zarr stores this chunk
        values[k] = v
    _write_store(tmp_path / "zarr", values, compression, via_zarr=True)

    def no_fallback(self: object, r0: int, data: np.ndarray) -> None:
        raise AssertionError("whole-chunk blocks must not go through zarr's setitem")

    monkeypatch.setattr(zs.ZarrBlockWriter, "_write_with_zarr", no_fallback)
    _write_store(tmp_path / "fast", values, compression, via_zarr=False)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    want, got = files(tmp_path / "zarr"), files(tmp_path / "fast")
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    assert "z/c/0/0" not in got and "z/c/3/0" in got  # empty chunks skipped, -0.0 kept
    group = zarr.open_group(str(tmp_path / "fast"), mode="r")
    for k, v in values.items():
        stored = np.asarray(group[k][...])
        assert stored.tobytes() == (v.view(np.uint16) if v.dtype == BF16 else v).tobytes(), k
        assert group[k].attrs["name"] == k and "xxh3_128" in group[k].attrs


def test_unaligned_blocks_fall_back_to_zarr(tmp_path: Path) -> None:
    import zarr

    from streamvec.io.zarr import store as zs

    metas = zs.create_store(
        tmp_path, {"format": 1}, [zs.ArraySpec("a", (10, 3), np.dtype(np.float32), 4, {})]
    )
    writer = zs.ZarrBlockWriter(str(tmp_path), "a", (10, 3), metas["a"])
    data = np.arange(30, dtype=np.float32).reshape(10, 3)
    for r0, r1 in [(0, 3), (3, 9), (9, 10)]:  # none of these is exactly one chunk
        writer.write(r0, data[r0:r1])
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path), path="a")[...], data)


def test_unknown_compression_is_refused(tmp_path: Path) -> None:
    from streamvec.errors import StoreError
    from streamvec.io.zarr import store as zs

    with pytest.raises(StoreError, match="compression"):
        zs.create_store(tmp_path, {}, [], "brotli")


def test_a_workdir_of_the_users_files_is_refused_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the benchmark deletes what it writes in its work directory (base-0.1B, ft-0.1B, ...):
    # a folder of the user's that happens to have those names must never be among them
    mine = tmp_path / "models"
    (mine / "base-0.1B").mkdir(parents=True)
    (mine / "base-0.1B" / "weights.bin").write_bytes(b"mine")
    code = run_cli("bench", "--quick", "--steps", "diff", "--workdir", mine, "--out", tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    assert f"--workdir {mine}: holds files that streamvec bench did not write" in err
    assert (mine / "base-0.1B" / "weights.bin").read_bytes() == b"mine"


def test_peak_sampler_counts_the_process_tree_as_psutil_finds_it() -> None:
    """The sampler's descendants (read from /proc/PID/task/TID/children where the kernel has
    them) are psutil's, grandchildren included, and their memory counts in the peak."""
    import subprocess
    import sys
    import time

    import psutil

    from streamvec.memory import PeakSampler, anon_bytes, descendants

    hold = "import numpy as n, time; a = n.ones(48 << 20, n.uint8); time.sleep(60)"
    spawn = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', {!r}]); time.sleep(60)"
    )
    top = subprocess.Popen([sys.executable, "-c", spawn.format(spawn.format(hold))])
    try:
        deadline = time.monotonic() + 60
        while len(tree := psutil.Process(top.pid).children(recursive=True)) < 2:
            assert time.monotonic() < deadline, "the grandchild did not start"
            time.sleep(0.05)
        assert sorted(descendants(top.pid)) == sorted(c.pid for c in tree)
        while max(anon_bytes(c.pid) for c in tree) < 48 << 20:
            assert time.monotonic() < deadline, "the grandchild did not allocate"
            time.sleep(0.05)
        with PeakSampler(top.pid) as sampler:
            time.sleep(0.05)
        assert sampler.peak >= 48 << 20
    finally:
        for c in psutil.Process(top.pid).children(recursive=True):
            c.kill()
        top.kill()
        top.wait()
    assert descendants(top.pid) == []
