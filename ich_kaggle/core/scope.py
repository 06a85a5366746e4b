"""What one command resolves once: the DICOM listing, meta.csv and the folds table.

At competition scale each listing stats 874,035 files and meta.csv holds as many rows, and one `train --fold 0` used
to list the folder five times and build the folds table three times, because every stage asks for its inputs itself.
The CLI runs each command inside `command_scope()`; inside it `resolved(key, make)` computes a value the first time
it is asked and hands out copies of it after, and `forget(kind)` drops what a stage has just rewritten (meta.csv,
folds.csv). Outside a scope (library calls, tests, a kernel) every call computes afresh, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from typing import Any, Callable, Hashable, Iterator

_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ich_kaggle_scope", default=None)


@contextlib.contextmanager
def command_scope() -> Iterator[None]:
    """Inputs resolved once for the duration of one command."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def resolved(key: tuple[Hashable, ...], make: Callable[[], Any]) -> Any:
    """`make()` once per command for `key` (its first item names the kind: "listing", "meta", "folds"); a copy of
    the value each time, so a caller that edits its frame never edits another stage's."""
    memo = _MEMO.get()
    if memo is None:
        return make()
    if key not in memo:
        memo[key] = make()
    return copy.deepcopy(memo[key])


def forget(*kinds: str) -> None:
    """Drop every value of these kinds (a stage rewrote the file behind them)."""
    memo = _MEMO.get()
    if memo is not None:
        for key in [k for k in memo if k[0] in kinds]:
            del memo[key]
