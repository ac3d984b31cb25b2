"""``streamvec decompose`` (shared/unique) and ``streamvec merge-svd`` (TSV-M, Iso-C) against
direct in-memory implementations of the formulas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamvec.compute.linalg import common_subspace, iso_c_merge, split_shared_unique, tsv_merge
from streamvec.io.zarr.lowrank import read_svd_store
from streamvec.io.zarr.store import read_store
from streamvec.model.sources import open as sv_open
from streamvec.ops.merge_svd import iso_c_factors, tsv_factors
from tests.conftest import run_cli, write_checkpoint

EPS32 = float(np.finfo(np.float32).eps)
SHAPES = {"l0.attn.q.weight": (48, 32), "l0.mlp.up.weight": (40, 24), "l0.norm.weight": (32,)}


def orth(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((m, k)))
    return q


def write_tv(root: Path, name: str, tensors: dict[str, np.ndarray]) -> Path:
    """A task-vector store holding exactly ``tensors`` (float32): ft = tau over a zero base."""
    base = root / "zero-base"
    if not base.exists():
        write_checkpoint(base, {k: np.zeros(v.shape, np.float32) for k, v in tensors.items()})
    ft = write_checkpoint(
        root / f"{name}-ft", {k: v.astype(np.float32) for k, v in tensors.items()}
    )
    out = root / f"{name}.zarr"
    (sv_open(ft) - sv_open(base)).save(out, progress=False)
    return out


def read_all(path: Path) -> dict[str, np.ndarray]:
    model = sv_open(path)
    return {name: model[name].compute().astype(np.float64) for name in model}


@pytest.fixture(scope="module")
def structured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Three tasks sharing a 2-D column space per matrix, each with 2 directions of its own.

    ``tau_i = [C | U_i] diag(s) [V_i]^T + noise``: with K = 4 the common subspace is C
    (overlap ~1) and the tasks' own directions overlap ~0 (random in 48 dims).
    """
    root = tmp_path_factory.mktemp("structured")
    rng = np.random.default_rng(0)
    taus: list[dict[str, np.ndarray]] = [{}, {}, {}]
    for name, shape in SHAPES.items():
        if len(shape) < 2:
            for t in taus:
                t[name] = 0.01 * rng.standard_normal(shape)
            continue
        m, n = shape
        basis = orth(rng, m, 2 + 2 * 3)  # (m, 8): 2 shared + 2 per task, all orthogonal
        for i, t in enumerate(taus):
            cols = np.concatenate([basis[:, :2], basis[:, 2 + 2 * i : 4 + 2 * i]], axis=1)
            v = orth(rng, n, 4)
            s = np.array([3.0, 2.5, 2.0, 1.5])
            t[name] = (cols * s) @ v.T + 1e-3 * rng.standard_normal((m, n))
    taus32 = [{k: v.astype(np.float32) for k, v in t.items()} for t in taus]
    paths = [write_tv(root, f"task{i}", t) for i, t in enumerate(taus32)]
    return {"paths": paths, "taus": taus32, "root": root}


def reference_decomposition(
    taus: list[dict[str, np.ndarray]], rank: int, threshold: float
) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """In memory: top-K left singular vectors (float64 LAPACK), common subspace, split."""
    out: list[dict[str, tuple[np.ndarray, np.ndarray]]] = [{} for _ in taus]
    for name in taus[0]:
        if taus[0][name].ndim < 2:
            for o, t in zip(out, taus, strict=True):
                o[name] = (np.zeros_like(t[name]), t[name])
            continue
        us = [np.linalg.svd(t[name].astype(np.float64))[0][:, :rank] for t in taus]
        c = common_subspace(us, threshold=threshold)
        for o, t in zip(out, taus, strict=True):
            o[name] = split_shared_unique(t[name], c)
    return out


def test_decompose_matches_in_memory_formula(structured, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    paths = structured["paths"]
    assert run_cli("decompose", *paths, "-o", out, "--rank", "4", "-q") == 0
    manifest = json.loads((out / "decomposition.json").read_text())
    assert manifest["shared_dims"] == {"l0.attn.q.weight": 2, "l0.mlp.up.weight": 2}
    want = reference_decomposition(structured["taus"], 4, 0.85)
    for i, path in enumerate(paths):
        stem = path.name[: -len(".zarr")]
        shared_path, unique_path = out / f"{stem}.shared.zarr", out / f"{stem}.unique.zarr"
        assert manifest["components"][str(path)] == {
            "shared": shared_path.name,
            "unique": unique_path.name,
        }
        shared_info = read_svd_store(shared_path)
        assert shared_info.attrs["component"] == "shared" and shared_info.attrs["task_index"] == i
        unique_info = read_store(unique_path)
        assert unique_info.kind == "task_vector" and unique_info.attrs["component"] == "unique"
        shared, unique = read_all(shared_path), read_all(unique_path)
        for name, tau in structured["taus"][i].items():
            ref_shared, ref_unique = want[i][name]
            scale = float(np.max(np.abs(tau)))
            # Factors are float32 (~1e-7 relative); the reference is float64 throughout.
            np.testing.assert_allclose(shared[name], ref_shared, atol=1e-5 * scale)
            np.testing.assert_allclose(unique[name], ref_unique, atol=1e-5 * scale)
            # shared + unique = tau within one float32 rounding of each operation.
            t64 = tau.astype(np.float64)
            bound = 2 * EPS32 * np.maximum(np.abs(t64), np.abs(shared[name]))
            assert np.all(np.abs(shared[name] + unique[name] - t64) <= bound + 1e-30), name
            if tau.ndim < 2:
                assert not shared[name].any() and np.array_equal(unique[name], t64)


def test_decompose_identical_and_orthogonal(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    m, n = 40, 30
    u = orth(rng, m, 6)
    same = ((u[:, :3] * [2.0, 1.5, 1.0]) @ orth(rng, n, 3).T).astype(np.float32)  # rank 3
    other = ((u[:, 3:] * [2.0, 1.5, 1.0]) @ orth(rng, n, 3).T).astype(np.float32)  # orthogonal
    a = write_tv(tmp_path, "a", {"w": same})
    a2 = write_tv(tmp_path, "a2", {"w": same})
    b = write_tv(tmp_path, "b", {"w": other})

    out = tmp_path / "ident"
    assert run_cli("decompose", a, a2, "-o", out, "--rank", "4", "-q") == 0
    for stem in ("a", "a2"):
        shared = read_all(out / f"{stem}.shared.zarr")["w"]
        unique = read_all(out / f"{stem}.unique.zarr")["w"]
        np.testing.assert_allclose(shared, same, atol=1e-6 * np.abs(same).max())
        assert np.abs(unique).max() <= 1e-6 * np.abs(same).max()

    out = tmp_path / "orth"
    assert run_cli("decompose", a, b, "-o", out, "--rank", "3", "-q") == 0
    assert json.loads((out / "decomposition.json").read_text())["shared_dims"] == {"w": 0}
    for stem, tau in (("a", same), ("b", other)):
        assert not read_all(out / f"{stem}.shared.zarr")["w"].any()
        assert np.array_equal(read_all(out / f"{stem}.unique.zarr")["w"], tau)


def test_components_are_combine_terms(synth_family, tmp_path: Path) -> None:
    """The two documented one-line commands, on checkpoints decomposed against --base."""
    fam = synth_family
    out = tmp_path / "parts"
    rc = run_cli(
        "decompose",
        fam["a"],
        fam["b"],
        "--base",
        fam["base"],
        "-o",
        out,
        "--rank",
        "4",
        "--threshold",
        "0.5",
        "-q",
    )
    assert rc == 0
    detox, multi = tmp_path / "detox", tmp_path / "multi"
    assert (
        run_cli("combine", "--base", fam["base"], "-o", detox, out / "a.unique.zarr:-1", "-q") == 0
    )
    rc = run_cli(
        "combine",
        "--base",
        fam["base"],
        "-o",
        multi,
        out / "a.shared.zarr",
        out / "b.shared.zarr",
        "-q",
    )
    assert rc == 0
    base, unique = sv_open(fam["base"]), sv_open(out / "a.unique.zarr")
    edited = sv_open(detox)
    name = "model.layers.0.self_attn.q_proj.weight"
    want = base[name].compute().astype(np.float64) - unique[name].compute()
    assert np.array_equal(edited[name].compute(), want.astype(edited[name].dtype))
    # a's task vector = shared + unique, within float32 rounding.
    tau = (sv_open(fam["a"]) - base)[name].compute().astype(np.float64)
    shared = sv_open(out / "a.shared.zarr")[name].compute().astype(np.float64)
    u = unique[name].compute().astype(np.float64)
    assert np.all(np.abs(shared + u - tau) <= 2 * EPS32 * np.maximum(np.abs(tau), np.abs(shared)))


# -- merges ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def independent(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Three unrelated low-rank + noise task vectors.

    Not ``structured``: there every task's top directions are the same shared ones, so the
    concatenated bases TSV-M orthogonalises are rank-deficient and their polar factor is not
    unique (any rounding picks another one); TSV-M assumes distinct task directions.
    """
    root = tmp_path_factory.mktemp("independent")
    rng = np.random.default_rng(5)
    taus: list[dict[str, np.ndarray]] = []
    for _ in range(3):
        t = {}
        for name, shape in SHAPES.items():
            if len(shape) < 2:
                t[name] = (0.01 * rng.standard_normal(shape)).astype(np.float32)
                continue
            m, n = shape
            low = (orth(rng, m, 4) * [3.0, 2.5, 2.0, 1.5]) @ orth(rng, n, 4).T
            t[name] = (low + 0.05 * rng.standard_normal((m, n))).astype(np.float32)
        taus.append(t)
    paths = [write_tv(root, f"task{i}", t) for i, t in enumerate(taus)]
    return {"paths": paths, "taus": taus}


def tsv_reference(taus: list[np.ndarray], rank: int) -> np.ndarray:
    """TSV-M written out from the paper's formula, with full float64 SVDs."""
    k = rank // len(taus)
    svds = [np.linalg.svd(t.astype(np.float64), full_matrices=False) for t in taus]
    u = np.concatenate([x[0][:, :k] for x in svds], axis=1)
    s = np.concatenate([x[1][:k] for x in svds])
    v = np.concatenate([x[2][:k].T for x in svds], axis=1)

    def polar(x: np.ndarray) -> np.ndarray:
        p, _, q = np.linalg.svd(x, full_matrices=False)
        return p @ q

    return (polar(u) * s) @ polar(v).T


def iso_c_reference(taus: list[np.ndarray], rank: int | None) -> np.ndarray:
    u, s, vh = np.linalg.svd(sum(t.astype(np.float64) for t in taus), full_matrices=False)
    r = len(s) if rank is None else rank
    return s[:r].mean() * (u[:, :r] @ vh[:r])


@pytest.mark.parametrize(
    ("method", "rank"), [("tsv", 6), ("tsv", None), ("iso-c", None), ("iso-c", 5)]
)
def test_merge_matches_in_memory_formula(independent, tmp_path: Path, method, rank) -> None:
    out = tmp_path / "merged.zarr"
    extra = ["--rank", str(rank)] if rank else []
    rc = run_cli(
        "merge-svd", method, *independent["paths"], "-o", out, "--alpha", "0.7", *extra, "-q"
    )
    assert rc == 0
    got = read_all(out)
    attrs = read_store(out).attrs
    assert attrs["kind"] == "task_vector" and attrs["merge"]["method"] == method
    taus = independent["taus"]
    for name in SHAPES:
        per_task = [t[name] for t in taus]
        if per_task[0].ndim < 2:
            want = np.mean([t.astype(np.float64) for t in per_task], axis=0)
        elif method == "tsv":
            want = tsv_reference(per_task, rank or min(per_task[0].shape))
        else:
            want = iso_c_reference(per_task, rank)
        want = 0.7 * want
        np.testing.assert_allclose(got[name], want, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_merge_with_base_is_an_edited_model(independent, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    base = write_checkpoint(
        tmp_path / "base",
        {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()},
    )
    # Checkpoint terms (ft = base + tau) are turned into task vectors against --base.
    fts = []
    base_t = {k: sv_open(base)[k].compute() for k in SHAPES}
    for i, tau in enumerate(independent["taus"]):
        fts.append(write_checkpoint(tmp_path / f"ft{i}", {k: base_t[k] + tau[k] for k in SHAPES}))
    out = tmp_path / "edited"
    rc = run_cli("merge-svd", "tsv", *fts, "--base", base, "-o", out, "--rank", "6", "-q")
    assert rc == 0
    assert (out / "model.safetensors.index.json").is_file()
    edited = sv_open(out)
    for name in SHAPES:
        taus = [(sv_open(ft)[name].compute().astype(np.float64) - base_t[name]) for ft in fts]
        merged = tsv_reference(taus, 6) if taus[0].ndim == 2 else np.mean(taus, axis=0)
        want = base_t[name] + merged
        np.testing.assert_allclose(edited[name].compute(), want, atol=1e-5 * np.abs(want).max())


def test_factor_forms_equal_the_dense_merges() -> None:
    rng = np.random.default_rng(4)
    svds = []
    for _ in range(3):
        u, s, vh = np.linalg.svd(rng.standard_normal((30, 20)), full_matrices=False)
        svds.append((u[:, :4], s[:4], vh[:4]))
    u, s, vh = tsv_factors(svds, 12)
    np.testing.assert_allclose((u * s) @ vh, tsv_merge(svds, 12), atol=1e-5)
    u, s, vh = iso_c_factors(*svds[0])
    np.testing.assert_allclose((u * s) @ vh, iso_c_merge(svds[0]), atol=1e-5)


def test_randomized_path_agrees(structured, independent, tmp_path: Path) -> None:
    """The streaming method (forced; small matrices would pick exact) gives the same parts.

    Tolerances: the shared directions have singular values 3.0, 2.5 against 2.0, 1.5 and a
    noise floor ~0.01, so q = 2 power iterations pin the subspace to ~1e-6; for TSV-M on
    unrelated tasks the top-2 cut sits at 2.5 vs 2.0 over a noise floor ~0.6, where the
    randomized subspace is good to ~(0.6/2.5)^5 ~ 1e-3 of the spectrum.
    """
    out = tmp_path / "parts"
    paths = structured["paths"]
    rc = run_cli("decompose", *paths, "-o", out, "--rank", "4", "--method", "randomized", "-q")
    assert rc == 0
    want = reference_decomposition(structured["taus"], 4, 0.85)
    for i, path in enumerate(paths):
        shared = read_all(out / f"{path.name[: -len('.zarr')]}.shared.zarr")
        for name, tau in structured["taus"][i].items():
            scale = float(np.max(np.abs(tau)))
            np.testing.assert_allclose(shared[name], want[i][name][0], atol=1e-4 * scale)
    merged = tmp_path / "tsv.zarr"
    rc = run_cli(
        "merge-svd",
        "tsv",
        *independent["paths"],
        "-o",
        merged,
        "--rank",
        "6",
        "--method",
        "randomized",
        "-q",
    )
    assert rc == 0
    name = "l0.attn.q.weight"
    got = read_all(merged)[name]
    ref = tsv_reference([t[name] for t in independent["taus"]], 6)
    assert np.linalg.norm(got - ref) <= 1e-2 * np.linalg.norm(ref)


def test_decompose_with_filters(synth_family, tmp_path) -> None:
    """Filters restrict both components (the unique step used to trip on filtered tensors)."""
    import zarr

    from .conftest import run_cli

    fam = synth_family
    for k in ("a", "b"):  # stores as inputs: no checkpoint to fall back on outside the filter
        assert run_cli("diff", fam["base"], fam[k], "-o", tmp_path / f"{k}.zarr", "-q") == 0
    out = tmp_path / "parts"
    args = [tmp_path / "a.zarr", tmp_path / "b.zarr", "-o", out, "-q", "--rank", "4"]
    assert run_cli("decompose", *args, "--include", "*.self_attn.*") == 0
    for store in sorted(out.glob("*.unique.zarr")):
        names = {a.attrs["name"] for _, a in zarr.open_group(str(store), mode="r").arrays()}
        assert names and all(".self_attn." in n for n in names)
