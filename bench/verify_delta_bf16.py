"""Exhaustive check of the bf16 float32 fast path against the general (float64) kernel.

For each coefficient ``c`` and base weight ``s`` asked for, every pair of bf16 values (a
finite base ``b``, a fine-tune ``f`` that is not a NaN: 65,280 x 65,282 pairs) is combined
into bf16 as ``s b + c (f - b)`` by
:func:`streamvec.compute.kernel.combine_blocks` twice: as it runs (the float32 path of
:mod:`streamvec.compute.delta_bf16` where it applies) and with that path switched off (the
float64 accumulation and its correct final rounding). Prints the number of elements whose
bits differ per coefficient, and how many the fast path computed (a slab whose result holds
a NaN goes to the general path); a coefficient belongs in ``delta_bf16.FAST_COEFFICIENTS``
only with 0 differences. About 2-4 minutes per coefficient on one core.

    PYTHONPATH=. python bench/verify_delta_bf16.py --coefs 0.5,1,0.25,-0.5,-1 [--pivot-coef 1]
        [--stride 1]

``--stride K`` checks every K-th base value only (a quicker sample).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from streamvec.compute import delta_bf16, kernel
from streamvec.dtypes import BFLOAT16

ROWS = 64  # base values per block: 64 x 65536 elements


@contextmanager
def general_path() -> Iterator[None]:
    """The kernel with the float32 fast path switched off."""
    saved = delta_bf16.applies
    delta_bf16.applies = lambda *a, **k: False  # type: ignore[assignment]
    try:
        yield
    finally:
        delta_bf16.applies = saved  # type: ignore[assignment]


@contextmanager
def forced_fast(coef: float) -> Iterator[None]:
    """The fast path taken for ``coef`` even when it is not (yet) in the verified set."""
    saved = delta_bf16.FAST_COEFFICIENTS
    delta_bf16.FAST_COEFFICIENTS = frozenset({*saved, coef})
    try:
        yield
    finally:
        delta_bf16.FAST_COEFFICIENTS = saved


def finite_and_infinite() -> np.ndarray:
    """Every bf16 bit pattern that is not a NaN (NaN inputs give NaN, which the fast path
    hands to the general one: they are checked by the tests, not here)."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    return every[~np.isnan(every.view(BFLOAT16).astype(np.float32))]


def mismatches(coef: float, pivot_coef: float, stride: int) -> tuple[int, int, list[str]]:
    """Elements whose bits differ between the two paths, the elements the fast path
    computed (slabs with a NaN result go to the general path), and the first few mismatches.

    Base values are the finite ones (an infinite base gives NaN against most fine-tunes);
    fine-tune values every non-NaN pattern, infinities included.
    """
    values = finite_and_infinite()
    finite = np.isfinite(values.view(BFLOAT16).astype(np.float32))
    bases = values[finite][::stride]
    fast_elements = 0
    real_slab = delta_bf16.combine_slab

    def counted(base: np.ndarray, *args: object) -> bool:
        nonlocal fast_elements
        done = real_slab(base, *args)  # type: ignore[arg-type]
        fast_elements += base.size if done else 0
        return done

    bad, examples = 0, []
    for i in range(0, bases.size, ROWS):
        b = np.repeat(bases[i : i + ROWS], values.size).reshape(-1, values.size)
        f = np.broadcast_to(values, b.shape).copy()
        operands = [(pivot_coef - coef, b.view(BFLOAT16)), (coef, f.view(BFLOAT16))]
        with np.errstate(all="ignore"):
            delta_bf16.combine_slab = counted  # type: ignore[assignment]
            try:
                with forced_fast(coef):
                    fast = kernel.combine_blocks(operands, BFLOAT16, (True, True))
            finally:
                delta_bf16.combine_slab = real_slab  # type: ignore[assignment]
            with general_path():
                want = kernel.combine_blocks(operands, BFLOAT16, (True, True))
        diff = fast.view(np.uint16) != want.view(np.uint16)
        k = int(np.count_nonzero(diff))
        for r, c in np.argwhere(diff)[: max(0, 3 - len(examples))]:
            examples.append(
                f"b={b[r, c]:#06x} f={f[r, c]:#06x}: fast {fast.view(np.uint16)[r, c]:#06x}, "
                f"general {want.view(np.uint16)[r, c]:#06x}"
            )
        bad += k
    return bad, fast_elements, examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coefs", default="0.5,1")
    ap.add_argument("--pivot-coef", type=float, default=1.0, help="s: 1 a model, 0 a task vector")
    ap.add_argument("--stride", type=int, default=1)
    args = ap.parse_args()
    for coef in (float(c) for c in args.coefs.split(",")):
        start = time.perf_counter()
        bad, fast, examples = mismatches(coef, args.pivot_coef, args.stride)
        print(
            f"c={coef:g} s={args.pivot_coef:g}: {bad} pairs differ; {fast} pairs computed "
            f"on the fast path ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        for line in examples:
            print("   ", line)


if __name__ == "__main__":
    main()
