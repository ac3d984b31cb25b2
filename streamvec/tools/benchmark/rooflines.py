"""Rooflines: how fast this machine reads and writes a step's bytes with plain sequential I/O.

Each run of a step is bracketed by its rooflines: ``cat`` of the step's input files just before
(the read roofline) and a plain write of as many bytes as the step wrote just after (the write
roofline, timed with and without ``fdatasync``). From them, ``roofline_seconds`` is how long
plain sequential I/O of the step's bytes takes on this machine, and ``ratio_to_roofline`` is
the step's wall time over that (1.0: the step runs at the machine's I/O speed).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

WRITE_CHUNK = 64 << 20  # the plain write goes out in 64 MiB pieces, like any streaming writer


def read_roofline(files: Sequence[Path], repeat: int = 3, *, warm: bool = True) -> float:
    """GB/s of ``cat FILES > /dev/null``.

    Warm: one untimed read first, then the median of ``repeat`` timed reads: the rate the
    engine's own (warm) reads could at best reach, memory bandwidth through the page cache.
    ``warm=False``: one timed read and no warm-up, for a caller that has just evicted the
    files (the disk's sequential read rate).
    """
    cmd = ["cat", *map(str, files)]
    total = sum(f.stat().st_size for f in files)
    if warm:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    times = []
    for _ in range(repeat if warm else 1):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return total / statistics.median(times) / 1e9


def write_roofline(nbytes: int, directory: Path) -> tuple[float, float]:
    """GB/s of a plain write of ``nbytes`` to a new file: (with fdatasync, without).

    Written with ``os.write`` in 64 MiB pieces of random bytes (so no layer can shortcut
    zeros); the "without" figure is timed before the fdatasync and measures the page cache
    absorbing the data. The engine's outputs are made durable with ``os.sync()`` before they
    are renamed into place, so the fdatasync figure is the one to compare with. Pending
    writeback from earlier steps is flushed first so it is not billed to this write.
    """
    import numpy as np

    nbytes = max(int(nbytes), 1)
    rng = np.random.default_rng(0)
    piece = rng.integers(0, 256, min(nbytes, WRITE_CHUNK), dtype=np.uint8).tobytes()
    path = directory / ".write-roofline.bin"
    os.sync()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        left = nbytes
        while left:
            view = memoryview(piece)[: min(left, len(piece))]
            while view:
                n = os.write(fd, view)
                view, left = view[n:], left - n
        written = time.perf_counter() - start
        os.fdatasync(fd)
        synced = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return nbytes / synced / 1e9, nbytes / written / 1e9


def roofline_seconds(
    input_bytes: int, output_bytes: int, read_gbps: float, write_gbps: float
) -> float:
    """Seconds plain sequential I/O of a step's bytes takes: read its inputs, write its output."""
    return input_bytes / (read_gbps * 1e9) + output_bytes / (write_gbps * 1e9)
