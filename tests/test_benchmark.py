"""``streamvec bench``: the quick benchmark runs end to end and reports sane, complete figures.

Never asserts on time: the machine is shared, only the presence and sign of figures are
checked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from streamvec.benchmark import RESULT_FIELDS, add_parser, format_table, run_bench

from .conftest import BF16, run_cli


def _check_results(data: dict, steps: list[str], mode: str) -> None:
    assert set(data) >= {"machine", "settings", "results", "result_fields"}
    assert data["machine"]["cpus"] >= 1
    results = data["results"]
    assert [r["step"] for r in results] == steps
    for r in results:
        assert set(RESULT_FIELDS) <= set(r), set(RESULT_FIELDS) - set(r)
        assert r["mode"] == mode
        assert r["params"] > 0
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
        ):
            assert r[key] > 0, key
        assert r["peak_anon_bytes"] > 0
        assert r["memory_limit_bytes"] > 0
        assert len(r["seconds_all"]) == data["settings"]["repeat"]


def test_quick_bench_cli_subprocess_steps(tmp_path: Path) -> None:
    """The CLI entry point, steps as real subprocesses (what users run)."""
    work = tmp_path / "work"
    code = run_cli("bench", "--quick", "--size", "2M", "--out", tmp_path, "--workdir", work, "-q")
    assert code == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    _check_results(data, ["diff", "combine"], "subprocess")
    # Without --keep the checkpoints and outputs are gone; the given workdir itself stays.
    assert work.is_dir() and not any(work.iterdir())


def test_bench_in_process_keep_and_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamvec import synth

    work = tmp_path / "work"
    kwargs = dict(workdir=work, steps=("diff",), memory_limit="1GB", in_process=True, quiet=True)
    first = run_bench(["2M"], json_path=tmp_path / "a.json", keep=True, **kwargs)
    assert (work / "base-2M").is_dir() and (work / "tau-2M.zarr").is_dir()

    def no_rebuild(*args: object, **kw: object) -> None:
        raise AssertionError("the pair left by --keep should have been reused")

    monkeypatch.setattr(synth, "build_checkpoint", no_rebuild)
    second = run_bench(["2M"], json_path=tmp_path / "b.json", repeat=2, **kwargs)
    # Without keep this time, the multi-GB files go once the size is measured.
    assert not (work / "base-2M").exists() and not (work / "tau-2M.zarr").exists()
    assert first[0].input_bytes == second[0].input_bytes
    data = json.loads((tmp_path / "b.json").read_text())
    _check_results(data, ["diff"], "in-process")
    assert data["results"][0]["memory_limit_bytes"] == 10**9
    table = format_table(second)
    assert "2M" in table and "diff" in table


def test_add_parser_registers_bench() -> None:
    parser = argparse.ArgumentParser(prog="streamvec")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["bench", "--quick", "--size", "1B", "--out", "x"])
    assert args.quick and args.size == ["1B"] and args.out == Path("x")
    assert callable(args.func)


def test_bad_steps_are_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("bench", "--quick", "--steps", "svd", "--out", tmp_path) == 2
    assert "--steps" in capsys.readouterr().err


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
    from streamvec.io import zarr_store as zs
    from streamvec.io.blocks import matrix_shape

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
    zs.update_root_attrs(path, {"kind": "task_vector"})
    zs.consolidate(path)


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
def test_store_fast_path_writes_what_zarr_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    import zarr

    from streamvec.io import zarr_store as zs

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

    from streamvec.io import zarr_store as zs

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
    from streamvec.io import zarr_store as zs

    with pytest.raises(StoreError, match="compression"):
        zs.create_store(tmp_path, {}, [], "brotli")
