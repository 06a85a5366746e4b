"""Every derived file knows what made it: a small JSON manifest beside it.

A manifest records the identities of the output's inputs (path + size + mtime: cheap and safe, as Make and Snakemake
judge freshness; a content digest where a file is rewritten with the same content, e.g. the kernel's meta.csv), the
settings that affect it, and the producer's format version. A stage reuses an output only when the manifest it would
write now equals the one on disk; otherwise it recomputes, or, where recomputing would destroy the user's work, stops
with one line saying what differs (`describe`).

No library fits this small need without a workflow engine around it (DVC, Snakemake); this is ~100 lines.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from .io import atomic_open

SUFFIX = ".manifest.json"


def path_of(output: str | Path) -> Path:
    """Where the manifest of `output` lives: `<output>.manifest.json` beside it."""
    output = Path(output)
    return output.with_name(output.name + SUFFIX)


def identity(path: str | Path) -> dict[str, Any]:
    """What a file is, cheaply: resolved path, size and modification time (ns); missing files say so."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return {"path": str(path.resolve()), "missing": True}
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def digest(values: Iterable[Any]) -> str:
    """A content digest of values (e.g. image ids): for inputs whose identity is their content, not their file."""
    h = hashlib.sha256()
    for v in values:
        h.update(str(v).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def make(kind: str, version: int, inputs: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> dict:
    """A manifest: kind and format version of the producer, input identities, settings (JSON-normalised)."""
    return json.loads(json.dumps({"kind": kind, "version": version, "inputs": inputs or {},
                                  "settings": settings or {}}, sort_keys=True, default=str))


def write(output: str | Path, manifest: dict) -> None:
    """Write the manifest of `output` (after the output itself: a crash in between leaves the output stale)."""
    with atomic_open(path_of(output)) as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def read(output: str | Path) -> dict | None:
    """The manifest of `output`, or None when the output or its manifest is missing or unreadable."""
    output, path = Path(output), path_of(output)
    if not output.exists() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def differences(expected: dict, found: dict | None) -> list[str]:
    """What differs between the manifest a stage would write now and the one on disk ([] = fresh)."""
    if found is None:
        return ["no manifest (made by an older version, or interrupted)"]
    out = []
    for key in ("kind", "version"):
        if expected.get(key) != found.get(key):
            out.append(f"{key} {found.get(key)!r} -> {expected.get(key)!r}")
    for section in ("inputs", "settings"):
        want, have = expected.get(section, {}), found.get(section, {})
        for name in sorted(set(want) | set(have)):
            if want.get(name) != have.get(name):
                out.append(f"{section[:-1]} {name} changed" if section == "inputs" else
                           f"{name} {have.get(name)!r} -> {want.get(name)!r}")
    return out


def is_fresh(output: str | Path, expected: dict) -> bool:
    return not differences(expected, read(output))


def describe(diffs: list[str], n: int = 3) -> str:
    """The first differences in one line."""
    return "; ".join(diffs[:n]) + (f" (+{len(diffs) - n} more)" if len(diffs) > n else "")
