"""``streamvec.merge``: the public name of :mod:`streamvec.ops.merge`.

A re-export only: ``streamvec.merge.merge`` is public API, the code lives in
:mod:`streamvec.ops.merge` (whose ``__all__`` is the one list of what is public).
"""

from streamvec.ops.merge import *  # noqa: F403 - the re-export is the point
from streamvec.ops.merge import __all__ as __all__
