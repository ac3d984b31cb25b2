"""Same seed, same bytes: whatever the workers, the block size (memory limit) or the scheduler.

Randomised methods draw per element from a counter-based stream; ranked methods cut at
positions found by exact histogram passes; L1 rescale factors are reduced row by row. None of
them may depend on how the engine cuts tensors into blocks.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import streamvec as sv
from streamvec.engine.execute import RUNTIME_OVERHEAD
from streamvec.ops.merge import RunSettings, merge, parse_recipe
from streamvec.ops.merge.rng import keep_threshold, philox_key, uniform_u32


def test_counter_stream_split_anywhere_equals_one_draw() -> None:
    key = philox_key(5, "model.layers.0.mlp.up_proj.weight", 2)
    whole = uniform_u32(key, 0, 1000)
    rng = np.random.default_rng(0)
    for _ in range(50):
        cuts = np.sort(rng.choice(np.arange(1, 1000), size=int(rng.integers(1, 6)), replace=False))
        edges = [0, *cuts.tolist(), 1000]
        parts = [uniform_u32(key, a, b - a) for a, b in itertools.pairwise(edges)]
        assert np.array_equal(np.concatenate(parts), whole)
    # rows [0, r) then [r, n) for a (n, cols) tensor
    cols = 7
    for r in (1, 3, 5, 9):
        top = uniform_u32(key, 0, r * cols)
        rest = uniform_u32(key, r * cols, (20 - r) * cols)
        assert np.array_equal(np.concatenate([top, rest]), uniform_u32(key, 0, 20 * cols))


def test_keys_separate_seed_tensor_and_model() -> None:
    keys = {philox_key(s, n, m) for s in (0, 1) for n in ("a", "b") for m in (0, 1)}
    assert len(keys) == 8
    assert keep_threshold(0.25) == 2**30


def test_uniforms_are_uniform() -> None:
    u = uniform_u32(philox_key(0, "w", 0), 12345, 200_000).astype(np.float64) / 2**32
    assert abs(u.mean() - 0.5) < 0.005
    assert abs((u < 0.1).mean() - 0.1) < 0.005


METHODS = {
    "dare_ties": {"density": 0.4},
    "della": {"density": 0.5, "epsilon": 0.2},
    "dare_paper": {"density": 0.3},
    "ties": {"density": 0.37},
    "breadcrumbs_ties": {"density": 0.45, "gamma": 0.03},
    "ties_paper": {"density": 0.25},
}


def _recipe(family: dict[str, Path], method: str, seed: int = 1) -> object:
    params = METHODS[method]
    models = [
        {"model": str(family[m]), "parameters": {"weight": w, **params}}
        for m, w in zip("abc", (0.5, 0.3, 0.7), strict=True)
    ]
    return parse_recipe(
        {
            "merge_method": method,
            "base_model": str(family["base"]),
            "models": models,
            "seed": seed,
        }
    )


def _bytes(path: Path) -> dict[str, bytes]:
    return {n: t.compute().tobytes() for n, t in sv.open(path).items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_same_seed_same_bytes_across_workers_blocks_and_schedulers(
    synth_family: dict[str, Path], tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = _recipe(synth_family, method)
    # A fixed baseline makes the block size a pure function of the limit: ~20 rows of the
    # embedding per block with 2 workers, for the first passes and the output pass alike.
    import streamvec.engine.execute
    import streamvec.ops.merge.passes

    monkeypatch.setattr(streamvec.engine.execute, "anon_bytes", lambda: 0)
    monkeypatch.setattr(streamvec.ops.merge.passes, "anon_bytes", lambda: 0)
    small = RUNTIME_OVERHEAD + 80_000
    runs = {
        "threads-1": RunSettings(workers=1),
        "threads-2-small-blocks": RunSettings(workers=2, memory_limit=small),
        "sync": RunSettings(workers=1, scheduler="sync"),
    }
    outs = {}
    for label, settings in runs.items():
        report = merge(rec, tmp_path / label, settings=settings)  # type: ignore[arg-type]
        outs[label] = _bytes(tmp_path / label)
        if label == "threads-2-small-blocks":
            rows = report.run.checksums["model.embed_tokens.weight"]["checksum_block_rows"]
            assert rows < 256  # the embedding really was cut into several blocks
    first = outs["threads-1"]
    for label, out in outs.items():
        assert out == first, f"{method}: {label} differs from threads-1"


def test_processes_scheduler_gives_the_same_bytes(
    synth_family: dict[str, Path], tmp_path: Path
) -> None:
    rec = _recipe(synth_family, "della")
    merge(rec, tmp_path / "t", settings=RunSettings(workers=1))  # type: ignore[arg-type]
    merge(rec, tmp_path / "p", settings=RunSettings(workers=2, scheduler="processes"))  # type: ignore[arg-type]
    assert _bytes(tmp_path / "t") == _bytes(tmp_path / "p")


def test_seed_changes_the_draws_and_overrides_the_recipe(
    synth_family: dict[str, Path], tmp_path: Path
) -> None:
    rec = _recipe(synth_family, "dare_ties", seed=1)
    merge(rec, tmp_path / "s1", settings=RunSettings(workers=2))  # type: ignore[arg-type]
    merge(rec, tmp_path / "s2", seed=2, settings=RunSettings(workers=2))  # type: ignore[arg-type]
    merge(_recipe(synth_family, "dare_ties", seed=2), tmp_path / "r2", settings=RunSettings())  # type: ignore[arg-type]
    a, b, c = _bytes(tmp_path / "s1"), _bytes(tmp_path / "s2"), _bytes(tmp_path / "r2")
    assert a != b
    assert b == c


@pytest.mark.parametrize(
    "row_count_values", [16, 3, 0], ids=["counts-in-pass-2", "some-blocks-without", "tie-pass"]
)
def test_radix_selection_is_exact_with_ties_and_tiny_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, row_count_values: int
) -> None:
    """rank_cuts against a full stable sort, blocks of a few rows (deep reduction trees).

    Ties are broken from the per-row counts kept by pass 2 and, where a block holds too many
    distinct values for them (forced here: with 3 for some blocks, with 0 for all), by the
    third pass.
    """
    from streamvec.engine.settings import Settings
    from streamvec.ops.merge import select
    from streamvec.ops.merge.masks import RankWindow, SlabContext
    from streamvec.ops.merge.select import TensorInput, model_wide_floors, rank_cuts
    from tests.conftest import write_checkpoint

    monkeypatch.setattr(select, "ROW_COUNT_VALUES", row_count_values)
    passes: list[str] = []
    real_run_pass = select.run_pass

    def counted(*args: Any, **kwargs: Any) -> Any:
        passes.append(kwargs["desc"])
        return real_run_pass(*args, **kwargs)

    monkeypatch.setattr(select, "run_pass", counted)

    rng = np.random.default_rng(3)
    base = {"w": rng.integers(-8, 8, (97, 13)).astype(np.float32) / 64}
    ft = {"w": base["w"] + rng.integers(-6, 7, (97, 13)).astype(np.float32) / 64}  # many ties
    paths = [write_checkpoint(tmp_path / n, t) for n, t in (("base", base), ("ft", ft))]
    src = [sv.open(p)["w"].terms[0] for p in paths]
    inp = TensorInput("w", (97, 13), tuple(src), (False,))
    tau = (ft["w"] - base["w"]).astype(np.float32)
    flat = np.abs(tau).ravel()
    order = np.lexsort((np.arange(flat.size), flat))
    ranks = [1, 7, 100, 500, 631, flat.size - 1]
    opts = Settings(workers=2, block_size=13 * 4 * 3, progress=False)  # 3 rows per block
    cuts = rank_cuts({"w": (inp, [(0, r) for r in ranks])}, opts)
    for r in ranks:
        v, idx = cuts[("w", 0, r)]
        assert np.float32(flat[order[r]]).view(np.uint32) == v
        # the cut keeps exactly the elements at ranks >= r
        keep = RankWindow((v, idx), None).keep(tau, SlabContext("w", (97, 13), 0, 97, 13))
        assert keep is not None and int(keep.sum()) == flat.size - r
        assert keep.ravel()[order[r]] and (r == 0 or not keep.ravel()[order[r - 1]])
    assert passes[:2] == ["ranks (1/2)", "ranks (2/2)"]
    if row_count_values != 3:
        assert passes[2:] == ["ranks (ties)"] * (row_count_values == 0)
    floors = model_wide_floors([inp], {0: 631}, opts)
    assert np.uint32(floors[0]).view(np.float32) == np.sort(flat)[631]


@pytest.mark.parametrize("shape", [(64, 300), (200_000, 1)], ids=["wide", "tall-narrow"])
def test_pass_2_row_counts_equal_a_direct_count(shape: tuple[int, int]) -> None:
    """Pass 2's tie counts against counting each (row, value) directly: a grid of counts
    for wide slabs, sorted cells for tall narrow ones (where a rows x 16 grid would be
    mostly empty and far larger than the elements)."""
    from streamvec.ops.merge.select import ROW_COUNT_VALUES, _row_counts

    rng = np.random.default_rng(5)
    h = 0x3F80
    hi = np.where(rng.random(shape) < 0.3, h, rng.integers(0x3000, 0x3F00, shape))
    lo = rng.geometric(0.08, shape).clip(max=60) * 7  # 40-60 values, a few of them frequent
    bits = ((hi.astype(np.uint32) << 16) | lo.astype(np.uint32)).astype(np.uint32)
    entries = _row_counts(3, bits, h, 1000)
    assert (entries[:, 0] == 3).all()
    in_bin = (bits >> 16) == h
    values, counts = np.unique(bits[in_bin] & 0xFFFF, return_counts=True)
    totals = dict(zip(values.tolist(), counts.tolist(), strict=True))
    per_row = entries[entries[:, 1] >= 0]
    tracked = set(per_row[:, 2].tolist())
    assert len(tracked) == min(ROW_COUNT_VALUES, len(totals))
    untracked = entries[entries[:, 1] < 0]
    assert sorted(untracked[:, 2].tolist()) == sorted(set(totals) - tracked)
    for v, c in untracked[:, 2:].tolist():
        assert c == totals[v]
    # the most frequent values are the ones counted per row
    assert min(totals[v] for v in tracked) >= max([totals[v] for v in set(totals) - tracked] or [0])
    for v in tracked:
        mine = per_row[per_row[:, 2] == v]
        direct = np.bincount(np.nonzero(((bits & 0xFFFF) == v) & in_bin)[0], minlength=shape[0])
        assert direct.sum() == totals[v]
        np.testing.assert_array_equal(mine[:, 1] - 1000, np.flatnonzero(direct))
        np.testing.assert_array_equal(mine[:, 3], direct[direct > 0])
