"""``streamvec stats`` against numpy on whole tensors in float64."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import streamvec as sv
from streamvec.memory import PeakSampler, anon_bytes
from streamvec.ops.stats import StatsOptions
from streamvec.ops.stats.grouping import module_kind
from tests.conftest import run_cli, write_checkpoint

GRAM_RTOL = 1e-12


def load(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory, read by the real safetensors library."""
    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(safetensors.numpy.load_file(str(f)))
    return out


def reference_taus(
    base: Path, fts: list[Path], names: list[str] | None = None
) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """Per float tensor: each float32 task vector (upcast, one subtraction) as float64."""
    b = load(base)
    f = [load(p) for p in fts]
    taus, bases = {}, {}
    for n, x in b.items():
        if x.dtype.kind in "iub" or (names is not None and n not in names):
            continue
        x32 = x.astype(np.float32)
        taus[n] = [(ft[n].astype(np.float32) - x32).astype(np.float64).ravel() for ft in f]
        bases[n] = x.astype(np.float64).ravel()
    return taus, bases


def gram(ts: list[np.ndarray]) -> np.ndarray:
    return np.array([[float(np.dot(a, c)) for c in ts] for a in ts])


def sign_agreement(a: np.ndarray, c: np.ndarray) -> float:
    w = np.abs(a * c)
    total = w.sum()
    return float(w[np.sign(a) == np.sign(c)].sum() / total) if total > 0 else math.nan


def top_set(t: np.ndarray, density: float, bins: bool = False) -> np.ndarray:
    """The documented top set of a tensor read whole: non-zero entries at or above the k-th
    largest magnitude (``bins``: at or above the lower edge of its 2^-7 magnitude bin, the
    ``exact_topk`` mode)."""
    mag = np.abs(t).astype(np.float32)
    k = max(1, math.ceil(density * t.size))
    kth = np.sort(mag)[-k]
    floor = (kth.view(np.uint32) >> np.uint32(16)) << np.uint32(16) if bins else kth
    return (mag.view(np.uint32) >= floor.view(np.uint32)) & (mag > 0)


def largest(t: np.ndarray, size: int) -> np.ndarray:
    """The non-zero entries at or above the ``size``-th largest magnitude."""
    mag = np.abs(t)
    if size == 0:
        return np.zeros(t.shape, bool)
    return (mag >= np.sort(mag)[-size]) & (mag > 0)


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float = GRAM_RTOL) -> None:
    scale = np.abs(want).max() if np.size(want) else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def check_against_reference(
    st: sv.Stats, taus: dict, bases: dict, density: float, bins: bool = False
) -> None:
    fig = st.per_tensor
    assert set(fig.labels) == set(taus)
    for g, name in enumerate(fig.labels):
        ts = taus[name]
        assert_close(fig.gram[g], gram(ts))
        assert_close(fig.absgram[g], gram([np.abs(t) for t in ts]))
        np.testing.assert_array_equal(fig.maxabs[g], [np.abs(t).max() for t in ts])
        np.testing.assert_array_equal(fig.zeros[g], [(t == 0).sum() for t in ts])
        if bases:
            assert_close(fig.base_sq[g], float(np.dot(bases[name], bases[name])))
        if density > 0:
            tops = [top_set(t, density, bins) for t in ts]
            both = np.array([[(a & c).sum() for c in tops] for a in tops])
            np.testing.assert_array_equal(fig.top_both[g], both)
            for t, top in zip(ts, tops, strict=True):
                k = max(1, math.ceil(density * t.size))
                exact = np.argsort(-np.abs(t), kind="stable")[:k]
                assert top[exact[np.abs(t[exact]) > 0]].all()  # holds the exact top k
    # Groups are figures of the concatenated tensors, not averages.
    for kind in set(st.kinds):
        names = [n for n in fig.labels if module_kind(n) == kind]
        ts = [np.concatenate([taus[n][i] for n in names]) for i in range(len(st.names))]
        g = st.per_module.select(kind)
        assert_close(st.per_module.gram[g], gram(ts))
        norms = np.sqrt(np.diag(gram(ts)))
        with np.errstate(invalid="ignore", divide="ignore"):
            want_cos = gram(ts) / np.outer(norms, norms)
        assert_close(np.nan_to_num(st.per_module.cosine[g]), np.nan_to_num(want_cos), rtol=1e-12)
        for i in range(len(ts)):
            for j in range(len(ts)):
                if norms[i] > 0 and norms[j] > 0:
                    assert st.per_module.sign_agreement[g, i, j] == pytest.approx(
                        sign_agreement(ts[i], ts[j]), rel=1e-12, nan_ok=True
                    )
    every = [np.concatenate([taus[n][i] for n in fig.labels]) for i in range(len(st.names))]
    assert_close(st.overall.gram[0], gram(every))
    if bases:
        bnorm = math.sqrt(sum(float(np.dot(bases[n], bases[n])) for n in fig.labels))
        want = np.sqrt(np.diag(gram(every))) / bnorm
        np.testing.assert_allclose(st.overall.relative[0], want, rtol=1e-12)


@pytest.fixture(scope="module")
def family_stats(synth_family):
    f = synth_family
    st = sv.stats([f["a"], f["b"], f["c"]], base=f["base"], workers=2, block_size="16kB")
    return st


def test_checkpoint_terms_match_float64_numpy(synth_family, family_stats) -> None:
    f = synth_family
    taus, bases = reference_taus(f["base"], [f["a"], f["b"], f["c"]])
    check_against_reference(family_stats, taus, bases, 0.2)
    assert family_stats.names == ("a", "b", "c")


def test_exact_topk_mode_keeps_histogram_sets(synth_family, family_stats) -> None:
    f = synth_family
    st = sv.stats(
        [f["a"], f["b"], f["c"]],
        base=f["base"],
        options=StatsOptions(exact_topk=True),
        block_size="16kB",
    )
    taus, bases = reference_taus(f["base"], [f["a"], f["b"], f["c"]])
    check_against_reference(st, taus, bases, 0.2, bins=True)
    assert_close(st.per_tensor.gram, family_stats.per_tensor.gram)


def check_sampled_sets(st: sv.Stats, taus: dict, density: float, sample: int) -> int:
    """Each top set is the |T_i| largest entries, and the pair counts are those sets'."""
    fig = st.per_tensor
    sampled = 0
    for g, name in enumerate(fig.labels):
        ts = taus[name]
        sizes = np.diag(fig.top_both[g]).astype(int)
        tops = [largest(t, k) for t, k in zip(ts, sizes, strict=True)]
        both = np.array([[(a & c).sum() for c in tops] for a in tops])
        np.testing.assert_array_equal(fig.top_both[g], both)
        if ts[0].size > sample:
            sampled += 1
            for t, k in zip(ts, sizes, strict=True):
                nonzero = np.count_nonzero(t)
                if nonzero > density * t.size * 1.5:
                    # a 512-element sample: loose; docs/stats.md gives the figures at 2^14
                    assert abs(k / (density * t.size) - 1) < 0.5, (name, k, t.size)
    return sampled


@pytest.mark.parametrize("stores", [False, True])
def test_sampled_thresholds_give_exact_counts(synth_family, tmp_path, stores) -> None:
    f = synth_family
    terms = [f["a"], f["c"]]
    if stores:  # Zarr readers: the sample is bands of rows
        terms = []
        for k in ("a", "c"):
            out = tmp_path / f"{k}.zarr"
            assert run_cli("diff", f["base"], f[k], "-o", out, "-q") == 0
            terms.append(out)
    opts = StatsOptions(density=0.2, topk_sample=512)
    st = sv.stats(terms, base=f["base"], options=opts, block_size="16kB")
    taus, _ = reference_taus(f["base"], [f["a"], f["c"]])
    assert check_sampled_sets(st, taus, 0.2, 512) > 5
    again = sv.stats(terms, base=f["base"], options=opts, workers=1)
    np.testing.assert_array_equal(again.per_tensor.top_both, st.per_tensor.top_both)  # seeded


def test_per_layer_sums_its_tensors(family_stats) -> None:
    lay = family_stats.per_layer
    assert lay.labels == ("0", "1")
    t = family_stats.per_tensor
    for g, layer in enumerate((0, 1)):
        idx = [i for i, x in enumerate(family_stats.layers) if x == layer]
        assert_close(lay.gram[g], t.gram[idx].sum(axis=0))
        np.testing.assert_array_equal(lay.maxabs[g], t.maxabs[idx].max(axis=0))


def test_store_terms_equal_checkpoint_terms(synth_family, family_stats, tmp_path) -> None:
    f = synth_family
    stores = []
    for k in ("a", "b", "c"):
        out = tmp_path / f"{k}.zarr"
        assert run_cli("diff", f["base"], f[k], "-o", out, "-q") == 0
        stores.append(out)
    st = sv.stats(stores, base=f["base"])
    assert st.names == ("a", "b", "c")
    taus, bases = reference_taus(f["base"], [f["a"], f["b"], f["c"]])
    check_against_reference(st, taus, bases, 0.2)
    ref = family_stats.per_tensor
    assert sorted(st.per_tensor.labels) == sorted(ref.labels)
    order = [st.per_tensor.select(n) for n in ref.labels]
    assert_close(st.per_tensor.gram[order], ref.gram)
    np.testing.assert_array_equal(st.per_tensor.top_both[order], ref.top_both)
    # without a base: no relative sizes, the rest unchanged
    bare = sv.stats(stores, options=StatsOptions(density=0))
    assert np.isnan(bare.overall.relative).all()
    assert np.isnan(bare.overall.top_both).all()
    assert_close(bare.overall.gram, family_stats.overall.gram)


def test_filters_select_tensors(synth_family) -> None:
    f = synth_family
    st = sv.stats(
        [f["a"], f["b"]],
        base=f["base"],
        include=["*.self_attn.*"],
        exclude=["*.o_proj.*"],
        options=StatsOptions(density=0.1),
    )
    assert st.per_tensor.labels
    assert all(".self_attn." in n and "o_proj" not in n for n in st.per_tensor.labels)
    taus, bases = reference_taus(f["base"], [f["a"], f["b"]], list(st.per_tensor.labels))
    check_against_reference(st, taus, bases, 0.1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_odd_shapes_and_dtypes(pair_factory, dtype) -> None:
    from tests.conftest import BF16

    base, ft, _, _ = pair_factory(BF16 if dtype == "bfloat16" else np.dtype(dtype))
    st = sv.stats([ft], base=base, options=StatsOptions(density=0.3, spectrum=3))
    taus, bases = reference_taus(base, [ft])
    check_against_reference(st, taus, bases, 0.3)
    assert st.skipped_nonfloat == ("model.position_ids",)
    assert "model/odd/name.weight" in st.spectra and "model.conv.weight" in st.spectra


def test_spectrum_against_exact_svd(synth_family) -> None:
    f = synth_family
    k = 6
    st = sv.stats([f["a"], f["b"]], base=f["base"], options=StatsOptions(spectrum=k))
    b = load(f["base"])
    fts = [load(f["a"]), load(f["b"])]
    assert st.spectra
    for name, specs in st.spectra.items():
        shape = b[name].shape
        us = []
        for i, sp in enumerate(specs):
            assert sp is not None
            tau = (fts[i][name].astype(np.float32) - b[name].astype(np.float32)).astype(np.float64)
            u, s, _ = np.linalg.svd(tau.reshape(shape[0], -1), full_matrices=False)
            kk = min(k, *tau.reshape(shape[0], -1).shape)
            np.testing.assert_allclose(sp.s, s[:kk], rtol=1e-4, atol=1e-6 * s[0])
            assert sp.energy == pytest.approx(float((s**2).sum()), rel=1e-12)
            resid = 1 - np.cumsum(s**2) / (s**2).sum()
            want = int(np.flatnonzero(resid <= 0.01)[0]) + 1
            got = sp.rank_for(0.01)
            assert got == want or (got is None and want > kk)
            us.append(u[:, :kk])
        m = us[0].T @ us[1]
        assert st.subspace[name][0, 1] == pytest.approx(
            float((m**2).sum() / us[0].shape[1]), abs=1e-3
        )
        assert st.subspace[name][0, 0] == pytest.approx(1.0, abs=1e-6)


def test_svd_store_answers_the_lora_rank(synth_family, tmp_path, capsys) -> None:
    f = synth_family
    tau = tmp_path / "tau.zarr"
    low = tmp_path / "tau-r8.zarr"
    assert run_cli("diff", f["base"], f["a"], "-o", tau, "-q") == 0
    assert run_cli("svd", tau, "-o", low, "--rank", "8", "-q") == 0
    capsys.readouterr()
    assert run_cli("stats", tau, low, "--density", "0", "--workers", "1") == 0
    text = capsys.readouterr().out
    assert "LoRA rank for <= 1% residual energy" in text and "attn.q" in text
    st = sv.stats([tau, low], options=StatsOptions(density=0))
    ref = load(f["a"])
    b = load(f["base"])
    for name, specs in st.spectra.items():
        assert specs[0] is None and specs[1] is not None and specs[1].source == "svd-store"
        t = (ref[name].astype(np.float32) - b[name].astype(np.float32)).astype(np.float64)
        s = np.linalg.svd(t.reshape(t.shape[0], -1), compute_uv=False)
        # the residual is measured against the original's energy, recorded by `svd`
        assert specs[1].energy == pytest.approx(float((s**2).sum()), rel=1e-5)
        resid = 1 - np.cumsum(s**2) / (s**2).sum()
        want = int(np.flatnonzero(resid <= 0.01)[0]) + 1
        assert specs[1].rank_for(0.01) == (want if want <= specs[1].s.size else None)
    # cos(tau, its rank-8 approximation) = ||approximation|| / ||tau||
    g = st.overall.gram[0]
    assert st.overall.cosine[0, 0, 1] == pytest.approx(math.sqrt(g[1, 1] / g[0, 0]), rel=1e-4)


def test_cli_writes_json_and_readable_pngs(synth_family, tmp_path, capsys) -> None:
    import matplotlib.image

    f = synth_family
    out = tmp_path / "out"
    rc = run_cli(
        "stats",
        f["a"],
        f["b"],
        f["c"],
        "--base",
        f["base"],
        "-o",
        out,
        "--spectrum",
        "4",
        "--per",
        "layer",
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "per layer" in text and "cosine" in text
    data = json.loads((out / "stats.json").read_text())
    assert data["names"] == ["a", "b", "c"]
    assert {r["label"] for r in data["per_module"]} >= {"attn.q", "mlp", "embed", "norm"}
    floats = [n for n, x in load(f["base"]).items() if x.dtype.kind not in "iub"]
    assert len(data["per_tensor"]) == len(floats)
    assert data["overall"]["cosine"][0][0] == pytest.approx(1.0)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "cosine.png",
        "norms_per_layer.png",
        "sign_agreement.png",
        "spectra.png",
        "subspace_overlap.png",
        "top_overlap.png",
    ]
    for p in out.glob("*.png"):
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 300
        colors = np.unique(img[..., :3].reshape(-1, 3), axis=0)
        assert len(colors) > 50 and img[..., :3].std() > 0.05, p.name
    assert run_cli("stats", f["a"], "--base", f["base"], "--json", "--density", "0") == 0
    assert json.loads(capsys.readouterr().out)["names"] == ["a"]


def test_cli_exact_topk_flag(synth_family, capsys) -> None:
    f = synth_family
    args = ("stats", f["a"], f["c"], "--base", f["base"], "--json", "--density", "0.1")
    assert run_cli(*args, "--exact-topk") == 0
    exact = json.loads(capsys.readouterr().out)
    want = sv.stats(
        [f["a"], f["c"]], base=f["base"], options=StatsOptions(density=0.1, exact_topk=True)
    )
    got = np.array(exact["overall"]["top_overlap"], dtype=float)
    np.testing.assert_allclose(got, want.overall.top_overlap[0])
    assert run_cli(*args) == 0
    sampled = json.loads(capsys.readouterr().out)
    assert sampled["overall"]["gram"] == exact["overall"]["gram"]


def test_cli_bad_input_exits_2(synth_family, tmp_path, capsys) -> None:
    f = synth_family
    assert run_cli("stats") == 2
    assert "at least one TERM" in capsys.readouterr().err
    assert run_cli("stats", f["a"]) == 2
    assert "--base" in capsys.readouterr().err
    small = write_checkpoint(tmp_path / "small", {"w": np.zeros((3, 4), np.float32)})
    other = write_checkpoint(tmp_path / "other", {"w": np.ones((4, 3), np.float32)})
    smaller = write_checkpoint(tmp_path / "smaller", {"v": np.ones((3, 4), np.float32)})
    out = tmp_path / "never"
    assert run_cli("stats", other, "--base", small, "-o", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "w shapes differ" in err and "[4, 3]" in err
    assert not out.exists()
    assert run_cli("stats", small, smaller, "--base", small, "--exclude", "x") == 2
    assert "is the base itself" in capsys.readouterr().err
    whole = tmp_path / "whole.zarr"
    part = tmp_path / "part.zarr"
    both = {"w": np.ones((3, 4), np.float32), "v": np.ones(5, np.float32)}
    two = write_checkpoint(tmp_path / "two", both)
    twice = write_checkpoint(tmp_path / "twice", {k: 2 * x for k, x in both.items()})
    assert run_cli("diff", two, twice, "-o", whole, "-q") == 0
    assert run_cli("diff", two, twice, "-o", part, "-q", "--include", "w") == 0
    assert run_cli("stats", whole, part) == 2
    err = capsys.readouterr().err
    assert "v (missing in part)" in err and "--include/--exclude" in err
    assert run_cli("stats", whole, part, "--include", "w", "-q") == 0
    assert run_cli("stats", other, "--base", small, "--density", "2") == 2


def test_memory_stays_flat(tmp_path) -> None:
    """Anonymous memory does not grow with the input: 4x the bytes, the same peak."""
    rng = np.random.default_rng(0)

    def pair(rows: int, tag: str) -> tuple[Path, Path]:
        base = {"w": rng.standard_normal((rows, 1024), np.float32)}
        ft = {"w": base["w"] + rng.standard_normal((rows, 1024), np.float32) * 0.01}
        return write_checkpoint(tmp_path / f"b{tag}", base), write_checkpoint(
            tmp_path / f"f{tag}", ft
        )

    small, large = pair(4096, "s"), pair(4 * 4096, "l")  # 16 MB and 64 MB per file

    def peak(p: tuple[Path, Path]) -> int:
        sv.stats([p[1]], base=p[0], workers=2, block_size="1MB")  # warm: imports, pools
        with PeakSampler() as s:
            before = anon_bytes()
            sv.stats([p[1]], base=p[0], workers=2, block_size="1MB")
        return s.peak - before

    grow_small, grow_large = peak(small), peak(large)
    # A whole float64 task vector of the large input alone would be 128 MB.
    assert grow_large < grow_small + (24 << 20), (grow_small, grow_large)
    assert grow_large < 64 << 20


@pytest.mark.parametrize("how", ["rewritten", "truncated"])
def test_input_changed_during_the_pass_is_an_error(tmp_path, how) -> None:
    """The slab reader keeps the reader's promise: a changed input stops the pass."""
    from streamvec.engine.settings import Settings
    from streamvec.errors import InputChangedError
    from streamvec.ops.stats.inputs import open_inputs
    from streamvec.ops.stats.runner import TopSets, run_stats_pass

    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    base = write_checkpoint(tmp_path / "base", {"w": w})
    ft = write_checkpoint(tmp_path / "ft", {"w": w + 1})
    inputs = open_inputs([str(ft)], base=base)
    path = ft / "model.safetensors"
    if how == "rewritten":
        write_checkpoint(ft, {"w": w + 2})
    else:
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size - 1024)
    run = Settings(progress=False, workers=1, scheduler="sync")
    with pytest.raises(InputChangedError, match=str(path)):
        run_stats_pass(inputs.tensors, run)
    with pytest.raises(InputChangedError, match=str(path)):
        run_stats_pass(inputs.tensors, run, top=TopSets(0.2, 512))  # the sample's reads
