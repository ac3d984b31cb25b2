"""The held SVD path: one read of the inputs (digests taken on the way), and its accuracy
against the exact float64 SVD at the default (automatic) power iterations."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import streamvec as sv
from streamvec.compute.linalg import DEFAULT_POWER_ITERS
from streamvec.compute.linalg.rsvd import randomized_svd_in_memory
from streamvec.engine.jobs import read_done_entries, tensor_input_digests
from streamvec.model.tensor import LazyTensor
from streamvec.ops.held import read_matrix
from streamvec.ops.svd import RunOptions, SVDOptions, svd
from tests.conftest import write_checkpoint


def spectrum_matrix(m: int, n: int, seed: int) -> np.ndarray:
    """float32 low-rank + noise with a decaying spectrum (as task vectors have)."""
    rng = np.random.default_rng(seed)
    r = 48
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    s = 5.0 * 0.93 ** np.arange(r)
    noise = 0.02 * rng.standard_normal((m, n))
    return ((u * s) @ v.T + noise).astype(np.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("held")
    rng = np.random.default_rng(3)
    deltas = {
        "a.weight": spectrum_matrix(300, 96, 1),
        "b.weight": spectrum_matrix(64, 200, 2),
        "norm.weight": rng.standard_normal(96).astype(np.float32),
    }
    base = {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in deltas.items()}
    ft = {k: (base[k] + v).astype(np.float32) for k, v in deltas.items()}
    return {
        "base": write_checkpoint(root / "base", base),
        "ft": write_checkpoint(root / "ft", ft),
    }


def test_read_matrix_is_one_read_with_the_digests(pair: dict[str, Path]) -> None:
    t = (sv.open(pair["ft"]) - sv.open(pair["base"])).resolved().tensors["a.weight"]
    for block_bytes in (1 << 30, 37 * 96 * 4):  # one block; blocks of 37 rows (9 blocks)
        held = read_matrix(t, block_bytes)
        assert np.array_equal(held.values, t.read_rows(0, 300))  # the kernel's own values
        assert held.digests == tensor_input_digests(t, 0, 300, 64)
        assert held.name == "a.weight"


def test_a_store_matrix_is_decoded_in_place_with_the_digests(
    pair: dict[str, Path], tmp_path: Path
) -> None:
    """A store's task vector is decoded straight into the matrix (into the caller's memory
    when given): the values and the digests are those of reading it in blocks."""
    from streamvec.ops.task_vector import task_vector

    store = tmp_path / "tau.zarr"
    task_vector(pair["base"], pair["ft"]).save(store, progress=False, block_size="16kB")
    t = sv.open(store).resolved().tensors["a.weight"]  # several chunks, a padded last one
    rows = t.shape[0]
    want = t.read_rows(0, rows)
    held = read_matrix(t)
    assert np.array_equal(held.values, want)
    assert held.digests == tensor_input_digests(t, 0, rows, 7)
    space = np.full(t.shape, np.nan, np.float32)
    into = read_matrix(t, out=space)
    assert into.values is space and np.array_equal(space, want)
    assert into.digests == held.digests


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_held_memory_is_reused_without_changing_a_result(
    pair: dict[str, Path], method: str
) -> None:
    """One factorizer holds each matrix in the memory the previous one used (the larger one
    first, then a smaller one, then the larger again): results equal a fresh factorizer's."""
    from streamvec.ops.factorize import Factorizer

    tensors = (sv.open(pair["ft"]) - sv.open(pair["base"])).resolved().tensors
    a, b = tensors["a.weight"], tensors["b.weight"]
    options = SVDOptions(rank=8, method=method)
    run = RunOptions(progress=False)
    shared = Factorizer(options, run, {})
    results = []
    for t in (a, b, a):
        got, plan = shared.factor(t, 8, seed=5)
        assert plan.method == method and (plan.held or method == "exact")
        results.append((t, got))
    # compared after all three: no result may live in the memory the next matrix took
    for t, got in results:
        want, _ = Factorizer(options, run, {}).factor(t, 8, seed=5)
        for x, y in zip((got.U, got.S, got.Vh), (want.U, want.S, want.Vh), strict=True):
            assert np.array_equal(x, y)
    if method == "randomized":  # the larger matrix's memory, kept: one map
        assert len(shared._held) == 1 and len(shared._held._free[0]) >= 300 * 96 * 4
    else:  # LAPACK's memory is planned without a held matrix beside it
        assert len(shared._held) == 0


def test_svd_reads_each_held_matrix_once(
    pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the digests `--resume` checks were taken by a second read of every tensor
    (256 kB at a time, decoding compressed chunks several times: 60% of a 0.1B run)."""
    rows_read: Counter[str] = Counter()
    original = LazyTensor.read_operands

    def counting(self: LazyTensor, r0: int, r1: int) -> list[tuple[float, np.ndarray]]:
        rows_read[self.name] += r1 - r0
        return original(self, r0, r1)

    monkeypatch.setattr(LazyTensor, "read_operands", counting)
    out = tmp_path / "tau.zarr"
    svd(
        pair["ft"],
        out,
        options=SVDOptions(rank=8, method="randomized"),
        base=pair["base"],
        run=RunOptions(progress=False, memory_limit="2GB"),
    )
    assert rows_read["a.weight"] == 300 and rows_read["b.weight"] == 64
    # What was logged for --resume is the digest of the inputs, as a separate read gives.
    monkeypatch.setattr(LazyTensor, "read_operands", original)
    t = (sv.open(pair["ft"]) - sv.open(pair["base"])).resolved().tensors["a.weight"]
    assert tensor_input_digests(t, 0, 300, 64) == held_digest(t)


def held_digest(t: LazyTensor) -> list[str]:
    return read_matrix(t).digests


def test_resume_log_holds_the_read_digests(
    pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The done log written during a run carries the digests of the one read."""
    from streamvec.engine import jobs

    logged: dict[str, list[str] | None] = {}
    real = jobs.remove_job_files

    def keep_log(partial: Path) -> None:
        logged.update({n: inputs for (n, _), (_, inputs) in read_done_entries(partial).items()})
        real(partial)

    monkeypatch.setattr(jobs, "remove_job_files", keep_log)
    monkeypatch.setenv("STREAMVEC_SYNC_SECONDS", "0")  # every tensor logged as it finishes
    svd(
        pair["ft"],
        tmp_path / "tau.zarr",
        options=SVDOptions(rank=8),
        base=pair["base"],
        run=RunOptions(progress=False),
    )
    tv = (sv.open(pair["ft"]) - sv.open(pair["base"])).resolved().tensors
    for name in ("a.weight", "b.weight", "norm.weight"):
        rows = tv[name].shape[0]
        assert logged[name] == tensor_input_digests(tv[name], 0, rows, 16)


@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("shape", [(600, 256), (256, 700)])
def test_held_default_iterations_within_one_percent_of_exact(
    rank: int, shape: tuple[int, int]
) -> None:
    """The default power iterations reach 1.01x the exact float64 truncated SVD's residual
    (the accuracy bar the speed comparisons are made at)."""
    a = spectrum_matrix(*shape, seed=rank)
    s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    optimal = np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2))
    r = randomized_svd_in_memory(a, rank, power_iters=DEFAULT_POWER_ITERS, seed=5)
    u, vh = r.U.astype(np.float64), r.Vh.astype(np.float64)
    direct = np.linalg.norm(a - (u * r.S) @ vh) / np.linalg.norm(a.astype(np.float64))
    assert direct <= 1.01 * optimal
    assert abs(direct - r.residual) <= 1e-5  # the recorded residual is the real one
    np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-5)
    np.testing.assert_allclose(vh @ vh.T, np.eye(rank), atol=1e-5)
