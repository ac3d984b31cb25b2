"""The block kernel's numerics: the delta form, exact cancellation, one correct rounding.

References are independent: the float64 formula ``b + lambda * sum_i w_i (f_i - b)`` on whole
tensors, rounded once by ml_dtypes/numpy; and the previous kernel (the expanded form
``sum c_i x_i`` with ``c_base = 1 - lambda * sum w``, float32 accumulation for 16-bit outputs),
kept here as a copy so the comparison does not depend on the code under test.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import streamvec as sv
from streamvec.compute.kernel import SLAB_ELEMENTS, combine_blocks
from streamvec.ops.combine import TermSpec, combine_terms
from tests.conftest import BF16, rounded_once, write_checkpoint

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def old_expanded_kernel(operands: Sequence[tuple[float, np.ndarray]], out: np.dtype) -> np.ndarray:
    """The kernel before the delta form: ``sum c_i * upcast(x_i)``, rounded once.

    float32 accumulation for 16-bit outputs (and for one exact operation), float64 otherwise.
    """
    coefs = [float(c) for c, _ in operands]
    simple = len(coefs) <= 2 and all(abs(c) == 1.0 for c in coefs)
    acc_dtype = np.float32 if out.itemsize < 4 or (out == F32 and simple) else np.float64
    acc = np.zeros(operands[0][1].shape, acc_dtype)
    for i, (c, x) in enumerate(operands):
        t = x.astype(acc_dtype) * acc_dtype(c) if c != 1.0 else x.astype(acc_dtype)
        acc = t if i == 0 else acc + t
    return acc.astype(out)


def ulp_of(want: np.ndarray) -> np.ndarray:
    """The spacing of ``want``'s dtype at each (finite) element, as float64."""
    bits = BITS[want.dtype.itemsize]
    up = (want.view(bits) + 1).view(want.dtype)  # one step away from zero
    return np.abs(up.astype(np.float64) - want.astype(np.float64))


def near_tie(exact: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Where the float64 formula's own rounding decides the result: within float64 noise
    of a tie of ``dtype``, or of 0 (terms of ~0.02 that cancel leave ~1e-18 either way).

    A tie is the midpoint between the rounded value and either neighbour: at a power of two
    the neighbour toward zero is half as far as the one away from it (measuring both sides
    with the spacing away from zero missed the ties just below each power of two).
    """
    want = rounded_once(exact, dtype)
    bits = BITS[want.dtype.itemsize]
    w = want.astype(np.float64)
    near = np.abs(exact) < 1e-15
    with np.errstate(invalid="ignore", over="ignore"):
        for step in (1, -1):  # away from zero, toward zero (NaN next to a zero: no tie)
            neighbour = (want.view(bits) + np.array(step).astype(bits)).view(want.dtype)
            n = neighbour.astype(np.float64)
            mid = (w + n) / 2  # exact in float64
            near |= np.abs(exact - mid) < 1e-6 * np.abs(n - w)
    return near


def assert_formula_rounded_once(got: np.ndarray, exact: np.ndarray) -> None:
    """``got`` is the float64 formula rounded once, bit for bit.

    Where the formula sits within float64 noise of a tie, its own float64 rounding picks the
    side, and a sum evaluated in another order is as right on the other side: there, within
    half an ulp (+ float64 noise) is asked.
    """
    want = rounded_once(exact, got.dtype)
    bits = BITS[got.dtype.itemsize]
    tie = near_tie(exact, got.dtype)
    assert np.array_equal(got.view(bits)[~tie], want.view(bits)[~tie])
    diff = np.abs(got.astype(np.float64) - exact)
    assert np.all((diff <= (0.5 + 1e-6) * ulp_of(want)) | (diff < 1e-15))


def family(dtype: np.dtype, n: int, seed: int, spread: float) -> tuple[np.ndarray, list]:
    """A base and three fine-tunes near it; fine-tune 0 zeroes the first 64 elements and the
    three agree exactly on elements [64, 128) (all set to one value)."""
    rng = np.random.default_rng(seed)
    base = (0.02 * rng.standard_normal(n)).astype(np.float32).astype(dtype)
    fts = []
    for _ in range(3):
        noise = spread * 0.02 * rng.standard_normal(n).astype(np.float32)
        fts.append((base.astype(np.float32) + noise).astype(dtype))
    fts[0][:64] = 0
    for f in fts[1:]:
        f[:64] = base[:64]  # only fine-tune 0 touched these
    common = (0.01 * rng.standard_normal(64)).astype(np.float32).astype(dtype)
    for f in fts:
        f[64:128] = common
    return base, fts


def float64_formula(base: np.ndarray, fts: list, weights: Sequence[float], lam: float):
    b = base.astype(np.float64)
    acc = np.zeros_like(b)
    for w, f in zip(weights, fts, strict=True):
        acc += w * (f.astype(np.float64) - b)
    return b + lam * acc


def kernel_operands(base, fts, weights, lam):
    """What the algebra hands the kernel for ``base + lam * sum w_i (f_i - base)``."""
    coef_base = 1.0 + sum(-1.0 * w for w in weights) * lam
    ops = [(coef_base, base)] + [(lam * w, f) for w, f in zip(weights, fts, strict=True)]
    return [(c, x.reshape(64, -1)) for c, x in ops], (True,) * 4


CASES = [((1.0, -0.5, 0.3), 1.0), ((0.2, 0.3, -0.5), 1.0), ((0.2, 0.3, -0.5), 0.7)]


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize(("weights", "lam"), CASES)
def test_exact_cancellation_matches_the_float64_formula(dtype, weights, lam) -> None:
    base, fts = family(dtype, 64 * 1024, seed=1, spread=0.05)
    ops, points = kernel_operands(base, fts, weights, lam)
    got = combine_blocks(ops, dtype, points).reshape(-1)
    exact = float64_formula(base, fts, weights, lam)
    bits = BITS[dtype.itemsize]
    # the cancellations equal the float64 formula rounded once, bit for bit
    assert np.array_equal(got[:128].view(bits), rounded_once(exact[:128], dtype).view(bits))
    assert_formula_rounded_once(got, exact)  # and so does every other element
    if weights[0] == 1.0 and lam == 1.0:
        # fine-tune 0 set the weight to zero and nothing else moved it: exactly 0
        assert np.all(got[:64].astype(np.float64) == 0.0)
        old = old_expanded_kernel(ops, dtype).reshape(-1)
        if dtype != F16:  # (float16 flushes the expanded form's +-1e-11 to 0)
            assert np.any(old[:64].astype(np.float64) != 0.0)  # what the expanded form left
    if sum(weights) == 0.0 and lam == 1.0:
        # all three moved the same way and the weights sum to 0: the base itself
        assert np.array_equal(got[64:128].view(bits), base[64:128].view(bits))


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("spread", [0.05, 1.0])
def test_equals_the_old_kernel_wherever_it_was_within_half_an_ulp(dtype, spread) -> None:
    base, fts = family(dtype, 2 * SLAB_ELEMENTS + 4096, seed=2, spread=spread)
    weights, lam = (1.0, -0.5, 0.3), 0.8
    ops, points = kernel_operands(base, fts, weights, lam)
    got = combine_blocks(ops, dtype, points).reshape(-1)
    old = old_expanded_kernel(ops, dtype).reshape(-1)
    exact = float64_formula(base, fts, weights, lam)
    bits = BITS[dtype.itemsize]
    # the old kernel within half an ulp (off the float64 formula's own near-ties)
    correct = (old.view(bits) == rounded_once(exact, dtype).view(bits)) & ~near_tie(exact, dtype)
    assert correct.mean() > 0.9  # the comparison covers most elements
    assert np.array_equal(got.view(bits)[correct], old.view(bits)[correct])
    # and everywhere else the float64 formula rounded once
    assert_formula_rounded_once(got, exact)


def test_store_only_sums_and_single_terms_are_correctly_rounded() -> None:
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((8, 4096)).astype(np.float32) for _ in range(3)]
    coefs = (0.3, -0.7, 0.11)
    exact = sum(c * x.astype(np.float64) for c, x in zip(coefs, xs, strict=True))
    for out in (BF16, F16, F32):
        got = combine_blocks(list(zip(coefs, xs, strict=True)), out)
        assert np.array_equal(got.astype(np.float64), rounded_once(exact, out).astype(np.float64))
    # one term scaled: float64 product, one rounding (no float32 product rounded again)
    b = xs[0].astype(BF16)
    got = combine_blocks([(0.3, b)], BF16)
    assert np.array_equal(
        got.view(np.uint16), rounded_once(0.3 * b.astype(np.float64), BF16).view(np.uint16)
    )


def test_rounding_of_inexact_16_bit_ties_and_specials() -> None:
    """float64 values just off a 16-bit tie, where float64 -> float32 -> 16 bits rounds twice."""
    one = 1.0
    vals = [
        one + 2.0**-8 + 2.0**-30,  # bf16 tie + a little: rounds up
        one + 2.0**-8 - 2.0**-30,  # bf16 tie - a little: rounds down
        one + 2.0**-8,  # an exact tie: to even
        one + 2.0**-11 + 2.0**-40,  # float16 tie + a little
        2.0**-20 + 2.0**-45,  # float16 subnormal range
        np.inf,
        -np.inf,
        np.nan,
        -0.0,
    ]
    x = np.array(vals, np.float64).reshape(1, -1)
    for out in (BF16, F16, F32):
        # 0.5 * (2x): an exact float64 product, so the sum is x itself
        with np.errstate(invalid="ignore"):
            got = combine_blocks([(0.5, 2.0 * x)], out)
        want = rounded_once(x, out)
        nan = np.isnan(want.astype(np.float64))
        assert np.array_equal(np.isnan(got.astype(np.float64)), nan)
        bits = BITS[out.itemsize]
        assert np.array_equal(got.view(bits)[~nan], want.view(bits)[~nan])


@pytest.fixture(scope="module")
def three_finetunes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cancel")
    base, fts = family(BF16, 96 * 256, seed=4, spread=0.05)
    paths = {"base": write_checkpoint(root / "base", {"w": base.reshape(96, 256)})}
    for i, f in enumerate(fts):
        paths[f"ft{i}"] = write_checkpoint(root / f"ft{i}", {"w": f.reshape(96, 256)})
    return paths


@pytest.mark.parametrize(("weights", "lam"), CASES)
def test_combine_from_checkpoints_writes_the_float64_formula(
    three_finetunes: dict[str, Path], tmp_path: Path, weights, lam
) -> None:
    p = three_finetunes
    terms = [TermSpec(str(p[f"ft{i}"]), w) for i, w in enumerate(weights)]
    out = tmp_path / "edited"
    combine_terms(terms, base=p["base"], scale=lam).save(out, progress=False)
    got = safetensors.numpy.load_file(str(next(out.glob("*.safetensors"))))["w"].reshape(-1)
    load = [
        safetensors.numpy.load_file(str(next(p[k].glob("*.safetensors"))))["w"].reshape(-1)
        for k in ("base", "ft0", "ft1", "ft2")
    ]
    assert_formula_rounded_once(got, float64_formula(load[0], load[1:], weights, lam))
    if weights[0] == 1.0:
        assert np.all(got[:64].astype(np.float64) == 0.0)


def test_the_python_expression_uses_the_delta_form(three_finetunes: dict[str, Path]) -> None:
    b, f0 = sv.open(three_finetunes["base"]), sv.open(three_finetunes["ft0"])
    edited = b + 1.0 * (f0 - b) + 0.5 * (sv.open(three_finetunes["ft1"]) - b)
    t = edited["w"]
    assert t.points == (True, True, True)
    got = t.compute().reshape(-1)
    assert np.all(got[:64].astype(np.float64) == 0.0)


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("tie_share", [0.0005, 0.5])
def test_slabs_of_many_or_few_ties_round_like_a_direct_conversion(dtype, tie_share) -> None:
    """A slab where ties are rare (checked one by one) and one where half the elements are
    exact 16-bit ties (checked in one pass), each with inexact ties among them."""
    rng = np.random.default_rng(7)
    n = SLAB_ELEMENTS
    lo = rng.standard_normal(n).astype(dtype).astype(np.float64)
    up = (lo.astype(dtype).view(BITS[2]) + 1).view(dtype).astype(np.float64)
    mid = 0.5 * (lo + up)  # exact 16-bit ties, exact in float64
    x = lo + rng.uniform(0.0, 1.0, n) * (up - lo)
    ties = rng.random(n) < tie_share
    x[ties] = mid[ties]
    nudge = ties & (rng.random(n) < 0.05)  # inexact ties: off by far less than float32 sees
    x[nudge] += np.where(rng.random(nudge.sum()) < 0.5, 1.0, -1.0) * 1e-12 * np.abs(x[nudge])
    x = x.reshape(16, -1)
    got = combine_blocks([(0.5, 2.0 * x)], dtype)  # an exact product: the sum is x
    want = rounded_once(x, dtype)  # one direct rounding
    assert np.array_equal(got.view(BITS[2]), want.view(BITS[2]))


def test_float64_to_bfloat16_is_rounded_once_whatever_the_ml_dtypes_version() -> None:
    # ml_dtypes before 0.7.0 converts float64 -> bfloat16 through float32: a value a little
    # above or below a bf16 tie becomes the tie in float32, then rounds to even (wrongly).
    from streamvec.dtypes import round_once

    rng = np.random.default_rng(3)
    lo = rng.standard_normal(50_000).astype(BF16)
    up = (lo.view(np.uint16) + 1).view(BF16)
    mid = 0.5 * (lo.astype(np.float64) + up.astype(np.float64))  # exact bf16 ties
    x = np.concatenate(
        [mid, mid * (1 + 1e-12), mid * (1 - 1e-12), rng.standard_normal(10_000), [0.0, -0.0]]
    )
    x = np.concatenate([x, 1e-38 * x[:1000], [np.inf, -np.inf, np.nan]])
    got = round_once(x, BF16)
    want = rounded_once(x, BF16)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    # the nudged ties are where a conversion through float32 goes wrong
    through32 = x.astype(np.float32).astype(BF16)
    assert np.count_nonzero(through32.view(np.uint16) != want.view(np.uint16)) >= 50_000
