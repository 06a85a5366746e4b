"""Ctrl-C and SIGTERM always stop a run, non-zero, with "rerun to resume".

Python raises KeyboardInterrupt wherever the main thread is when the signal arrives; inside a weakref or `__del__`
callback (a DataLoader or tqdm finaliser, right as a fold starts) it is printed as "Exception ignored" and lost, and
the run went on to exit 0. The handler here also records the signal, so the next `check` (each epoch, the end of the
command) raises it again: an interrupt can be delayed, never swallowed. SIGTERM (a scheduler, `kill`) takes the same
path, so it also leaves a resumable state and the one line.
"""

from __future__ import annotations

import signal

_received: int | None = None


def _handler(signum, frame) -> None:
    global _received
    _received = signum
    raise KeyboardInterrupt


def install() -> dict:
    """Route SIGINT and SIGTERM through `_handler` (main thread only; elsewhere a no-op); returns the previous
    handlers for `restore` (the CLI runs in-process in tests)."""
    global _received
    _received = None
    try:
        return {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread of the main interpreter
        return {}


def restore(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def received() -> int | None:
    """The signal number received so far in this process, or None."""
    return _received


def check() -> None:
    """Raise KeyboardInterrupt again if a signal arrived (its first raise may have been swallowed)."""
    if _received is not None:
        raise KeyboardInterrupt
