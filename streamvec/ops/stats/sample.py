"""Top-set thresholds from a sample, so the top-k overlaps need no second pass.

The top set of a task vector is its entries with the largest ``|t|``, ``density`` of them.
Counting which entries two top sets share needs each threshold before the pass. A tensor of
at most ``sample`` elements is read whole and its threshold is exact: the
``ceil(density * n)``-th largest ``|t|``. A larger one is sampled: ``sample / RUN`` runs of
:data:`RUN` consecutive elements, one at a random place in each of as many equal strata of
the flat tensor (seeded by the tensor's name: the same inputs give the same thresholds), and
the threshold is the sample's ``ceil(density * m)``-th largest ``|t|``.

The top set is then every non-zero entry with ``|t|`` at or above the threshold, and its size
is counted exactly in the pass: the figures are exact for the sets reported, whose density
(``top_density``) is within sampling error of the one asked for. For ``m`` independent
draws, the share of a tensor above the sample's quantile has a standard deviation of
``sqrt(p (1 - p) / m)`` (``p`` the density): 0.0031 for 0.2 and 2^14 draws; runs of
neighbours are not independent draws (docs/stats.md gives the figures measured on synthetic
fine-tunes: 2.2% of the density RMS, 9% at worst). Runs of 32 in 512 places: shorter runs
gave closer densities, more runs cost one ``pread`` each per input. ``--exact-topk`` takes
the histogram threshold and a second pass instead.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

from streamvec.io.blocks import BlockReader, matrix_shape
from streamvec.ops.stats.fused import plan_arrays
from streamvec.ops.stats.slabs import SlabReader, preadable, read_runs

RUN = 32  # consecutive elements per sampled run (one pread per operand)
DEFAULT_SAMPLE = 1 << 14


def sampleable(shape: tuple[int, ...], readers: Sequence[BlockReader], sample: int) -> bool:
    """Whether :func:`thresholds` can sample this tensor cheaply: it is read whole (at most
    ``sample`` elements), or every input is a safetensors tensor read with ``pread``.

    Other readers (Zarr stores, SVD stores, adapters, FP8) have no cheap access to short runs
    scattered over a tensor (a Zarr chunk is decoded whole), so their tensors take the
    histogram threshold and a second pass instead.
    """
    return math.prod(shape) <= sample or all(preadable(r) for r in readers)


def thresholds(
    shape: tuple[int, ...],
    readers: Sequence[BlockReader],
    coefs: tuple[tuple[float, ...], ...],
    density: float,
    sample: int,
    seed_name: str,
) -> np.ndarray:
    """``(N,)`` uint32 float32-bit patterns of each task vector's top-set threshold on ``|t|``.

    Args:
        shape: the tensor's shape.
        readers: its distinct readers.
        coefs: per task vector, its coefficients over the readers.
        density: the share of entries wanted in each top set.
        sample: elements sampled from a larger tensor (at least :data:`RUN`).
        seed_name: seeds the sample's places (the tensor name).

    Returns:
        The thresholds (0: every non-zero entry is in the set).
    """
    rows, cols = matrix_shape(shape)
    n = rows * cols
    if n == 0:
        return np.zeros(len(coefs), np.uint32)
    if n <= sample:
        bits = _bits(readers, coefs, rows, cols)  # whole tensor: exact
    elif all(preadable(r) for r in readers):
        bits = _run_bits(readers, coefs, n, sample, seed_name)
    else:
        raise ValueError("sampled thresholds need preadable readers (see sampleable)")
    m = bits.shape[1]
    k = min(m, max(1, math.ceil(density * m)))
    out = np.partition(bits, m - k, axis=1)[:, m - k]  # the k-th largest of each row
    return out.astype(np.uint32)


def _rng(seed_name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(seed_name.encode()))


def _bits(
    readers: Sequence[BlockReader], coefs: tuple[tuple[float, ...], ...], rows: int, cols: int
) -> np.ndarray:
    from streamvec.ops.stats import kernel  # numba: only when a pass runs

    size = rows * cols
    out = np.empty((len(coefs), size), np.uint32)
    with SlabReader(readers, 0, rows, max(size, 1)) as rd:
        raw, shift = rd.load_bits(0, size)
        kernel.magnitude_bits(raw, shift, size, *plan_arrays(coefs, len(readers)), out)
    return out


def _run_bits(
    readers: Sequence[BlockReader],
    coefs: tuple[tuple[float, ...], ...],
    n: int,
    sample: int,
    seed_name: str,
) -> np.ndarray:
    from streamvec.ops.stats import kernel  # numba: only when a pass runs

    runs = max(1, sample // RUN)
    stratum = n // runs
    starts = np.arange(runs) * stratum + _rng(seed_name).integers(
        0, max(1, stratum - RUN + 1), runs
    )
    rows, _ = matrix_shape(readers[0].shape)
    for r in readers:
        # From a cold cache, short reads scattered over the tensor cost one disk request
        # each. Asking for the whole tensor first reads it in order, once: the runs wait for
        # it, and the pass's blocks then find it cached (the sample alone over a cold 1B
        # pair: 5.3-5.5 s before, 3.3-3.5 s after).
        r.prefetch(0, rows)  # type: ignore[attr-defined]
    # float32 runs (read_runs widens them), handed to the loop as bits (shift 0)
    ops = np.stack([read_runs(r, starts, RUN).reshape(-1) for r in readers])  # type: ignore[arg-type]
    out = np.empty((len(coefs), runs * RUN), np.uint32)
    plan = plan_arrays(coefs, len(readers))
    kernel.magnitude_bits(ops.view(np.uint32), np.uint32(0), runs * RUN, *plan, out)
    return out
