"""Truncated SVD of one streamed matrix on a GPU (``--device cuda``).

On the CPU (:mod:`streamvec.compute.linalg.rsvd`) a matrix is held in memory when it fits the budget
and streamed pass by pass otherwise. A GPU has room for any single weight matrix of today's
models (the largest, an embedding of 128k x 8k, is 8.4 GB in float64), so here the matrix is
always read *once*, block by block, straight into device memory, and every pass runs there:

* blocks are read by a small pool of threads (``workers``, at most that many in flight)
  while the previous ones are sent to the GPU and combined there (the same arithmetic and
  rounding as the CPU kernel, :class:`streamvec.compute.torch_kernel.TorchKernel`), so reading,
  transfers and compute overlap;
* the algorithm is the CPU path's: the same Gaussian test matrix (drawn by numpy from the
  same seed), Halko-Martinsson-Tropp randomized subspace iteration with a QR after every
  product, large products in float32 and small factors in float64, the same rule for the
  number of iterations, then the SVD of ``B = Q^T A``; or LAPACK-style exact SVD
  (``torch.linalg.svd``, float64) when the plan says ``exact``. Results match the CPU path
  to float32 rounding (tested), not bit for bit.

Host memory stays what the plan allows for ``workers`` blocks; device memory is checked
before anything is read, with a clear error when the matrix does not fit.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from streamvec.compute.devices import torch_kernel
from streamvec.compute.linalg.rsvd import (
    MAX_POWER_ITERS,
    SVDResult,
    _finish,
    _relative_residual,
    converged,
    sketch_width,
)
from streamvec.compute.torch_kernel import TorchKernel
from streamvec.errors import StreamvecError
from streamvec.io.blocks import matrix_shape
from streamvec.model.tensor import LazyTensor, row_ranges
from streamvec.units import format_bytes

# Fraction of the GPU's free memory a factorization may plan to use (cuSOLVER and the
# caching allocator need the rest).
DEVICE_MEMORY_FRACTION = 0.8


def device_bytes_needed(m: int, n: int, width: int, method: str) -> int:
    """Device bytes of one factorization: the float64 matrix plus the method's workspace."""
    matrix = 8 * m * n
    if method == "exact":
        p = min(m, n)
        return 2 * matrix + 8 * p * (m + n + p)  # a working copy, U, Vh and the small factors
    return matrix + 8 * width * (3 * m + 3 * n)  # Y/Q, Z, B and their QR/SVD workspaces


def factor_on_device(
    t: LazyTensor,
    rank: int,
    *,
    method: str,
    oversample: int,
    power_iters: int | None,
    seed: int,
    block_rows: int,
    workers: int,
    device: str,
) -> SVDResult:
    """Rank-``rank`` truncated SVD of ``t``'s matrix view, computed on ``device``.

    Args:
        t: the tensor (its matrix view ``(shape[0], prod(shape[1:]))`` is factored).
        rank: triplets kept, ``1 <= rank <= min(m, n)``.
        method: ``exact`` or ``randomized`` (from the CPU planner).
        oversample: extra probe vectors of the randomized method.
        power_iters: subspace iterations of the randomized method.
        seed: seed of the Gaussian test matrix (numpy's, as on the CPU).
        block_rows: rows per block read from the inputs.
        workers: blocks read at once.
        device: ``cuda``, ``cuda:N`` or ``torch-cpu`` (the same code on torch's CPU backend).

    Returns:
        An :class:`~streamvec.compute.linalg.rsvd.SVDResult`; ``passes`` is 1 (one read of the
        files).

    Raises:
        StreamvecError: the matrix does not fit in device memory, or has NaN/infinite values.
    """
    m, n = matrix_shape(t.shape)
    width = sketch_width(rank, oversample, m, n)
    kernel = torch_kernel(device)  # the engine's, with its staging buffers and streams
    dev = kernel.device
    _check_device_memory(t, m, n, width, method, dev)
    # The randomized method's products run in float32 (float64 for a float64 tensor).
    wide = method == "exact" or np.dtype(t.dtype) == np.float64
    dtype = torch.float64 if wide else torch.float32
    a = _load(t, m, n, block_rows, workers, kernel, dtype)  # (m, n) on the device
    sq_norm = 0.0
    for r0, r1 in row_ranges(m, block_rows):
        rows = a[r0:r1].to(torch.float64)
        sq_norm += float(torch.sum(rows * rows))
    if not np.isfinite(sq_norm):
        raise StreamvecError(f"tensor {t.name!r}: NaN or infinite values; cannot factor it")
    iters = 0
    if method == "exact":
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, vh, iters = _randomized(a, rank, width, power_iters, seed, sq_norm)
    return _finish(
        u.cpu().numpy(), s.cpu().numpy(), vh.cpu().numpy(), sq_norm, passes=1, power_iters=iters
    )


def _randomized(
    a: torch.Tensor, rank: int, width: int, power_iters: int | None, seed: int, sq_norm: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """HMT Algorithms 4.4 + 5.1 on a device-resident matrix (see rsvd.py)."""
    n = a.shape[1]
    omega = np.random.default_rng(seed).standard_normal((n, width))  # the CPU path's draw

    def product(x: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return (x @ right.to(x.dtype)).to(torch.float64)

    q, _ = torch.linalg.qr(product(a, torch.from_numpy(omega).to(a.device)))  # (m, l)
    iters, previous = 0, np.inf
    while True:
        bt = product(a.T, q)  # (n, l) = B^T
        ub, s, vh = torch.linalg.svd(bt.T, full_matrices=False)
        ritz = s.cpu().numpy()
        current = _relative_residual(sq_norm, ritz[:rank])
        if power_iters is not None:
            if iters == power_iters:
                break
        elif iters >= MAX_POWER_ITERS or (iters > 0 and converged(previous, current, ritz, rank)):
            break
        z, _ = torch.linalg.qr(bt)  # (n, l)
        q, _ = torch.linalg.qr(product(a, z))  # (m, l)
        iters, previous = iters + 1, current
    return q @ ub[:, :rank], s[:rank], vh[:rank], iters


def _load(
    t: LazyTensor,
    m: int,
    n: int,
    block_rows: int,
    workers: int,
    kernel: TorchKernel,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The whole matrix in ``dtype`` on the kernel's device: read by a thread pool, combined
    on the device."""
    dev = kernel.device
    a = torch.empty((m, n), dtype=dtype, device=dev)
    pending: deque[tuple[int, int, Future[Any]]] = deque()
    ranges = iter(row_ranges(m, block_rows))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        while True:
            # Keep at most ``workers`` blocks read ahead: host memory is what the plan allowed.
            while len(pending) < max(1, workers):
                nxt = next(ranges, None)
                if nxt is None:
                    break
                r0, r1 = nxt
                pending.append((r0, r1, pool.submit(t.read_operands, r0, r1)))
            if not pending:
                break
            r0, r1, future = pending.popleft()
            operands = [(c, x.reshape(r1 - r0, n)) for c, x in future.result()]
            with kernel.stream():
                rows = kernel.on_device(operands, t.dtype, t.points).reshape(r1 - r0, n)
                a[r0:r1].copy_(rows.to(dtype))
                if dev.type == "cuda":
                    torch.cuda.current_stream(dev).synchronize()  # staging buffers are reused
    return a


def _check_device_memory(
    t: LazyTensor, m: int, n: int, width: int, method: str, dev: torch.device
) -> None:
    if dev.type != "cuda":
        return
    free, _total = torch.cuda.mem_get_info(dev)
    need = device_bytes_needed(m, n, width, method)
    if need > DEVICE_MEMORY_FRACTION * free:
        raise StreamvecError(
            f"tensor {t.name!r} ({m} x {n}): the {method} SVD needs about "
            f"{format_bytes(need)} of GPU memory and {dev} has {format_bytes(free)} free; "
            "run without --device cuda (the CPU path streams the matrix), or use --method "
            "randomized"
        )
