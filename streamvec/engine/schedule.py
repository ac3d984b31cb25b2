"""Running a Dask task graph on the scheduler the user chose, with a progress bar.

One front-end for every command: the local schedulers (``threads``, ``processes``, ``sync``)
and ``dask.distributed`` (``local:N`` or a scheduler's address, through
:func:`streamvec.engine.settings.distributed_client`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from streamvec.engine.settings import LOCAL_SCHEDULERS


@contextmanager
def awaited_threads(scheduler: str, workers: int) -> Iterator[dict[str, Any]]:
    """The ``pool`` keyword for dask's threaded scheduler: a pool waited for on the way out.

    Dask's own thread pool outlives a failed or interrupted computation, and its tasks still
    running go on writing blocks after the run has removed its partial output, which they
    would bring back. This pool is shut down, waiting for those tasks and cancelling queued
    ones, before the error goes further. Other schedulers get no keyword (the process pool
    of ``processes`` is already shut down and waited for by dask).
    """
    if scheduler != "threads":
        yield {}
        return
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="streamvec")
    try:
        yield {"pool": pool}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def execute_graph(
    graph: dict[Any, Any],
    keys: list[Any],
    sizes: dict[Any, int],
    *,
    scheduler: str,
    workers: int,
    progress: bool,
    total: int,
    desc: str,
    on_result: Callable[[Any, Any], None] | None = None,
    unit: str = "B",
) -> list[Any]:
    """Run a graph on the chosen scheduler and return the values of ``keys``.

    Args:
        graph: a Dask task graph.
        keys: the keys to compute.
        sizes: progress units per key (bytes of input for block tasks); on the local
            schedulers every finished task counts, on a cluster the requested keys.
        scheduler: ``threads``, ``processes``, ``sync``, ``local:N`` or a scheduler address.
        workers: threads or processes for the local schedulers.
        progress: show a progress bar.
        total: the bar's total.
        desc: the bar's label.
        on_result: called with ``(key, value)`` as each requested key finishes.
        unit: the bar's unit (``B`` scales as bytes).
    """
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1000,
        desc=desc,
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )

    def finished(key: Any, result: Any) -> None:
        if on_result is not None:
            on_result(key, result)
        bar.update(sizes.get(key, 0))

    try:
        if scheduler in LOCAL_SCHEDULERS:
            import dask
            from dask.callbacks import Callback

            def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
                finished(key, result)

            getters: dict[str, Callable[..., Any]] = {
                "threads": dask.threaded.get,
                "processes": dask.multiprocessing.get,
            }
            get = getters.get(scheduler, dask.get)
            kwargs: dict[str, Any] = {"num_workers": workers} if scheduler in getters else {}
            with Callback(posttask=posttask), awaited_threads(scheduler, workers) as pool:
                return list(get(graph, keys, **kwargs, **pool))
        return _execute_distributed(graph, keys, scheduler, finished)
    finally:
        bar.close()


def _execute_distributed(
    graph: dict[Any, Any], keys: list[Any], address: str, finished: Callable[[Any, Any], None]
) -> list[Any]:
    from distributed import as_completed

    from streamvec.engine.settings import distributed_client

    with distributed_client(address) as client:
        futures = client.get(graph, keys, sync=False)
        out = []
        for fut in as_completed(futures):
            result = fut.result()
            out.append(result)
            finished(fut.key, result)
        return out
