"""streamvec: out-of-core task arithmetic and decompositions for large checkpoints.

Example:
    >>> import streamvec as sv
    >>> base = sv.open("llama-base")  # doctest: +SKIP
    >>> tau = sv.open("llama-math") - base  # doctest: +SKIP
    >>> (base + 0.5 * tau).save("llama-edited")  # doctest: +SKIP
"""

# First: modules below that still import it from here find it bound.
from streamvec.version import __version__

# isort: split
from streamvec.engine.execute import RunReport, run
from streamvec.errors import (
    CheckpointError,
    HeaderError,
    InputNotFoundError,
    MismatchError,
    OutputError,
    StoreError,
    StreamvecError,
)
from streamvec.model.algebra import Combination, Model, SourceModel
from streamvec.model.sources import open  # noqa: A004 - sv.open(path) is the entry point
from streamvec.model.tensor import LazyTensor
from streamvec.names import NameFilter


def __getattr__(name: str) -> object:
    """``sv.stats`` and ``sv.Stats``, imported on first use: they bring the randomized SVD
    (dask.array, scipy), which would otherwise cost every command half a second to start."""
    if name in ("stats", "Stats"):
        from streamvec.ops import stats as _stats

        return getattr(_stats, name)
    raise AttributeError(f"module 'streamvec' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "Combination",
    "HeaderError",
    "InputNotFoundError",
    "LazyTensor",
    "MismatchError",
    "Model",
    "NameFilter",
    "OutputError",
    "RunReport",
    "SourceModel",
    "Stats",
    "StoreError",
    "StreamvecError",
    "__version__",
    "open",
    "run",
    "stats",
]
