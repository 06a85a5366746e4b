"""An exclusive lock file per output folder, so two runs never write the same fold at once."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from .errors import UserError, fix


EMPTY_WAIT_STEPS = 8  # 2 s


def _holder(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _take(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    return True


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Hold `path` (pid, host, start time inside) for the block; a second holder gets one line naming the first.

    A lock whose process is gone on this host is stale (a killed run): it is taken over. A lock from another host
    cannot be checked, so the message says how to remove it by hand.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create {path.parent} ({e.strerror}); make it writable or choose another "
            f"{fix('--runs', 'RUNS=')} folder"
        ) from None
    for _ in range(2):
        try:
            if _take(path):
                break
        except OSError as e:
            raise UserError(f"cannot write the lock {path} ({e.strerror}); make {path.parent} writable") from None
        holder = _holder(path)
        for _ in range(EMPTY_WAIT_STEPS):  # a taker writes its pid microseconds after creating the file
            if holder:
                break
            time.sleep(0.25)
            holder = _holder(path)
        if not holder and path.exists():  # still empty or unreadable: its taker was killed in between; stale
            path.unlink(missing_ok=True)
            continue
        same_host = holder.get("host") == socket.gethostname()
        if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            path.unlink(missing_ok=True)  # stale: its process died without releasing it
            continue
        raise UserError(
            f"{what} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
            f"{holder.get('since', '?')} ({path}); wait for it to finish"
            + ("" if same_host else ", or delete the lock file if that run is gone")
        )
    else:
        raise UserError(f"{what}: could not take the lock {path}; delete it if no other run uses this folder")
    try:
        yield
    finally:
        if _holder(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
