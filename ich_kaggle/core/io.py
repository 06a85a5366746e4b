"""Atomic file writes: a crash mid-write never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

import pandas as pd

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should be as readable as any normal file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_csv(df: pd.DataFrame, path: str | os.PathLike, **kwargs) -> Path:
    """Write a CSV atomically (gzip when the name ends in .gz)."""
    path = Path(path)
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, compression="gzip" if path.suffix == ".gz" else None, **kwargs)
    return path


def cannot_write(path: str | os.PathLike, err: OSError, folder: str | os.PathLike | None = None) -> UserError:
    """The one-line error for a failed write (disk full, read-only folder): what failed and how to go on.

    `folder`: the one to name in the fix (e.g. the cache folder rather than one of its shards)."""
    path = Path(path)
    where = Path(folder) if folder is not None else path.parent
    reason = err.strerror or type(err).__name__
    if err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        fix = f"free space on the disk of {where} (or pass --work <folder on a bigger disk>) and rerun"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {where} writable (or pass --work <writable folder>) and rerun"
    else:
        fix = "fix the cause and rerun"
    return UserError(f"cannot write {path}: {reason}; {fix} (work done so far is kept)")
