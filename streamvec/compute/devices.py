"""Where block arithmetic runs: ``cpu`` (numpy, the default) or a CUDA GPU through torch.

The CPU path never imports torch. ``--device cuda`` (or ``cuda:N``) is checked up front, in
the process that parses the command, so a machine without a usable GPU gets one clear line
instead of a failure deep inside a worker.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from streamvec.compute.kernel import Kernel
from streamvec.errors import StreamvecError

if TYPE_CHECKING:
    from streamvec.compute.torch_kernel import TorchKernel

CPU = "cpu"
# The GPU code path run by torch on the CPU: slower than ``cpu``; it lets the GPU path be
# checked (bit for bit against numpy) on machines without a GPU.
TORCH_CPU = "torch-cpu"
_CUDA = re.compile(r"^cuda(:\d+)?$")

# One kernel per device and process: its staging buffers and streams are reused by every
# block a worker runs there.
_KERNELS: dict[str, TorchKernel] = {}


def check_device(device: str | None) -> str:
    """The device name, normalised, after checking it can be used here.

    Raises:
        StreamvecError: an unknown name, torch missing, or no CUDA GPU visible to torch.
    """
    name = (device or CPU).strip().lower()
    if name == CPU:
        return CPU
    if name == TORCH_CPU:
        _import_torch(name)
        return TORCH_CPU
    if not _CUDA.match(name):
        raise StreamvecError(f"--device {device}: use cpu, cuda or cuda:N")
    torch = _import_torch(name)
    if not torch.cuda.is_available():
        raise StreamvecError(
            f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}, "
            "torch.cuda.is_available() is False); run on the CPU (the default) or install a "
            "CUDA build of torch on a machine with a GPU"
        )
    index = int(name.split(":", 1)[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise StreamvecError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use cuda:0 .. cuda:N-1"
        )
    return name


def block_kernel(device: str) -> Kernel | None:
    """The kernel for weighted sums on ``device``; None means numpy on the CPU."""
    return None if device == CPU else torch_kernel(device)


def torch_kernel(device: str) -> TorchKernel:
    """This process's torch kernel for a (non-``cpu``) device, made on first use."""
    kernel = _KERNELS.get(device)
    if kernel is None:
        from streamvec.compute.torch_kernel import TorchKernel

        # torch-cpu is torch's own "cpu" device.
        kernel = _KERNELS[device] = TorchKernel("cpu" if device == TORCH_CPU else device)
    return kernel


def _import_torch(name: str) -> Any:
    try:
        import torch
    except ImportError:
        raise StreamvecError(
            f"--device {name} needs torch: pip install torch (a CUDA build for a GPU), "
            "or run on the CPU (the default)"
        ) from None
    return torch
