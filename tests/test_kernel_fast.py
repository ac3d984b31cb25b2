"""The float32 path for one bf16 fine-tune gives the general kernel's bits.

A sample of ``bench/verify_delta_bf16.py`` (which checks every NaN-free pair): every finite
bf16 base value against fine-tune values chosen where double rounding could bite (subnormals,
zeros, the largest finite values, infinities, values far from and next to the base),
compared with the general float64 path bit for bit; where the difference ``f - b`` is exact,
with the float64 formula rounded once (an independent reference); and NaN inputs, whose
slabs go to the general path, NaN payloads included.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamvec.compute import delta_bf16, kernel
from tests.conftest import BF16
from tests.test_kernel_numerics import assert_formula_rounded_once

EVERY = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def fine_tune_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    special = [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x807F, 0x0080, 0x8080, 0x3F80, 0xBF80]
    special += [0x3F81, 0x3F7F, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x0800, 0x8836]
    values = np.array(special + list(rng.integers(0, 1 << 16, 46)), np.uint16)
    return values[~np.isnan(values.view(BF16).astype(np.float32))]  # NaNs: tested below


def pairs() -> tuple[np.ndarray, np.ndarray]:
    """Every finite bf16 base value (rows) against each sampled fine-tune value (columns).

    No pair gives a NaN, so every slab is computed on the fast path (a slab with a NaN in
    its result is handed to the general one).
    """
    f = fine_tune_values()
    every = EVERY[np.isfinite(EVERY.view(BF16).astype(np.float32))]
    b = np.repeat(every, f.size).reshape(-1, f.size)
    return b.view(BF16), np.broadcast_to(f, b.shape).copy().view(BF16)


def general(operands, points):
    """The kernel with the float32 path switched off."""
    saved = delta_bf16.applies
    delta_bf16.applies = lambda *a, **k: False
    try:
        return kernel.combine_blocks(operands, BF16, points)
    finally:
        delta_bf16.applies = saved


@pytest.mark.parametrize("coef", sorted(delta_bf16.FAST_COEFFICIENTS))
@pytest.mark.parametrize("pivot_coef", [1.0, 0.0])
def test_fast_path_has_the_general_kernels_bits(coef: float, pivot_coef: float) -> None:
    b, f = pairs()
    operands = [(pivot_coef - coef, b), (coef, f)]
    p = kernel.plan([c for c, _ in operands], [BF16, BF16], BF16, (True, True))
    assert delta_bf16.applies(p.pivot_coef, p.terms, [BF16, BF16], p.pivot, BF16)
    fast = 0
    real = delta_bf16.combine_slab

    def counted(*args):
        nonlocal fast
        done = real(*args)
        fast += done
        return done

    delta_bf16.combine_slab = counted
    try:
        with np.errstate(all="ignore"):
            got = kernel.combine_blocks(operands, BF16, (True, True))
    finally:
        delta_bf16.combine_slab = real
    slab = kernel.SLAB_ELEMENTS // got.shape[1] * got.shape[1]
    assert fast == -(-got.size // slab)  # every slab on the fast path
    with np.errstate(all="ignore"):
        want = general(operands, (True, True))
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("coef", sorted(delta_bf16.FAST_COEFFICIENTS))
def test_fast_path_is_the_float64_formula_rounded_once(coef: float) -> None:
    """Finite pairs whose difference is exact in float32: the formula on whole tensors."""
    b, f = pairs()
    with np.errstate(all="ignore"):
        b64, f64 = b.astype(np.float64), f.astype(np.float64)
        exact = b64 + coef * (f64 - b64)
        keep = (
            np.isfinite(exact)
            & (np.abs(exact) < 3e38)
            & ((f.astype(np.float32) - b.astype(np.float32)).astype(np.float64) == f64 - b64)
        )
        got = kernel.combine_blocks([(1.0 - coef, b), (coef, f)], BF16, (True, True))
    assert keep.mean() > 0.5  # the pairs of far-apart exponents are left out
    assert_formula_rounded_once(got[keep], exact[keep])


def test_excluded_coefficients_would_differ_and_stay_on_the_general_path() -> None:
    # -1/2: 1.5 b needs a bit more than b; against a subnormal fine-tune value the float32
    # sum lands on a bf16 tie (found by bench/verify_delta_bf16.py)
    b = np.array([[0x082E, 0x0832]], np.uint16).view(BF16)
    f = np.array([[0x8001, 0x0001]], np.uint16).view(BF16)
    operands = [(1.5, b), (-0.5, f)]
    p = kernel.plan([1.5, -0.5], [BF16, BF16], BF16, (True, True))
    assert not delta_bf16.applies(p.pivot_coef, p.terms, [BF16, BF16], p.pivot, BF16)
    want = general(operands, (True, True))
    assert np.array_equal(kernel.combine_blocks(operands, BF16, (True, True)), want)
    out, scratch = np.empty(2, BF16), [np.empty(2, np.float32) for _ in range(2)]
    assert delta_bf16.combine_slab(
        b.reshape(-1), f.reshape(-1), -0.5, 1.0, out, *scratch, np.empty(2, np.uint32)
    )
    assert not np.array_equal(out.view(np.uint16), want.reshape(-1).view(np.uint16))


def test_other_plans_stay_on_the_general_path() -> None:
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    cases = [
        ([0.5, 0.5], [f16, f16], f16),  # float16
        ([0.5, 0.5], [BF16, BF16], f32),  # a float32 output
        ([0.7, 0.3], [BF16, BF16], BF16),  # a weight that is not exact
        ([0.0, 1.0, -0.5], [BF16, BF16, BF16], BF16),  # two fine-tunes
    ]
    for coefs, dtypes, out in cases:
        p = kernel.plan(coefs, dtypes, out, (True,) * len(coefs))
        assert not delta_bf16.applies(p.pivot_coef, p.terms, dtypes, p.pivot, out)
    # a store term (not a checkpoint) is not differenced
    p = kernel.plan([1.0, 0.5], [BF16, BF16], BF16, (True, False))
    assert not delta_bf16.applies(p.pivot_coef, p.terms, [BF16, BF16], p.pivot, BF16)


def test_a_slab_with_a_nan_is_evaluated_on_the_general_path() -> None:
    rng = np.random.default_rng(1)
    rows, cols = 4, kernel.SLAB_ELEMENTS // 2  # two slabs; the second holds NaNs
    b = rng.standard_normal((rows, cols)).astype(np.float32).astype(BF16)
    f = (b.astype(np.float32) + 0.01).astype(BF16)
    f.view(np.uint16)[3, 5] = 0x7F81  # a signalling NaN payload
    b.view(np.uint16)[2, 7] = 0xFFC1
    operands = [(0.5, b), (0.5, f)]
    with np.errstate(invalid="ignore"):
        got = kernel.combine_blocks(operands, BF16, (True, True))
        want = general(operands, (True, True))
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))  # NaN payloads too
    assert np.isnan(got[3, 5].astype(np.float32)) and np.isnan(got[2, 7].astype(np.float32))
