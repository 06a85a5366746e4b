"""Every derived file knows what made it: a small JSON manifest beside it.

A manifest records the identities of the output's inputs, the settings that affect it, the producer's format version
and the output's own content (rows + a digest of its bytes). An input that carries a manifest itself is identified by
the digest of that manifest, so the identities form one chain from the raw inputs (path + size + mtime: cheap and
safe, as Make and Snakemake judge freshness) to the submission: `check` walks the whole chain below an output, so an
edit anywhere upstream (labels, folds, a member's retrained fold) or an output cut short or edited makes everything
downstream stale, whichever stage runs next. A stage reuses an output only when the manifest it would write now equals
the one on disk and its chain holds; otherwise it recomputes, or, where recomputing would destroy the user's work,
stops with one line saying what differs (`describe`). A malformed manifest is treated as absent.

No library fits this small need without a workflow engine around it (DVC, Snakemake); this is ~100 lines.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from .io import atomic_open

SUFFIX = ".manifest.json"


def path_of(output: str | Path) -> Path:
    """Where the manifest of `output` lives: `<output>.manifest.json` beside it."""
    output = Path(output)
    return output.with_name(output.name + SUFFIX)


def raw_identity(path: str | Path) -> dict[str, Any]:
    """What a raw file is, cheaply: resolved path, size and modification time (ns); missing files say so."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return {"path": str(path.resolve()), "missing": True}
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def identity(path: str | Path) -> dict[str, Any]:
    """What an input is: the digest of the manifest of the stage that made it (so anything upstream of it is part of
    its identity), or, for a raw input without a manifest, path + size + mtime."""
    path = Path(path)
    text = _manifest_text(path)
    if text is None:
        return raw_identity(path)
    # the path as given, links not followed: the manifest lives beside the link (the kernel links shipped files in)
    return {"path": os.path.abspath(path), "manifest": hashlib.sha256(text.encode()).hexdigest()[:16]}


CONTENT_HASH_LIMIT = 256 << 20  # bigger outputs (full-scale embeddings: GBs) by size + mtime, not a digest


def content(path: str | Path) -> dict[str, Any]:
    """The output's own content: bytes, rows (lines) and a digest, so an output cut short or edited is never trusted."""
    path = Path(path)
    try:
        st = path.stat()
        if st.st_size > CONTENT_HASH_LIMIT:
            return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        h, lines = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                lines += chunk.count(b"\n")
    except OSError:
        return {"missing": True}
    return {"bytes": st.st_size, "lines": lines, "sha": h.hexdigest()[:16]}


def digest(values: Iterable[Any]) -> str:
    """A content digest of values (e.g. image ids): for inputs whose identity is their content, not their file."""
    h = hashlib.sha256()
    for v in values:
        h.update(str(v).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def make(kind: str, version: int, inputs: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> dict:
    """A manifest: kind and format version of the producer, input identities, settings (JSON-normalised)."""
    return json.loads(
        json.dumps(
            {"kind": kind, "version": version, "inputs": inputs or {}, "settings": settings or {}},
            sort_keys=True,
            default=str,
        )
    )


def write(output: str | Path, manifest: dict, also: Iterable[str | Path] = ()) -> None:
    """Write the manifest of `output` (after the output itself: a crash in between leaves the output stale), with the
    content identity of `output` and of the files in `also` (written by the same step, beside it)."""
    output = Path(output)
    manifest = {**manifest, "output": content(output), "also": {Path(p).name: content(p) for p in also}}
    with atomic_open(path_of(output)) as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def adopt(output: str | Path) -> None:
    """Record the current content of `output` in its manifest: for an output replaced on purpose by an equivalent one
    (the kernel puts the shipped OOF predictions in place of those its own predict wrote). No-op without a manifest."""
    found = read(output)
    if found is not None:
        output = Path(output)
        write(
            output,
            {k: v for k, v in found.items() if k not in ("output", "also")},
            also=[output.with_name(n) for n in found["also"] if output.with_name(n).exists()],
        )


def _valid(found: Any) -> bool:
    """A manifest this code could have written: an object whose sections have the right types."""
    return (
        isinstance(found, dict)
        and isinstance(found.get("kind"), str)
        and isinstance(found.get("version"), int)
        and all(isinstance(found.get(k, {}), dict) for k in ("inputs", "settings", "output", "also"))
        and all(isinstance(v, dict) for v in found.get("also", {}).values())
    )


def _manifest_text(output: Path) -> str | None:
    path = path_of(output)
    if not output.exists() or not path.is_file():
        return None
    try:
        text = path.read_text()
        return text if _valid(json.loads(text)) else None
    except (OSError, ValueError):
        return None


def read(output: str | Path) -> dict | None:
    """The manifest of `output`, or None when the output or its manifest is missing, unreadable or malformed (valid
    JSON that is not a manifest counts as absent: the stage recomputes, never a traceback)."""
    text = _manifest_text(Path(output))
    return None if text is None else json.loads(text)


def chain(output: str | Path, found: dict | None = None, _seen: set | None = None) -> list[str]:
    """What no longer holds below `output`: its own content (and its companions') as written, and, recursively, every
    input with a manifest (its content and inputs) and every raw input (path, size, mtime). [] = the chain holds."""
    output = Path(output)
    seen = set() if _seen is None else _seen
    if output.resolve() in seen:
        return []
    seen.add(output.resolve())
    found = read(output) if found is None else found
    if found is None:
        return [f"{output.name} has no manifest"]
    out = []
    for path, want in [(output, found.get("output")), *[(output.with_name(n), c) for n, c in found["also"].items()]]:
        if want and content(path) != want:
            now = content(path)
            rows = (
                f" ({now.get('lines')} lines now, {want.get('lines')} when written)"
                if now.get("lines") != want.get("lines")
                else ""
            )
            out.append(f"{path.parent.name}/{path.name} changed since it was written{rows}")
    for name, ident in found["inputs"].items():
        if not (isinstance(ident, dict) and isinstance(ident.get("path"), str)):
            continue  # a digest of values, a setting: compared by `differences`
        path = Path(ident["path"])
        if identity(path) != ident:
            out.append(f"{path.parent.name}/{path.name} changed since {output.name} was made from it")
        elif "manifest" in ident:
            out += chain(path, None, seen)
    return out


def check(output: str | Path, expected: dict) -> list[str]:
    """Everything that makes `output` stale: its manifest against the one a stage would write now, then its chain."""
    found = read(output)
    return differences(expected, found) or chain(output, found)


def differences(expected: dict, found: dict | None) -> list[str]:
    """What differs between the manifest a stage would write now and the one on disk ([] = fresh)."""
    if found is None:
        return ["no manifest (made by an older version, or interrupted)"]
    out = []
    if not _valid(found):
        return ["malformed manifest"]
    for key in ("kind", "version"):
        if expected.get(key) != found.get(key):
            out.append(f"{key} {found.get(key)!r} -> {expected.get(key)!r}")
    for section in ("inputs", "settings"):
        want, have = expected.get(section, {}), found.get(section, {})
        for name in sorted(set(want) | set(have)):
            if want.get(name) != have.get(name):
                out.append(
                    f"{section[:-1]} {name} changed"
                    if section == "inputs"
                    else f"{name} {have.get(name)!r} -> {want.get(name)!r}"
                )
    return out


def is_fresh(output: str | Path, expected: dict) -> bool:
    return not check(output, expected)


def describe(diffs: list[str], n: int = 3) -> str:
    """The first differences in one line."""
    return "; ".join(diffs[:n]) + (f" (+{len(diffs) - n} more)" if len(diffs) > n else "")
