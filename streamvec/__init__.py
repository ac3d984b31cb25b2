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
from streamvec.algebra import Combination, Model, SourceModel
from streamvec.engine import RunReport, run
from streamvec.errors import (
    CheckpointError,
    HeaderError,
    InputNotFoundError,
    MismatchError,
    OutputError,
    StoreError,
    StreamvecError,
)
from streamvec.names import NameFilter
from streamvec.sources import open  # noqa: A004 - sv.open(path) is the entry point
from streamvec.stats import Stats, stats
from streamvec.tensor import LazyTensor

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
