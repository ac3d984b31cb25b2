"""Ctrl-C and SIGTERM, raised as exceptions, but never inside a few critical steps.

The command line turns SIGTERM into :class:`Terminated` (a ``KeyboardInterrupt``), so every
command keeps or removes its partial output the same way for both signals. An exception can
otherwise be raised between any two bytecodes, for example after the output's lock file was
created and before the object that removes it knows about it; such a step runs inside
:func:`deferred`, and a signal that arrives meanwhile is raised when the step is over.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

_pending: list[int] = []
_depth = 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every command keeps (or cleans) its output the same way."""


def _raise_for(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def _handle(signum: int, frame: FrameType | None) -> None:
    if _depth > 0:
        _pending.append(signum)  # raised when the critical step ends
        return
    _raise_for(signum)


@contextmanager
def deferred() -> Iterator[None]:
    """Run a step that must not be cut in two by Ctrl-C or SIGTERM.

    A signal that arrives inside is raised when the outermost deferred step ends (only where
    :func:`installed` set the handlers; elsewhere Python's own handler raises at once).
    """
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending:
            signum = _pending[0]
            _pending.clear()
            _raise_for(signum)


@contextmanager
def installed() -> Iterator[None]:
    """Handle SIGINT and SIGTERM as above while the block runs (main thread only).

    In another thread (an application embedding the command line) the handlers are left as
    they are.
    """
    previous: dict[signal.Signals, Callable[..., object] | int | None] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # ignored by whoever started us (nohup, a background job): keep it
            previous[signum] = signal.signal(signum, _handle)
    except ValueError:  # not the main thread
        previous.clear()
    try:
        yield
    finally:
        for which, handler in previous.items():
            signal.signal(which, handler)
        _pending.clear()
