"""Every merge method against a direct in-memory float64 implementation of its formula.

The references below are written from the methods' definitions (mergekit 0.1.5's semantics and
the papers'), on whole tensors in numpy: masks from a full stable sort, thresholds from
``np.sort``/``np.quantile``, rescale factors from whole-tensor sums. Randomised methods draw
the whole tensor's uniforms at once from the documented counter-based stream, so the reference
also checks that blocks draw what the whole tensor would.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import streamvec as sv
from streamvec.ops.merge import RunSettings, build_model, merge, parse_recipe
from streamvec.ops.merge.rng import philox_key, uniform_u32
from tests.conftest import BF16, assert_matches_float64, write_checkpoint

F32 = np.dtype(np.float32)
SEED = 11
WEIGHTS = (0.5, 0.3, 0.8)


def family_tensors(seed: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def f(*shape: int) -> np.ndarray:
        return np.asarray(rng.standard_normal(shape) * 0.02, dtype=np.float32).astype(dtype)

    return {
        "model.layers.0.self_attn.q_proj.weight": f(37, 23),
        "model.layers.1.mlp.up_proj.weight": f(41, 19),
        "model.layers.1.conv.weight": f(4, 3, 5),
        "model.norm.weight": f(29),
        "model.scale": f(),
        "model.position_ids": np.arange(12, dtype=np.int64).reshape(2, 6),
    }


def finetune(base: dict[str, np.ndarray], seed: int, only: str | None = None) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in base.items():
        if v.dtype.kind in "iub" or (only and only not in k):
            out[k] = v.copy()
            continue
        delta = (rng.standard_normal(v.shape) * 0.004).astype(np.float32)
        out[k] = np.asarray(v.astype(np.float32) + delta).astype(v.dtype)
    return out


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory):
    """Per dtype: checkpoint dirs (base, a, b, c) and their tensors; c changes attention only."""
    cache: dict[str, tuple[dict[str, Path], dict[str, dict[str, np.ndarray]]]] = {}

    def make(dtype: np.dtype) -> tuple[dict[str, Path], dict[str, dict[str, np.ndarray]]]:
        key = "bfloat16" if dtype == BF16 else np.dtype(dtype).name
        if key not in cache:
            root = tmp_path_factory.mktemp(f"merge-{key}")
            base = family_tensors(0, dtype)
            tensors = {
                "base": base,
                "a": finetune(base, 1),
                "b": finetune(base, 2),
                "c": finetune(base, 3, only="self_attn"),
            }
            paths = {k: write_checkpoint(root / k, v) for k, v in tensors.items()}
            cache[key] = (paths, tensors)
        return cache[key]

    return make


def recipe(method: str, paths: dict[str, Path], per_model: list[dict], **top: Any) -> Any:
    models = [
        {"model": str(paths[m]), "parameters": p} for m, p in zip("abc", per_model, strict=True)
    ]
    return parse_recipe(
        {"merge_method": method, "base_model": str(paths["base"]), "models": models, **top}
    )


def run(rec: Any, out: Path, **settings: Any) -> dict[str, np.ndarray]:
    merge(rec, out, settings=RunSettings(**settings))
    model = sv.open(out)
    return {n: t.compute() for n, t in model.items()}


# -- references ---------------------------------------------------------------------------------


def tau32(t: dict, name: str, m: str) -> np.ndarray:
    return t[m][name].astype(np.float32) - t["base"][name].astype(np.float32)


def stable_ranks(x: np.ndarray) -> np.ndarray:
    """Ascending ranks by (|x|, flat index)."""
    flat = np.abs(x).ravel()
    order = np.lexsort((np.arange(flat.size), flat))
    ranks = np.empty(flat.size, np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks.reshape(x.shape)


def topk_mask(t: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return np.ones(t.shape, bool)
    if density <= 0:
        return np.zeros(t.shape, bool)
    k = max(1, int(density * t.size))
    return stable_ranks(t) >= t.size - k


def outlier_mask(t: np.ndarray, density: float, gamma: float) -> np.ndarray:
    if density >= 1:
        return np.ones(t.shape, bool)
    n = t.size
    target, top = int(density * n), int(gamma * n)
    bot = max(0, n - target - top)
    r = stable_ranks(t)
    return (r >= bot) & (r < bot + target)


def uniforms(name: str, model: int, n: int) -> np.ndarray:
    return uniform_u32(philox_key(SEED, name, model), 0, n).astype(np.float64)


def bernoulli_mask(name: str, model: int, t: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return np.ones(t.shape, bool)
    return (uniforms(name, model, t.size) < round(density * 2.0**32)).reshape(t.shape)


def della_mask(name: str, model: int, t: np.ndarray, density: float, eps: float) -> np.ndarray:
    if density >= 1:
        return np.ones(t.shape, bool)
    if t.ndim >= 2:
        n = t.shape[1]
        m = np.abs(t).reshape(t.shape[0], n, -1)
        ranks = np.argsort(np.argsort(m, axis=1, kind="stable"), axis=1, kind="stable")
        rn = (ranks / (n - 1)).reshape(t.shape)
    elif t.ndim == 1 and t.size > 1:
        rn = stable_ranks(t) / (t.size - 1)
    else:
        rn = np.full(t.shape, 0.5)
    p = density - eps + rn * 2 * eps
    return uniforms(name, model, t.size).reshape(t.shape) < p * 2.0**32


def l1_scale(t: np.ndarray, keep: np.ndarray) -> float:
    before = float(np.abs(t.astype(np.float64)).sum())
    after = float(np.abs(np.where(keep, t, 0).astype(np.float64)).sum())
    return 1.0 if before < 1e-7 or after < 1e-7 else before / after


def ref_merge(
    base: np.ndarray,
    fts: list[np.ndarray],
    masks: list[np.ndarray],
    scales: list[float],
    weights: list[float],
    consensus: bool,
    normalize: bool,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The merged tensor in float64, and the magnitude of its terms (for the ulp check)."""
    b = base.astype(np.float64)
    d = [
        w * (s * np.where(m, f.astype(np.float64) - b, 0.0))
        for f, m, s, w in zip(fts, masks, scales, weights, strict=True)
    ]
    if consensus:
        elected = np.where(sum(d) >= 0, 1.0, -1.0)
        agree = [np.sign(x) == elected for x in d]
        merged = sum(np.where(a, x, 0.0) for a, x in zip(agree, d, strict=True))
        div = sum(np.where(a, w, 0.0) for a, w in zip(agree, weights, strict=True))
        div = np.where(div == 0, 1.0, div)
    else:
        merged = sum(d)
        div = float(sum(weights))
        div = 1.0 if abs(div) < 1e-8 else div
    mag = sum(np.abs(x) for x in d)
    if normalize:
        merged = merged / div
        mag = mag / np.abs(div)
    return b + lam * merged, np.abs(b) + abs(lam) * mag


def check(out: dict[str, np.ndarray], t: dict, ref_tensor: Any) -> None:
    base = t["base"]
    for name, got in out.items():
        if base[name].dtype.kind == "i":
            np.testing.assert_array_equal(got, base[name])
            continue
        exact, mag = ref_tensor(name)
        assert got.dtype == base[name].dtype
        # 16-bit outputs are computed in float32 (a handful of roundings, far below a bf16
        # ulp except where the merge cancels), 32-bit ones in float64.
        assert_matches_float64(got, exact, mag, nterms=8, name=name)


# -- the mergekit family -------------------------------------------------------------------------

GTA = {
    # name: (sparsification, consensus, default normalize, default rescale)
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("outliers", False, False, False),
    "breadcrumbs_ties": ("outliers", True, False, False),
    "della": ("della", True, True, True),
    "della_linear": ("della", False, False, True),
}
DENSITY = (0.3, 0.5, 0.7)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])
@pytest.mark.parametrize("method", list(GTA))
def test_mergekit_family_matches_reference(family, tmp_path: Path, method: str, dtype) -> None:
    paths, t = family(dtype)
    kind, consensus, normalize, rescale = GTA[method]
    per = [
        {"weight": w, "density": d, "gamma": 0.05, "epsilon": 0.1}
        for w, d in zip(WEIGHTS, DENSITY, strict=True)
    ]
    for p in per:
        if kind != "outliers":
            p.pop("gamma")
        if kind != "della":
            p.pop("epsilon")
        if kind is None:
            p.pop("density")
    rec = recipe(method, paths, per, parameters={"lambda": 1.3}, seed=SEED)
    out = run(rec, tmp_path / "out", workers=2)

    def ref(name: str) -> tuple[np.ndarray, np.ndarray]:
        masks, scales = [], []
        for i, m in enumerate("abc"):
            x = tau32(t, name, m)
            d = DENSITY[i]
            if kind is None:
                keep = np.ones(x.shape, bool)
            elif kind == "magnitude":
                keep = topk_mask(x, d)
            elif kind == "random":
                keep = bernoulli_mask(name, i, x, d)
            elif kind == "outliers":
                keep = outlier_mask(x, d, 0.05)
            else:
                keep = della_mask(name, i, x, d, 0.1)
            masks.append(keep)
            scales.append(l1_scale(x, keep) if rescale and kind else 1.0)
        fts = [t[m][name] for m in "abc"]
        return ref_merge(
            t["base"][name], fts, masks, scales, list(WEIGHTS), consensus, normalize, 1.3
        )

    check(out, t, ref)


def test_ties_keeps_exactly_k_despite_ties(family, tmp_path: Path) -> None:
    """bf16 task vectors have many equal magnitudes; exactly max(1, int(d N)) survive."""
    paths, t = family(BF16)
    rec = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": str(paths["base"]),
            "models": [{"model": str(paths["a"]), "parameters": {"weight": 1.0, "density": 0.37}}],
        }
    )
    model = build_model(rec)
    for name, lt in model.items():
        if lt.op is None:
            continue
        got = lt.compute().astype(np.float64) - t["base"][name].astype(np.float64)
        x = tau32(t, name, "a")
        assert x.size < 10 or len(np.unique(np.abs(x))) < x.size  # there are ties
        k = max(1, int(0.37 * x.size))
        kept = got != 0
        assert int(kept.sum()) == k - int((x[topk_mask(x, 0.37)] == 0).sum()), name


# -- the papers' variants ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])
def test_ties_paper_trims_over_the_whole_model(family, tmp_path: Path, dtype) -> None:
    paths, t = family(dtype)
    dens = (0.2, 0.35, 0.5)
    per = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, dens, strict=True)]
    rec = recipe("ties_paper", paths, per, parameters={"lambda": 0.9})
    out = run(rec, tmp_path / "out", workers=2)
    floats = [n for n, v in t["base"].items() if v.dtype.kind != "i"]
    floors = []
    for m, d in zip("abc", dens, strict=True):
        allmag = np.concatenate([np.abs(tau32(t, n, m)).ravel() for n in floats])
        n = allmag.size
        r = n - int(n * d) - 1  # the reference code's kthvalue
        v = np.sort(allmag)[r]
        assert v == np.quantile(allmag, r / (n - 1), method="lower")
        floors.append(v)

    def ref(name: str) -> tuple[np.ndarray, np.ndarray]:
        masks = [np.abs(tau32(t, name, m)) >= f for m, f in zip("abc", floors, strict=True)]
        fts = [t[m][name] for m in "abc"]
        return ref_merge(t["base"][name], fts, masks, [1.0] * 3, list(WEIGHTS), True, True, 0.9)

    check(out, t, ref)


def test_ties_paper_one_pass_threshold_is_within_one_bin(family) -> None:
    """The histogram-only threshold is the lower edge of the exact value's bin: below it by
    less than 2^-7 relative, keeping at most that bin's extra elements."""
    paths, t = family(F32)
    per = [{"density": d} for d in (0.2, 0.35, 0.5)]
    floats = [n for n, v in t["base"].items() if v.dtype.kind != "i"]
    exact = build_model(recipe("ties_paper", paths, per))
    exact.resolved()
    approx = build_model(recipe("ties_paper", paths, per, parameters={"exact_threshold": False}))
    approx.resolved()
    for i, m in enumerate("abc"):
        allmag = np.concatenate([np.abs(tau32(t, n, m)).ravel() for n in floats])
        ve = np.uint32(exact.stats["model_wide_floors"][i]).view(np.float32)  # type: ignore[attr-defined]
        va = np.uint32(approx.stats["model_wide_floors"][i]).view(np.float32)  # type: ignore[attr-defined]
        n = allmag.size
        assert ve == np.sort(allmag)[n - int(n * per[i]["density"]) - 1]
        assert va <= ve and (ve - va) <= ve * 2.0**-7
        extra = int((allmag >= va).sum() - (allmag >= ve).sum())
        in_bin = int(
            ((allmag.view(np.uint32) >> 16) == (np.float32(ve).view(np.uint32) >> 16)).sum()
        )
        assert 0 <= extra <= in_bin


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])
def test_dare_paper_rescales_by_exactly_one_over_density(family, tmp_path: Path, dtype) -> None:
    paths, t = family(dtype)
    dens = (0.1, 0.5, 0.9)
    per = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, dens, strict=True)]
    out = run(recipe("dare_paper", paths, per, seed=SEED), tmp_path / "out", workers=2)

    def ref(name: str) -> tuple[np.ndarray, np.ndarray]:
        masks = [bernoulli_mask(name, i, tau32(t, name, m), dens[i]) for i, m in enumerate("abc")]
        scales = [1.0 / d for d in dens]
        fts = [t[m][name] for m in "abc"]
        return ref_merge(t["base"][name], fts, masks, scales, list(WEIGHTS), False, False, 1.0)

    check(out, t, ref)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])
def test_breadcrumbs_paper_masks_both_tails_per_tensor(family, tmp_path: Path, dtype) -> None:
    paths, t = family(dtype)
    per = [{"weight": w, "beta": 0.6, "gamma": 0.95} for w in WEIGHTS]
    out = run(recipe("breadcrumbs_paper", paths, per), tmp_path / "out", workers=1)

    def ref(name: str) -> tuple[np.ndarray, np.ndarray]:
        masks = []
        for m in "abc":
            x = tau32(t, name, m)
            r = stable_ranks(x)
            masks.append((r >= int(0.6 * x.size)) & (r < int(0.95 * x.size)))
        fts = [t[m][name] for m in "abc"]
        return ref_merge(t["base"][name], fts, masks, [1.0] * 3, list(WEIGHTS), False, False, 1.0)

    check(out, t, ref)


# -- recipe features ---------------------------------------------------------------------------


def test_filters_and_gradients_resolve_per_tensor(family, tmp_path: Path) -> None:
    """mergekit's rules: first matching substring filter wins, then the global value; lists
    are gradients over the layers (t = layer / (L - 1)); non-layer tensors take t = 0."""
    paths, t = family(F32)
    models = [
        {
            "model": str(paths["a"]),
            "parameters": {
                "weight": [{"filter": "self_attn", "value": 0.9}, {"filter": "mlp", "value": 0.2}],
                "density": [0.2, 0.8],
            },
        },
        {"model": str(paths["b"]), "parameters": {"weight": 0.4}},
        {"model": str(paths["c"]), "parameters": {"weight": 0.6, "density": 1.0}},
    ]
    rec = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": str(paths["base"]),
            "models": models,
            "parameters": {"weight": 0.5, "density": 0.5, "normalize": False},
        }
    )
    out = run(rec, tmp_path / "out")

    def params(name: str) -> tuple[list[float], list[float]]:
        wa = 0.9 if "self_attn" in name else 0.2 if "mlp" in name else 0.5
        da = 0.8 if ".layers.1." in name else 0.2  # layers 0 and 1 of 2; others t = 0
        return [wa, 0.4, 0.6], [da, 0.5, 1.0]

    def ref(name: str) -> tuple[np.ndarray, np.ndarray]:
        w, d = params(name)
        masks = [topk_mask(tau32(t, name, m), di) for m, di in zip("abc", d, strict=True)]
        fts = [t[m][name] for m in "abc"]
        return ref_merge(t["base"][name], fts, masks, [1.0] * 3, w, True, False, 1.0)

    check(out, t, ref)


def test_task_arithmetic_uniform_path_is_combine(family, tmp_path: Path) -> None:
    """Plain values go through ops.combine; per-tensor values through per-tensor weighted sums:
    the same coefficients, the same bytes."""
    paths, _t = family(BF16)
    per = [{"weight": w} for w in WEIGHTS]
    uniform = run(recipe("task_arithmetic", paths, per, parameters={"lambda": 0.7}), tmp_path / "u")
    per_f = [{"weight": [{"filter": "*", "value": w}]} for w in WEIGHTS]
    filtered = run(
        recipe("task_arithmetic", paths, per_f, parameters={"lambda": 0.7}), tmp_path / "f"
    )
    from streamvec.ops.combine import TermSpec, combine_terms

    comb = combine_terms(
        [TermSpec(str(paths[m]), w) for m, w in zip("abc", WEIGHTS, strict=True)],
        base=str(paths["base"]),
        scale=0.7,
    )
    for name in uniform:
        assert uniform[name].tobytes() == filtered[name].tobytes(), name
        assert uniform[name].tobytes() == comb[name].compute().tobytes(), name


def test_include_exclude_keep_the_base(family, tmp_path: Path) -> None:
    paths, t = family(BF16)
    per = [{"weight": w, "density": 0.5} for w in WEIGHTS]
    rec = recipe("ties", paths, per)
    merge(rec, tmp_path / "out", include=["*.self_attn.*"], settings=RunSettings(workers=1))
    out = sv.open(tmp_path / "out")
    for name, lt in out.items():
        got = lt.compute()
        same = got.tobytes() == t["base"][name].tobytes()
        assert same == ("self_attn" not in name), name


def test_out_dtype_and_task_vector_store_models(family, tmp_path: Path) -> None:
    """out_dtype rounds once; a streamvec task-vector store is a model whose tau is read as is."""
    paths, t = family(BF16)
    store = tmp_path / "a.zarr"
    (sv.open(paths["a"]) - sv.open(paths["base"])).save(store, progress=False)
    per = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITY, strict=True)]
    ref_rec = recipe("ties", paths, per, out_dtype="float32")
    with_store = parse_recipe(
        {
            **{k: v for k, v in ref_rec.raw.items()},
            "models": [{"model": str(store), "parameters": per[0]}, *ref_rec.raw["models"][1:]],
        }
    )
    a = run(ref_rec, tmp_path / "ckpt")
    b = run(with_store, tmp_path / "store")
    for name in a:
        if t["base"][name].dtype.kind != "i":
            assert a[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name])


def test_svd_methods_run_through_merge_svd(tmp_path: Path) -> None:
    from streamvec.ops.merge_svd import merge_svd
    from streamvec.ops.svd import SVDOptions

    rng = np.random.default_rng(0)
    base = {
        "w": (rng.standard_normal((12, 10)) * 0.02).astype(np.float32),
        "b": np.zeros(10, np.float32),
    }
    paths = {"base": write_checkpoint(tmp_path / "base", base)}
    for m, s in zip("abc", (1, 2, 3), strict=True):
        paths[m] = write_checkpoint(tmp_path / m, finetune(base, s))
    for method, kind in (("tsv", "tsv"), ("iso_c", "iso-c")):
        rec = recipe(method, paths, [{}, {}, {}], parameters={"lambda": 0.8, "rank": 6}, seed=3)
        got = run(rec, tmp_path / f"sv-{method}", workers=1)
        merge_svd(
            kind,
            [str(paths[m]) for m in "abc"],
            tmp_path / f"direct-{method}",
            options=SVDOptions(rank=6, seed=3),
            rank=6,
            alpha=0.8,
            base=str(paths["base"]),
        )
        want = sv.open(tmp_path / f"direct-{method}")
        for name in got:
            np.testing.assert_array_equal(got[name], want[name].compute())


def test_zero_size_and_scalar_tensors(tmp_path: Path) -> None:
    base = {"e": np.zeros((0, 4), np.float32), "s": np.array(0.5, np.float32)}
    paths = {"base": write_checkpoint(tmp_path / "base", base)}
    for m, v in zip("abc", (0.7, 0.2, 0.6), strict=True):
        paths[m] = write_checkpoint(tmp_path / m, {"e": base["e"], "s": np.array(v, np.float32)})
    per = [{"weight": 1.0, "density": 0.5, "epsilon": 0.1} for _ in range(3)]
    out = run(recipe("della", paths, per, seed=SEED), tmp_path / "out")
    assert out["e"].shape == (0, 4)
    assert math.isfinite(float(out["s"]))
