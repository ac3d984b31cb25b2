"""The version of streamvec, recorded in every output it writes (``created_by``).

Its own module so that the engine and the operations can read it without importing the
package ``__init__`` (which imports them: a cycle).
"""

__version__ = "0.1.0"
