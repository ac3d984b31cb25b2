"""Weighted sums of row blocks in torch, on a GPU (``--device cuda``).

It computes exactly what :func:`streamvec.kernel.combine_blocks` computes, in the same
order with the same roundings: every operand is upcast to the accumulation type first, then
``acc = c0 * x0``, ``acc += x_i`` / ``acc -= x_i`` for unit weights and ``acc += (c_i * x_i)``
(a multiply, then an add: never a fused multiply-add) otherwise, and one final rounding to
the output dtype (round-to-nearest-even). IEEE float32/float64 multiply and add are
correctly rounded on the GPU as on the CPU, so the results are bit-identical to the CPU
path (a test checks this on torch's CPU backend, and on a GPU where there is one).

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

from streamvec.dtypes import BFLOAT16
from streamvec.kernel import accumulation_dtype, combine_blocks

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
    """A :class:`streamvec.kernel.Kernel` that runs on a torch device.

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
        self, operands: Sequence[tuple[float, np.ndarray]], out_dtype: np.dtype
    ) -> np.ndarray:
        out_dtype = np.dtype(out_dtype)
        if not operands or out_dtype not in _TORCH_DTYPES or _is_copy(operands, out_dtype):
            return combine_blocks(operands, out_dtype)  # a plain copy: nothing to compute
        shape = operands[0][1].shape
        with self.stream():
            result = self.on_device(operands, out_dtype)
            out = np.empty(shape, out_dtype)
            _as_torch(out).copy_(result.reshape(shape))  # waits for the stream's work
        return out

    def on_device(
        self, operands: Sequence[tuple[float, np.ndarray]], out_dtype: np.dtype
    ) -> torch.Tensor:
        """The rounded result rows as a tensor on the device (call inside :meth:`stream`)."""
        coefs = [float(c) for c, _ in operands]
        out_dtype = np.dtype(out_dtype)
        if _is_copy(operands, out_dtype):
            return self._to_device(0, operands[0][1]).clone()  # nothing to compute
        acc_dtype = torch_dtype(accumulation_dtype(out_dtype, coefs))
        acc: torch.Tensor | None = None
        for i, ((_, x), c) in enumerate(zip(operands, coefs, strict=True)):
            xa = self._to_device(i, x).to(acc_dtype)  # upcast first
            if acc is None:
                acc = xa.clone() if c == 1.0 else torch.mul(xa, c)
            elif c == 1.0:
                acc.add_(xa)
            elif c == -1.0:
                acc.sub_(xa)
            else:
                acc.add_(torch.mul(xa, c))  # multiply, then add: no fused multiply-add
        assert acc is not None
        return acc.to(torch_dtype(out_dtype))  # the one rounding

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
