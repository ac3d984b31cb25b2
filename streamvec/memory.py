"""Memory: the honest resident figure, a sampler for peaks, and the default budget.

Resident memory is measured as ``RssAnon + RssShmem + VmSwap`` from ``/proc/PID/status``:
file-backed pages of memory maps are reclaimable page cache and do not count, while
``VmHWM``, ``ru_maxrss``, USS and PSS all include them.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

DEFAULT_SHARE_OF_AVAILABLE = 0.5


def anon_bytes(pid: int | None = None) -> int:
    """Anonymous resident bytes of a process (RssAnon + RssShmem + VmSwap); 0 if unknown."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as f:
            text = f.read()
    except OSError:
        return 0
    total = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssShmem", "VmSwap"):
            total += int(value.split()[0]) * 1024
    return total


def default_memory_limit() -> int:
    """Half of the memory available now: room for the page cache that feeds the reads."""
    return int(psutil.virtual_memory().available * DEFAULT_SHARE_OF_AVAILABLE)


class PeakSampler:
    """Samples :func:`anon_bytes` of a process (and its children) every ``interval`` seconds.

    Example:
        >>> with PeakSampler() as s:  # doctest: +SKIP
        ...     do_work()
        >>> s.peak  # doctest: +SKIP
    """

    def __init__(self, pid: int | None = None, interval: float = 0.01) -> None:
        self.pid = pid or os.getpid()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> int:
        total = anon_bytes(self.pid)
        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                total += anon_bytes(child.pid)
        except psutil.Error:
            pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())
