"""Weighted sums of row blocks in torch, on a GPU (``--device cuda``).

It computes exactly what :func:`streamvec.compute.kernel.combine_blocks` computes, from the same
:func:`streamvec.compute.kernel.plan`, in the same order with the same roundings: every operand is
upcast first; checkpoints are differenced against the pivot (``x_j - b``); then
``acc = c0 * v0``, ``acc += v_i`` / ``acc -= v_i`` for unit weights and ``acc += (c_i * v_i)``
(a multiply, then an add: never a fused multiply-add) otherwise, the pivot's share last, and
one final rounding to the output dtype. IEEE float32/float64 multiply and add are correctly
rounded on the GPU as on the CPU. The final rounding of a float64 sum to 16 bits is the
correctly rounded one on both sides: numpy converts the rare float32 ties directly, torch
(whose float64 -> 16-bit conversion rounds twice) rounds to float32 *to odd* first, which
makes the following round-to-nearest-even exact. So the results are bit-identical to the
CPU path (a test checks this on torch's CPU backend, and on a GPU where there is one).

Transfers: each operand is copied from the page cache into a page-locked staging buffer
that belongs to the calling worker thread, then sent to the GPU asynchronously on that
thread's own CUDA stream. Dask runs several block tasks at once, so one thread's reads
overlap another's transfers and arithmetic; the GPU never waits on a single reader.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from streamvec.compute.kernel import combine_blocks, plan
from streamvec.dtypes import BFLOAT16

_TORCH_DTYPES: dict[np.dtype, torch.dtype] = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(BFLOAT16): torch.bfloat16,
}


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a floating numpy dtype (bf16 through ml_dtypes)."""
    try:
        return _TORCH_DTYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"no torch kernel for dtype {np.dtype(dtype)}") from None


class TorchKernel:
    """A :class:`streamvec.compute.kernel.Kernel` that runs on a torch device.

    Args:
        device: a torch device name, ``cuda``, ``cuda:1`` (or ``cpu``, used by the tests to
            check the arithmetic where there is no GPU).
    """

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self._local = threading.local()

    def __reduce__(self) -> tuple[Any, ...]:
        # Worker processes build their own buffers and streams.
        return (TorchKernel, (str(self.device),))

    def __call__(
        self,
        operands: Sequence[tuple[float, np.ndarray]],
        out_dtype: np.dtype,
        points: Sequence[bool] = (),
    ) -> np.ndarray:
        out_dtype = np.dtype(out_dtype)
        if not operands or out_dtype not in _TORCH_DTYPES or _is_copy(operands, out_dtype):
            return combine_blocks(operands, out_dtype)  # a plain copy: nothing to compute
        shape = operands[0][1].shape
        with self.stream():
            result = self.on_device(operands, out_dtype, points)
            out = np.empty(shape, out_dtype)
            _as_torch(out).copy_(result.reshape(shape))  # waits for the stream's work
        return out

    def on_device(
        self,
        operands: Sequence[tuple[float, np.ndarray]],
        out_dtype: np.dtype,
        points: Sequence[bool] = (),
    ) -> torch.Tensor:
        """The rounded result rows as a tensor on the device (call inside :meth:`stream`)."""
        out_dtype = np.dtype(out_dtype)
        if _is_copy(operands, out_dtype):
            return self._to_device(0, operands[0][1]).clone()  # nothing to compute
        p = plan([c for c, _ in operands], [x.dtype for _, x in operands], out_dtype, points)
        acc_dtype, diff_dtype = torch_dtype(p.acc_dtype), torch_dtype(p.diff_dtype)
        base = None
        if p.pivot is not None:
            base = self._to_device(p.pivot, operands[p.pivot][1]).to(diff_dtype)
        acc: torch.Tensor | None = None
        for i, c, differenced in p.terms:
            x = self._to_device(i, operands[i][1])
            v = x.to(diff_dtype) - base if differenced and base is not None else x
            acc = _accumulate(acc, v.to(acc_dtype), float(c))  # upcast first
        if base is not None and (p.pivot_coef != 0.0 or acc is None):
            acc = _accumulate(acc, base.to(acc_dtype), p.pivot_coef)  # the base last
        assert acc is not None
        return _round_once(acc, torch_dtype(out_dtype))

    def stream(self) -> Any:
        """A context in which this thread's work is queued on its own CUDA stream."""
        if self.device.type != "cuda":
            return _NoStream()
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device=self.device)
        return torch.cuda.stream(stream)

    def _to_device(self, index: int, x: np.ndarray) -> torch.Tensor:
        """Operand ``index`` of this thread's current block, on the device."""
        raw = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
        staged = self._staging(index, raw.nbytes)
        np.copyto(staged.numpy()[: raw.nbytes], raw)  # page cache -> (pinned) buffer
        flat = staged[: raw.nbytes].view(torch_dtype(x.dtype))
        # non_blocking from pinned memory: the copy is queued on this thread's stream.
        return flat.to(self.device, non_blocking=True).reshape(x.shape)

    def _staging(self, index: int, nbytes: int) -> torch.Tensor:
        buffers: list[torch.Tensor] = getattr(self._local, "buffers", None) or []
        self._local.buffers = buffers
        while len(buffers) <= index:
            buffers.append(torch.empty(0, dtype=torch.uint8))
        if buffers[index].numel() < nbytes:
            # One buffer per operand, grown to the largest block seen. On the CPU backend
            # ``.to(device)`` returns the buffer itself, so operands must not share one.
            pin = self.device.type == "cuda"
            buffers[index] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        return buffers[index]


def _accumulate(acc: torch.Tensor | None, v: torch.Tensor, c: float) -> torch.Tensor:
    """``c * v`` (first) or ``acc += c * v``, as :func:`streamvec.compute.kernel._accumulate`."""
    if acc is None:
        return v.clone() if c == 1.0 else torch.mul(v, c)
    if c == 1.0:
        return acc.add_(v)
    if c == -1.0:
        return acc.sub_(v)
    return acc.add_(torch.mul(v, c))  # multiply, then add: no fused multiply-add


def _round_once(acc: torch.Tensor, out: torch.dtype) -> torch.Tensor:
    """``acc`` correctly rounded to ``out`` (round-to-nearest-even)."""
    if acc.dtype != torch.float64 or out not in (torch.bfloat16, torch.float16):
        return acc.to(out)
    # torch rounds float64 -> 16 bits through float32 (twice). Rounding to float32 *to odd*
    # (an inexact result keeps an odd last bit) makes the second rounding the correct one.
    r = acc.to(torch.float32)
    back = r.to(torch.float64)
    even = (r.view(torch.int32) & 1) == 0
    fix = (back != acc) & even & torch.isfinite(r)
    if bool(fix.any()):
        inf = torch.tensor(float("inf"), dtype=torch.float32, device=acc.device)
        toward = torch.where(acc > back, inf, -inf)
        r = torch.where(fix, torch.nextafter(r, toward), r)
    return r.to(out)


def _is_copy(operands: Sequence[tuple[float, np.ndarray]], out_dtype: np.dtype) -> bool:
    """One operand, weight 1, already of the output dtype: the result is a copy of it."""
    return len(operands) == 1 and float(operands[0][0]) == 1.0 and operands[0][1].dtype == out_dtype


def _as_torch(a: np.ndarray) -> torch.Tensor:
    """A torch view of a writable numpy array (bf16 through its raw 16-bit pattern)."""
    if a.dtype == BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class _NoStream:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
