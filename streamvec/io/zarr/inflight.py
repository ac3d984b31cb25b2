"""Waiting for the writes zarr still has in flight, before an output is removed.

A block written through ``zarr.Array.__setitem__`` is several chunk writes gathered in zarr's
own event loop thread. When one fails (a full disk), the call raises at once in the engine's
worker while the others go on; zarr's store makes a chunk's folders before writing it, so one
finishing after a failed run removed its partial output would make the output's folders
again, and leave them behind. :func:`wait_for_zarr_writes` waits for them first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys

# Writes are single chunk files: a minute is far beyond any of them, and a stuck one must not
# hang the cleanup of a failed run forever.
TIMEOUT_SECONDS = 60.0


def wait_for_zarr_writes(timeout: float = TIMEOUT_SECONDS) -> None:
    """Return once zarr's event loop has no task left (at once if zarr was never used)."""
    zarr_sync = sys.modules.get("zarr.core.sync")
    loop = getattr(zarr_sync, "loop", [None])[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def idle() -> None:
        while pending := [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            await asyncio.wait(pending)

    try:
        asyncio.run_coroutine_threadsafe(idle(), loop).result(timeout)
    except concurrent.futures.TimeoutError:
        pass  # removing the output is still the right thing to try
