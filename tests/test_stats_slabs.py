"""The slab reader and the per-block sums of ``stats`` on tensors of several slabs.

The end-to-end tests in ``test_stats.py`` use tiny models, whose tensors fit in one slab;
here a tensor spans several slabs with a partial last one, operands are bf16 (read into one
shared buffer and widened together) or mixed bf16/float16/float32 (each on its own), and
every slab and sum is checked against the tensors loaded whole by the safetensors library.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from streamvec.errors import InputChangedError
from streamvec.io.blocks import matrix_shape
from streamvec.ops.stats import fused, slabs
from streamvec.ops.stats.fused import FusedStat
from streamvec.ops.stats.inputs import open_inputs
from streamvec.ops.stats.slabs import SlabReader
from tests.conftest import BF16, write_checkpoint

NAME = "model.layers.0.mlp.up_proj.weight"
SHAPE = (601, 517)  # 310717 elements: two whole slabs of 2^17 and a partial one


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("slabs")
    w = (rng.standard_normal(SHAPE) * 0.02).astype(BF16).astype(np.float32)
    delta = (rng.standard_normal(SHAPE) * 1e-3).astype(np.float32)
    delta[:40] = 0.0  # frozen rows: exact zeros in the task vector
    out = {"base": write_checkpoint(root / "base", {NAME: w.astype(BF16)})}
    for name, dtype, scale in (
        ("bf16", BF16, 1.0),
        ("bf16b", BF16, -0.5),
        ("f32", np.dtype(np.float32), 2.0),
        ("f16", np.dtype(np.float16), 1.0),
    ):
        out[name] = write_checkpoint(root / name, {NAME: (w + scale * delta).astype(dtype)})
    return out


def whole(path: Path) -> np.ndarray:
    """The tensor as the safetensors library loads it, upcast to float32."""
    x = safetensors.numpy.load_file(str(path / "model.safetensors"))[NAME]
    return x.astype(np.float32).ravel()


@pytest.mark.parametrize("terms", [["bf16", "bf16b"], ["bf16", "f32", "f16"]])
@pytest.mark.parametrize("rows", [(0, SHAPE[0]), (7, 590)])
def test_slabs_equal_the_whole_tensor(ckpts, terms, rows) -> None:
    t = open_inputs([ckpts[k] for k in terms], base=ckpts["base"]).tensors[0]
    paths = [Path(r.path).parent for r in t.readers]  # type: ignore[attr-defined]
    want = [whole(p) for p in paths]
    r0, r1 = rows
    _, cols = matrix_shape(t.shape)
    size, width = (r1 - r0) * cols, fused.SLAB
    assert size > 2 * width
    with SlabReader(t.readers, r0, r1, width) as rd:
        for s0 in range(0, size, width):
            s1 = min(size, s0 + width)
            got = rd.load(s0, s1)
            for g, x in zip(got, want, strict=True):
                assert g.dtype == np.float32
                np.testing.assert_array_equal(g, x[r0 * cols + s0 : r0 * cols + s1])


@pytest.mark.parametrize("terms", [["bf16", "bf16b"], ["bf16", "f32", "f16"]])
def test_block_sums_over_several_slabs_match_float64(ckpts, terms) -> None:
    t = open_inputs([ckpts[k] for k in terms], base=ckpts["base"]).tensors[0]
    base = whole(ckpts["base"])
    taus = [(whole(ckpts[k]) - base).astype(np.float64) for k in terms]  # upcast, subtract
    mags = [np.abs(x).astype(np.float32) for x in taus]
    thr = np.array([np.quantile(m, 0.8) for m in mags], np.float32)  # some top set each
    got = FusedStat(t.shape, t.readers, t.coefs, t.base)(0, SHAPE[0], thr.view(np.uint32))
    want_gram = np.array([[np.dot(a, b) for b in taus] for a in taus])
    want_abs = np.array([[np.dot(abs(a), abs(b)) for b in taus] for a in taus])
    np.testing.assert_allclose(got.gram, want_gram, rtol=1e-12)
    np.testing.assert_allclose(got.absgram, want_abs, rtol=1e-12)
    b64 = base.astype(np.float64)
    assert got.base_sq == pytest.approx(float(np.dot(b64, b64)), rel=1e-12)
    np.testing.assert_array_equal(got.maxabs, [m.max() for m in mags])
    np.testing.assert_array_equal(got.zeros, [int((x == 0).sum()) for x in taus])
    assert got.zeros[0] >= 40 * SHAPE[1]  # the frozen rows (bf16 and float32 are exact)
    tops = [(m >= h) & (m > 0) for m, h in zip(mags, thr, strict=True)]
    want_both = np.array([[int((a & b).sum()) for b in tops] for a in tops])
    assert got.top_both is not None
    np.testing.assert_array_equal(got.top_both, want_both)


def test_sampled_runs_equal_the_whole_tensor(ckpts) -> None:
    """Runs read with one pread each are the tensor's."""
    t = open_inputs([ckpts["f16"]], base=ckpts["base"]).tensors[0]
    starts = np.sort(np.random.default_rng(3).choice(SHAPE[0] * SHAPE[1] - 32, 97, replace=False))
    for r in t.readers:
        want = whole(Path(r.path).parent)  # type: ignore[attr-defined]
        got = slabs.read_runs(r, starts, 32)  # type: ignore[arg-type]
        np.testing.assert_array_equal(got, want[starts[:, None] + np.arange(32)])


def test_sampled_runs_of_a_truncated_file_are_an_error(ckpts, tmp_path) -> None:
    import shutil

    src = tmp_path / "ft"
    shutil.copytree(ckpts["bf16"], src)
    t = open_inputs([src], base=ckpts["base"]).tensors[0]
    r = next(r for r in t.readers if Path(r.path).parent == src)  # type: ignore[attr-defined]
    starts = np.array([0, 1000, SHAPE[0] * SHAPE[1] - 32])
    with open(r.path, "r+b") as f:  # type: ignore[attr-defined]
        f.truncate(r.offset + 2000)  # type: ignore[attr-defined]
    with pytest.raises(InputChangedError, match="ft/model.safetensors"):
        slabs.read_runs(r, starts, 32)  # type: ignore[arg-type]
    r2 = replace(r, stamp=None)  # no stamp to compare: the short read is what says it
    with pytest.raises(InputChangedError, match="ended while reading"):
        slabs.read_runs(r2, starts, 32)  # type: ignore[arg-type]


def test_a_sampled_tensor_is_read_ahead_whole(ckpts, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a cold cache, each of the sample's scattered runs is one disk request: the sample
    asks for its whole tensor first, in order (the pass's blocks then find it cached)."""
    import streamvec as sv
    from streamvec.io.blocks import SafetensorsReader
    from streamvec.ops.stats import StatsOptions

    advised: list[tuple[str, int, int]] = []
    real_prefetch = SafetensorsReader.prefetch

    def record_prefetch(self, r0, r1):  # type: ignore[no-untyped-def]
        advised.append((Path(self.path).parent.name, r0, r1))
        real_prefetch(self, r0, r1)  # and really advise the kernel: must not fail

    monkeypatch.setattr(SafetensorsReader, "prefetch", record_prefetch)
    options = StatsOptions(topk_sample=1024)  # SHAPE's 310717 elements are sampled
    sv.stats([ckpts["bf16"], ckpts["bf16b"]], base=ckpts["base"], options=options)
    rows = SHAPE[0]
    assert sorted(advised) == [("base", 0, rows), ("bf16", 0, rows), ("bf16b", 0, rows)]
    advised.clear()
    sv.stats([ckpts["bf16"]], base=ckpts["base"], options=replace(options, density=0.0))
    assert advised == []  # no sample, nothing asked for


@pytest.mark.parametrize("terms", [["bf16", "bf16b"], ["bf16", "f32", "f16"]])
def test_any_combination_histogram_and_counts_only_match_numpy(ckpts, terms) -> None:
    """The compiled loop forms each vector with numpy's float32 steps, in order (multiply,
    then add: its bits, so maxima, zeros, counts and histograms are numpy's exactly), for any
    coefficients, with a histogram (``--exact-topk``'s first pass) and without the moments
    (its second pass)."""
    t = open_inputs([ckpts[k] for k in terms], base=ckpts["base"]).tensors[0]
    ops = [whole(Path(r.path).parent) for r in t.readers]  # type: ignore[attr-defined]
    rng = np.random.default_rng(11)
    coefs = (
        tuple(rng.choice([0.5, -1.5, 0.3, 1.0, -1.0], len(ops))),  # an analogy, scaled
        tuple(-1.0 if i == t.base else 0.0 for i in range(len(ops))),  # a negated base
        tuple(0.0 for _ in ops),  # no terms: all zeros
    )
    taus = []
    for row in coefs:
        acc = np.zeros_like(ops[0])
        for i, (c, x) in enumerate((c, x) for c, x in zip(row, ops, strict=True) if c != 0.0):
            term = x if c == 1.0 else x * np.float32(c)  # float32, rounded, like numpy's path
            acc = term.copy() if i == 0 else (acc - x if c == -1.0 else acc + term)
        taus.append(acc)
    bits = [x.view(np.uint32) & np.uint32(0x7FFFFFFF) for x in taus]
    thr = np.array([np.quantile(b, 0.9) for b in bits], np.uint32)
    stat = FusedStat(t.shape, t.readers, coefs, t.base, histogram=True)
    got = stat(0, SHAPE[0], thr)
    t64 = [x.astype(np.float64) for x in taus]
    want_gram = np.array([[np.dot(a, b) for b in t64] for a in t64])
    np.testing.assert_allclose(got.gram, want_gram, rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(got.maxabs, [b.max().view(np.float32) for b in bits])
    np.testing.assert_array_equal(got.zeros, [int((b == 0).sum()) for b in bits])
    assert got.zeros[2] == SHAPE[0] * SHAPE[1]
    assert got.hist is not None
    for h, b in zip(got.hist, bits, strict=True):
        np.testing.assert_array_equal(h, np.bincount(b >> 16, minlength=h.size))
    tops = [(b >= max(h, 1)) for b, h in zip(bits, thr, strict=True)]
    want_both = np.array([[int((a & b).sum()) for b in tops] for a in tops])
    np.testing.assert_array_equal(got.top_both, want_both)
    counts_only = replace(stat, moments=False, histogram=False)(0, SHAPE[0], thr)
    np.testing.assert_array_equal(counts_only.top_both, want_both)
    assert counts_only.hist is None and not counts_only.gram.any()
