"""The HU cache store: one lossless int16 file per slice (`data.codec`), its format marker and its source manifest.

`<cache>/<last 2 chars of id>/<image_id>.hu`; `FORMAT` names the codec (a cache in another format is removed and
rebuilt); `sources.csv` records the DICOM (path, size, mtime) each entry was made from and the entry itself as written
(size, mtime), so an entry whose DICOM changed, or that was damaged (cut short, overwritten), is made again;
`skipped.csv` lists the DICOMs that do not decode (retried once their size or mtime change).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.io import atomic_path, atomic_open, cannot_write, write_csv
from ..core.layout import Layout
from .codec import FORMAT, CacheError, decode

log = logging.getLogger(__name__)

SUFFIX = ".hu"
STALE_TMP_S = 600  # temp files older than this were left by a killed run (a concurrent run may own newer ones)
SOURCE_COLUMNS = ["image_id", "path", "size", "mtime_ns"]
SKIPPED_COLUMNS = ["path", "reason", "size", "mtime_ns"]
ENTRY_COLUMNS = ["entry_size", "entry_mtime_ns"]  # the cache file as written: a damaged entry is made again

__all__ = [
    "CacheError",
    "cache_path",
    "load_hu",
    "write_entry",
    "cached_ids",
    "format_ok",
    "reset_if_foreign",
    "read_sources",
    "write_sources",
    "read_skipped",
    "write_skipped",
]


def cache_path(layout: Layout, image_id: str) -> Path:
    """Where one slice is cached: 256-way sharded so no folder holds 874k files."""
    shard = image_id[-2:] if image_id[-2:].isalnum() else "xx"
    return layout.cache_dir / shard / f"{image_id}{SUFFIX}"


def load_hu(layout: Layout, image_id: str) -> np.ndarray:
    """The cached int16 HU image (H, W) of one slice; FileNotFoundError if it was never cached."""
    path = cache_path(layout, image_id)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode(data)
    except CacheError as e:
        raise CacheError(f"{path}: {e}; delete it and rerun `python -m ich_kaggle preprocess`") from None


def _write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def write_entry(path: Path, data: bytes) -> None:
    """Write one cache file atomically; a failed write (disk full, read-only) raises OSError and leaves no temp file."""
    with atomic_path(path) as tmp:
        _write_file(tmp, data)


def format_ok(layout: Layout) -> bool:
    """Whether the cache folder was written in this version's format (an older one is re-cached, not misread)."""
    try:
        return layout.cache_format.read_text().strip() == FORMAT
    except OSError:
        return False


def reset_if_foreign(layout: Layout) -> None:
    """Make the cache folder this format's: an older cache is removed (one line says so), the marker written."""
    if format_ok(layout):
        return
    try:
        old = [p for p in layout.cache_dir.iterdir() if p.is_dir()] if layout.cache_dir.is_dir() else []
        if old:  # unreadable by this version: remove, so a killed re-run never mixes formats
            was = layout.cache_format.read_text().strip() if layout.cache_format.exists() else "no FORMAT marker"
            log.info(
                f"cache: {layout.cache_dir} holds an older cache format ({was}); removing it and caching every slice "
                f"again as {FORMAT}"
            )
            for shard in old:
                shutil.rmtree(shard)
        for stale in (layout.cache_sources, layout.cache_skipped):
            stale.unlink(missing_ok=True)
        with atomic_open(layout.cache_format) as f:
            f.write(FORMAT + "\n")
    except OSError as e:
        raise cannot_write(getattr(e, "filename", None) or layout.cache_format, e) from None


def cached_ids(layout: Layout) -> set[str]:
    """Image ids with a cache file (none if the folder holds another format); removes stale temp files of killed
    runs."""
    ids: set[str] = set()
    if not layout.cache_dir.is_dir() or not format_ok(layout):
        return ids
    stale_before = time.time() - STALE_TMP_S
    with os.scandir(layout.cache_dir) as shards:
        for shard in shards:
            if not shard.is_dir():
                continue
            with os.scandir(shard.path) as files:
                for f in files:
                    if f.name.endswith(SUFFIX):
                        ids.add(f.name[: -len(SUFFIX)])
                    elif f.name.endswith(".tmp") and f.stat().st_mtime < stale_before:
                        try:
                            os.unlink(f.path)  # left by a killed run (a live writer keeps one for milliseconds)
                        except OSError:
                            pass  # a read-only cache can still be read
    return ids


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=columns)
    try:
        df = pd.read_csv(path, dtype={"image_id": str, "path": str, "reason": str})
    except (OSError, ValueError):
        return pd.DataFrame(columns=columns)
    if not set(columns) <= set(df.columns):  # written by an older version: no source identities
        return pd.DataFrame(columns=columns)
    return df[columns]


def _write(df: pd.DataFrame, path: Path) -> None:
    try:
        write_csv(df, path)
    except OSError as e:
        raise cannot_write(path, e) from None


def read_sources(layout: Layout) -> pd.DataFrame:
    """image_id, path, size, mtime_ns of the DICOM each entry was cached from, and entry_size, entry_mtime_ns of the
    entry as written (empty for entries cached by an older version: those are trusted as before)."""
    sources = _read(layout.cache_sources, SOURCE_COLUMNS)
    if layout.cache_sources.exists() and len(sources):
        try:
            extra = pd.read_csv(
                layout.cache_sources, usecols=lambda c: c in ENTRY_COLUMNS, dtype={c: "Int64" for c in ENTRY_COLUMNS}
            )  # ns do not fit a float exactly
        except (OSError, ValueError):
            extra = pd.DataFrame()
        for col in ENTRY_COLUMNS:
            sources[col] = (
                extra[col].to_numpy()
                if col in extra and len(extra) == len(sources)
                else pd.array([pd.NA] * len(sources), dtype="Int64")
            )
    else:
        sources = sources.assign(**{c: pd.Series(dtype="Int64") for c in ENTRY_COLUMNS})
    return sources


def write_sources(layout: Layout, sources: pd.DataFrame) -> None:
    _write(sources[SOURCE_COLUMNS + ENTRY_COLUMNS], layout.cache_sources)


def damaged(layout: Layout, sources: pd.DataFrame) -> set[str]:
    """Image ids whose cache file is no longer the one written (another size or mtime: cut short, overwritten,
    replaced) or was removed. One stat per entry: cheap next to decoding them all."""
    known = sources.dropna(subset=ENTRY_COLUMNS)
    out = set()
    for image_id, size, mtime in zip(known["image_id"].astype(str), known["entry_size"], known["entry_mtime_ns"]):
        try:
            st = os.stat(cache_path(layout, image_id))
        except OSError:
            continue  # not cached: planned anyway
        if st.st_size != int(size) or st.st_mtime_ns != int(mtime):
            out.add(image_id)
    return out


def read_skipped(layout: Layout) -> pd.DataFrame:
    """path, reason, size, mtime_ns of the DICOMs that did not decode."""
    return _read(layout.cache_skipped, SKIPPED_COLUMNS)


def write_skipped(layout: Layout, skipped: pd.DataFrame) -> None:
    _write(skipped[SKIPPED_COLUMNS], layout.cache_skipped)
