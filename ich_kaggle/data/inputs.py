"""The DICOM listing of a data folder: path, split, size and mtime of every file, what freshness is judged by.

As Make and Snakemake do, a file counts as unchanged while its size and modification time are; listing 874k files
costs a few seconds (one stat each), against minutes for rescanning their headers.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd

from ..core import manifest, scope
from ..core.errors import UserError
from ..core.layout import Layout

COLUMNS = ["path", "split", "size", "mtime_ns"]


def list_inputs(layout: Layout) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(listing of the regular files in stage_2_train/ and stage_2_test/, sorted by path; entries that cannot be
    read as files, e.g. a symlink loop or a dangling link, as (path, reason): skipped, never fatal). Once per
    command (`core.scope`)."""
    return scope.resolved(("listing", str(layout.data.resolve())), lambda: _list(layout))


def _list(layout: Layout) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    rows: list[tuple[str, str, int, int]] = []
    bad: list[tuple[str, str]] = []
    for split, folder in (("train", layout.train_dir), ("test", layout.test_dir)):
        if not folder.is_dir():
            continue
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:
            raise UserError(f"cannot list {folder}: {e.strerror}; make it readable and rerun") from None
        for e in entries:
            rel = f"{folder.name}/{e.name}"
            try:
                st = e.stat()  # follows symlinks: a loop raises ELOOP here
            except OSError as err:
                bad.append((rel, f"cannot read file ({err.strerror})"))
                continue
            if stat.S_ISREG(st.st_mode):
                rows.append((rel, split, st.st_size, st.st_mtime_ns))
    return pd.DataFrame(rows, columns=COLUMNS), bad


def digest(listing: pd.DataFrame) -> str:
    """One value for the whole listing: equal digests, same files with the same sizes and mtimes."""
    return manifest.digest(listing[COLUMNS].itertuples(index=False, name=None))


def read_listing(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"path": str, "split": str, "size": "int64", "mtime_ns": "int64"})


def changed(listing: pd.DataFrame, before: pd.DataFrame) -> pd.Series:
    """Per row of `listing`: True where the file is new or its size or mtime differ from `before`."""
    key = ["path", "size", "mtime_ns"]
    same = listing[key].merge(before[key].drop_duplicates(), on=key, how="left", indicator=True)["_merge"] == "both"
    return pd.Series(~same.to_numpy(), index=listing.index)
