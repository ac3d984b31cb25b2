"""``diff``: task vectors into Zarr, checked against float64 numpy on whole tensors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

import streamvec as sv
from streamvec.names import encode_array_path

from .conftest import (
    BF16,
    modules_imported_by_cli,
    run_cli,
    run_cli_subprocess,
    write_checkpoint,
)

DTYPES = [BF16, np.dtype(np.float16), np.dtype(np.float32)]
FLOAT_NAMES = [
    "model.embed.weight",
    "model/odd/name.weight",
    "model.norm.weight",
    "model.scale",
    "model.conv.weight",
]


def read_store(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    out = {}
    for _, arr in group.arrays():
        out[arr.attrs["name"]] = np.asarray(arr[...])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(np.dtype(d)))
def test_diff_is_exact_and_round_trips(pair_factory, tmp_path: Path, dtype: np.dtype) -> None:
    base_dir, ft_dir, base, ft = pair_factory(dtype)
    out = tmp_path / "tau.zarr"
    # float64 storage for float32 inputs: a float32 difference of float32 weights is rounded
    # in general, so only float64 can promise the exact round trip (see docs/task-arithmetic.md).
    extra = ["--dtype", "float64"] if np.dtype(dtype) == np.float32 else []
    assert run_cli("diff", base_dir, ft_dir, "-o", out, "-q", *extra) == 0
    tau = read_store(out)
    assert sorted(tau) == sorted(FLOAT_NAMES)
    for name in FLOAT_NAMES:
        b64, f64 = base[name].astype(np.float64), ft[name].astype(np.float64)
        store_dtype = np.float64 if extra else np.float32
        want = (f64 - b64).astype(store_dtype)
        assert tau[name].shape == base[name].shape
        assert tau[name].dtype == store_dtype
        np.testing.assert_array_equal(tau[name], want)
        # base + tau == ft bit for bit, in the base dtype.
        rebuilt = (base[name].astype(store_dtype) + tau[name]).astype(base[name].dtype)
        assert rebuilt.tobytes() == ft[name].tobytes(), name


def test_float32_diff_equals_float64_reference_rounded_once(pair_factory, tmp_path: Path) -> None:
    base_dir, ft_dir, base, ft = pair_factory(np.dtype(np.float32))
    tau = (sv.open(ft_dir) - sv.open(base_dir))["model.embed.weight"].compute()
    want = (ft["model.embed.weight"].astype(np.float64) - base["model.embed.weight"]).astype(
        np.float32
    )
    np.testing.assert_array_equal(tau, want)


def test_store_layout(pair_factory, tmp_path: Path) -> None:
    base_dir, ft_dir, *_ = pair_factory(BF16)
    out = tmp_path / "tau.zarr"
    assert run_cli("diff", base_dir, ft_dir, "-o", out, "-q") == 0
    group = zarr.open_group(str(out), mode="r")
    attrs = group.attrs["streamvec"]
    assert attrs["format"] == 1
    assert attrs["kind"] == "task_vector"
    assert attrs["created_by"].startswith("streamvec ")
    assert attrs["skipped_nonfloat"] == ["model.position_ids"]
    assert [s["path"] for s in attrs["sources"]] == [str(ft_dir), str(base_dir)]
    arr = group[encode_array_path("model/odd/name.weight")]
    assert encode_array_path("model/odd/name.weight") == "model%2Fodd%2Fname.weight"
    assert arr.attrs["name"] == "model/odd/name.weight"
    assert arr.attrs["source_dtype"] == "bfloat16"
    assert len(arr.attrs["xxh3_128"]) == 32
    # Consolidated metadata lets a reader list the store in one read.
    assert zarr.open_consolidated(str(out), mode="r").metadata.consolidated_metadata is not None


def test_include_exclude_and_dtype(pair_factory, tmp_path: Path) -> None:
    base_dir, ft_dir, base, ft = pair_factory(BF16)
    out = tmp_path / "attn.zarr"
    code = run_cli(
        "diff",
        base_dir,
        ft_dir,
        "-o",
        out,
        "-q",
        "--include",
        "model.*",
        "--exclude",
        "*.norm.*",
        "--dtype",
        "bfloat16",
    )
    assert code == 0
    tau = zarr.open_group(str(out), mode="r")
    names = {a.attrs["name"] for _, a in tau.arrays()}
    assert names == {"model.embed.weight", "model.scale", "model.conv.weight"}
    arr = tau["model.embed.weight"]
    assert arr.attrs["dtype"] == "bfloat16"
    got = np.asarray(arr[...]).view(BF16)
    want = (ft["model.embed.weight"].astype(np.float64) - base["model.embed.weight"]).astype(BF16)
    np.testing.assert_array_equal(got, want)
    # streamvec reads its bf16 arrays back as bf16
    back = sv.open(out)["model.embed.weight"]
    assert back.dtype == np.float32  # a task vector read as a term computes in float32
    np.testing.assert_array_equal(back.compute(), want.astype(np.float32))


def test_python_api_is_lazy_and_gives_dask_arrays(pair_factory, tmp_path: Path) -> None:
    base_dir, ft_dir, base, ft = pair_factory(BF16)
    tau = sv.open(ft_dir) - sv.open(base_dir)
    assert "model.position_ids" not in tau
    t = tau["model.embed.weight"]
    arr = t.to_dask(block_rows=64)
    assert arr.chunks[0] == (64, 64, 64, 64, 1)
    want = ft["model.embed.weight"].astype(np.float64) - base["model.embed.weight"]
    np.testing.assert_array_equal(arr.compute(), want.astype(np.float32))
    assert tau["model.scale"].to_dask().compute().shape == ()
    report = tau.save(tmp_path / "api.zarr", progress=False)
    assert report.tensors == len(FLOAT_NAMES)
    assert report.skipped_nonfloat == ("model.position_ids",)


def test_small_blocks_match_one_block(pair_factory, tmp_path: Path) -> None:
    """A tight memory limit forces many row blocks; the result must not change."""
    base_dir, ft_dir, *_ = pair_factory(BF16)
    tau = sv.open(ft_dir) - sv.open(base_dir)
    tau.save(tmp_path / "big.zarr", progress=False)
    from streamvec.memory import anon_bytes

    limit = anon_bytes() + (256 << 20) + 40_000  # a few rows of the widest tensor per worker
    small = tau.save(tmp_path / "small.zarr", progress=False, memory_limit=limit, workers=2)
    a, b = read_store(tmp_path / "big.zarr"), read_store(tmp_path / "small.zarr")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert small.checksums["model.embed.weight"]["checksum_block_rows"] < 257


def test_mismatched_checkpoints_fail_cleanly(pair_factory, tmp_path: Path) -> None:
    base_dir, _, _, ft = pair_factory(BF16)
    other = dict(ft)
    other["model.norm.weight"] = np.zeros(47, dtype=BF16)  # wrong shape
    del other["model.scale"]  # missing
    bad = write_checkpoint(tmp_path / "bad", other)
    out = tmp_path / "tau.zarr"
    proc = run_cli_subprocess("diff", base_dir, bad, "-o", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model.scale (missing in" in lines[0]
    assert "model.norm.weight shapes differ" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not any(p.name.startswith(".tau.zarr") for p in tmp_path.iterdir())


def test_existing_output_is_refused(pair_factory, tmp_path: Path) -> None:
    base_dir, ft_dir, *_ = pair_factory(BF16)
    out = tmp_path / "tau.zarr"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli_subprocess("diff", base_dir, ft_dir, "-o", out)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("diff", base_dir, ft_dir, "-o", out, "-q", "--overwrite") == 0
    assert not (out / "keep.txt").exists()
    assert "model.embed.weight" in read_store(out)


def test_memory_limit_too_small_is_a_usage_error(pair_factory, tmp_path: Path) -> None:
    base_dir, ft_dir, *_ = pair_factory(BF16)
    proc = run_cli_subprocess(
        "diff", base_dir, ft_dir, "-o", tmp_path / "x.zarr", "--memory-limit", "1MB"
    )
    assert proc.returncode == 2
    assert "--memory-limit" in proc.stderr and "too small" in proc.stderr


def test_info_reads_headers(
    pair_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_dir, ft_dir, base, _ = pair_factory(BF16)
    assert run_cli("info", base_dir, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_tensors"] == len(base)
    assert info["total_bytes"] == sum(v.nbytes for v in base.values())
    by_name = {t["name"]: t for t in info["tensors"]}
    assert by_name["model.conv.weight"]["shape"] == [4, 3, 5, 6]
    assert by_name["model.conv.weight"]["dtype"] == "bfloat16"
    assert by_name["model.position_ids"]["dtype"] == "int64"
    assert run_cli("diff", base_dir, ft_dir, "-o", tmp_path / "t.zarr", "-q") == 0
    assert run_cli("info", tmp_path / "t.zarr") == 0
    text = capsys.readouterr().out
    assert "task_vector" in text and "model/odd/name.weight" in text


def test_info_into_a_closed_pipe_is_quiet(pair_factory) -> None:
    """`streamvec info ... | head`: the reader leaves early; no internal error is printed."""
    import signal
    import subprocess
    import sys

    base_dir, *_ = pair_factory(BF16)
    argv = [sys.executable, "-m", "streamvec.cli", "info", str(base_dir), "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command writes anything: every write finds no reader
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, stderr
    assert stderr == ""


def test_verify_detects_a_changed_tensor(pair_factory, tmp_path: Path) -> None:
    base_dir, ft_dir, *_ = pair_factory(BF16)
    out = tmp_path / "t.zarr"
    assert run_cli("diff", base_dir, ft_dir, "-o", out, "-q") == 0
    assert run_cli("verify", out, "-q") == 0
    arr = zarr.open_array(str(out), path="model.embed.weight", mode="r+")
    arr[3, 4] = 123.0
    proc = run_cli_subprocess("verify", out)
    assert proc.returncode == 2
    assert "model.embed.weight" in proc.stderr and "changed" in proc.stderr


def test_sharded_synthetic_checkpoints(synth_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a.zarr"
    assert run_cli("diff", synth_family["base"], synth_family["a"], "-o", out, "-q") == 0
    tau = read_store(out)
    base = sv.open(synth_family["base"])
    ft = sv.open(synth_family["a"])
    assert len(base.source.tensors) > 1 and sorted(tau) == sorted(
        n for n, t in base.source.tensors.items() if t.dtype.kind == "f" or t.dtype == BF16
    )
    name = "model.layers.1.mlp.down_proj.weight"
    b = base[name].compute().astype(np.float64)
    f = ft[name].compute().astype(np.float64)
    np.testing.assert_array_equal(tau[name], (f - b).astype(np.float32))


def test_help_teaches() -> None:
    proc = run_cli_subprocess("--help")
    assert proc.returncode == 0
    for word in ("diff", "combine", "info", "verify", "demo", "examples:"):
        assert word in proc.stdout
    proc = run_cli_subprocess("diff", "--help")
    assert "--memory-limit" in proc.stdout and "--include" in proc.stdout


def test_missing_input_is_exit_2(tmp_path: Path) -> None:
    proc = run_cli_subprocess("info", tmp_path / "nope")
    assert proc.returncode == 2
    assert proc.stderr.startswith("streamvec: error:") and "no such file" in proc.stderr


def test_output_over_an_input_is_refused(pair_factory, tmp_path: Path) -> None:
    base_dir, ft_dir, *_ = pair_factory(BF16)
    before = (ft_dir / "model.safetensors").read_bytes()
    proc = run_cli_subprocess(
        "combine", "--base", base_dir, "-o", ft_dir, "--overwrite", str(ft_dir)
    )
    assert proc.returncode == 2 and "is the input" in proc.stderr
    assert (ft_dir / "model.safetensors").read_bytes() == before


def test_diff_does_not_import_torch(pair_factory, tmp_path: Path) -> None:
    """torch costs ~2 s and ~120 MB of anonymous memory at start-up; diff must not pay it."""
    base_dir, ft_dir, *_ = pair_factory(BF16)
    rc, imported = modules_imported_by_cli(
        "diff", base_dir, ft_dir, "-o", tmp_path / "t.zarr", "-q", modules=("torch",)
    )
    assert (rc, imported) == (0, [])


def test_each_block_starts_reading_the_next_one(
    pair_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read-ahead: every block task asks for the block planned after it (cold-cache speed)."""
    from streamvec.engine import execute as engine
    from streamvec.io.blocks import SafetensorsReader

    base, ft, _, _ = pair_factory(BF16)
    asked: list[tuple[str, int, int]] = []
    real = engine._prefetch

    def recording(following):  # type: ignore[no-untyped-def]
        if following is not None:
            asked.append((following[0].name, following[1], following[2]))
        real(following)  # and really advise the kernel: must not fail

    monkeypatch.setattr(engine, "_prefetch", recording)
    tv = sv.open(ft) - sv.open(base)
    report = tv.save(tmp_path / "t.zarr", scheduler="sync", block_size="4kB", progress=False)
    blocks = set()
    for name, c in report.checksums.items():
        rows = c["shape"][0] if c["shape"] else 1
        step = c["checksum_block_rows"]
        blocks |= {(name, r0, min(rows, r0 + step)) for r0 in range(0, rows, step)}
    assert len(blocks) > report.tensors  # several blocks per tensor: the case that matters
    # Every block but the one planned first was asked for, exactly once, by its predecessor.
    assert len(asked) == len(set(asked)) == len(blocks) - 1
    assert set(asked) <= blocks
    reader = next(r for _, r in tv["model.embed.weight"].terms)
    assert isinstance(reader, SafetensorsReader)
    reader.prefetch(0, 10)  # advice for real rows
    reader.prefetch(5, 5)  # an empty range is nothing


def test_prefetch_reads_the_whole_range_into_the_page_cache(tmp_path: Path) -> None:
    """The advice covers every row asked for, not the kernel's one read-ahead window per call.

    One ``POSIX_FADV_WILLNEED`` call reads at most the device's read-ahead window (8 MB on
    the machine this was found on, 128 KB by default): a 32 MB block got a quarter of it read
    ahead, or less. Evicts the file, advises every row, and waits for the pages.
    """
    import os
    import time

    from streamvec.io.blocks import SafetensorsReader
    from streamvec.tools.benchmark.cache import _fadvise_dontneed, resident_fraction

    name = "model.embed.weight"
    rows = np.arange(4096, dtype=np.float32)[:, None] * np.ones(4096, np.float32)  # 32 MB
    path = write_checkpoint(tmp_path / "m", {name: rows.astype(BF16)}) / "model.safetensors"
    reader = next(r for _, r in sv.open(path.parent)[name].terms)
    assert isinstance(reader, SafetensorsReader)
    header = reader.offset / os.path.getsize(path)  # the header is not asked for
    # Read-ahead is advice: under memory pressure the kernel allocates no pages for it (a
    # concurrent `cat` of 14 GB left 0.1% read here). So three tries, and the best counts.
    # One call per range read 25% of this file here, 0.4% with a 128 KB window.
    most = 0.0
    for _ in range(3):
        _fadvise_dontneed([path])
        cached = resident_fraction([path])
        if cached is None or cached > 0.05:
            pytest.skip(f"the page cache of {path} cannot be emptied here ({cached})")  # tmpfs
        reader.prefetch(0, 4096)
        deadline = time.monotonic() + 10
        while most < 0.9 - header and time.monotonic() < deadline:
            most = max(most, resident_fraction([path]) or 0.0)
            time.sleep(0.05)
        if most >= 0.9 - header:
            break
    assert most >= 0.9 - header, f"{most:.1%} of the file was read ahead"


def test_prefetch_advises_every_piece_of_the_range_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calls themselves: every byte of the rows asked for is advised, in pieces of at
    most ``WILLNEED_PIECE``, except spans already cached (a cached file costs no advice)."""
    import os

    from streamvec.io import readahead
    from streamvec.io.blocks import SafetensorsReader

    name = "model.embed.weight"
    path = write_checkpoint(tmp_path / "m", {name: np.ones((2048, 4096), BF16)})
    reader = next(r for _, r in sv.open(path)[name].terms)
    assert isinstance(reader, SafetensorsReader)
    advised: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        advised.append((offset, length))

    monkeypatch.setattr(readahead, "_FADVISE", record)
    monkeypatch.setattr(readahead, "_cached", lambda fd, pos: False)
    row = 4096 * 2
    reader.prefetch(100, 1900)
    start, end = reader.offset + 100 * row, reader.offset + 1900 * row
    assert all(0 < length <= readahead.WILLNEED_PIECE for _, length in advised)
    assert advised[0][0] == start and sum(length for _, length in advised) == end - start
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(advised))
    advised.clear()
    monkeypatch.setattr(readahead, "_cached", lambda fd, pos: True)
    reader.prefetch(0, 2048)
    assert advised == []
