"""Limit the threads of numpy's BLAS while Dask already runs one task per core.

The randomized SVD parallelises over row blocks (one Dask task per block). If numpy's OpenBLAS
also starts its own threads inside every product, ``workers x BLAS threads`` threads share the
cores, and OpenBLAS's spinning threads are then preempted mid-operation: on the 2-core
development machine, under load, a tall-skinny QR (4096 x 74) took 0.2-0.6 s with 2 BLAS threads
against 13 ms with one, and a whole rank-64 randomized SVD of a 4096 x 4096 matrix 8.6 s against
2.3 s. :func:`limit_blas_threads` sets the BLAS thread count for a block of code and restores it.

It uses ``threadpoolctl`` when installed, through one controller built at first use (about
0.1 ms per use, against 2 ms for ``threadpool_limits``, which inspects every loaded library
each time); otherwise it calls OpenBLAS's own ``*openblas_set_num_threads*`` entry points
(found in the libraries this process has mapped, ``/proc/self/maps``), which covers numpy's
bundled OpenBLAS. Elsewhere it does nothing.

The held randomized SVD wraps each small factorization (QR of an ``(m, l)`` sketch, SVD of an
``(l, l)`` factor) in one thread: on 2 loaded cores a float64 QR of 2752 x 26 took 148 ms with
2 OpenBLAS threads against 6.8 ms with one, while its large products keep every thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["limit_blas_threads"]

# (getter, setter) symbol pairs of the OpenBLAS builds numpy and scipy ship.
_SYMBOLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)


@functools.lru_cache(maxsize=1)
def _openblas_controls() -> tuple[tuple[Callable[[], int], Callable[[int], None]], ...]:
    import numpy  # noqa: F401 - make sure numpy's BLAS is loaded before looking for it

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return ()
    controls = []
    for path in sorted(p for p in paths if "openblas" in os.path.basename(p).lower()):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            getter, setter = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if getter is not None and setter is not None:
                getter.restype = ctypes.c_int
                setter.argtypes = [ctypes.c_int]
                setter.restype = None
                controls.append((getter, setter))
                break
    return tuple(controls)


@functools.lru_cache(maxsize=1)
def _threadpool_controller() -> Any:
    """threadpoolctl's view of the BLAS libraries loaded now, or None without threadpoolctl.

    Built once: inspecting every loaded library costs ~2 ms, too slow to repeat around each
    small QR, while limiting through a built controller costs ~0.1 ms.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    import numpy  # noqa: F401 - numpy's BLAS must be loaded before it is looked for

    return ThreadpoolController()


@contextmanager
def limit_blas_threads(n: int) -> Iterator[bool]:
    """Run the ``with`` block with at most ``n`` BLAS threads, then restore the previous count.

    The setting is process-wide (BLAS libraries have no per-thread setting), so it also applies
    to other threads of the process while the block runs.

    Args:
        n: threads per BLAS call (``>= 1``).

    Yields:
        True when a limit could be applied, False when no known BLAS was found.

    Example:
        >>> with limit_blas_threads(1):
        ...     q, r = np.linalg.qr(y)  # doctest: +SKIP
    """
    controller = _threadpool_controller()
    if controller is not None:
        with controller.limit(limits=n, user_api="blas"):
            yield True
        return
    controls = _openblas_controls()
    previous = [(getter(), setter) for getter, setter in controls]
    for _, setter in previous:
        setter(n)
    try:
        yield bool(previous)
    finally:
        for count, setter in previous:
            setter(count)
