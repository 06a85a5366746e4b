"""`make preprocess`: every readable slice of meta.csv -> the HU cache (`data.cache`), resumable.

An entry is reused only while the DICOM it was made from keeps its path, size and mtime (`cache/sources.csv`).
Only files that do not decode as images are skipped, with the reason; a skipped file is retried once it changes.
A failed write (disk full, read-only folder) stops the stage at the first failure with one line, keeping what was
cached so far and recording nothing as a bad DICOM. A worker process that dies costs only the file it was decoding,
skipped as the meta scan skips it (`data.pool`, the crash policy of both).
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import UserError
from ..core.io import cannot_write
from ..core.layout import Layout
from . import cache, dicom, inputs, pool
from .source import slice_hu
from . import meta as meta_mod
from .codec import encode

log = logging.getLogger(__name__)

CHUNK = 64
IN_PROCESS_BELOW = 1024  # a process pool costs seconds to start
RECORD_EVERY_S = 60.0  # sources.csv is rewritten this often during a run, so even a kill -9 loses little
_KEY = ["image_id", "path", "size", "mtime_ns"]

Item = tuple[str, str, int, int]  # image_id, path relative to the data folder, size, mtime_ns
Done = tuple[str, str, int, int, int, int]  # an Item + the cache file's size and mtime_ns as written


def cache_one(src: str | Path, dst: Path) -> int:
    """DICOM -> cache file; returns the bytes written. Raises dicom.DicomError for unusable files, OSError on writes.
    The HU are `source.slice_hu`'s, which the DICOM source (`data.source=dicom`) reads too: the two never differ."""
    data = encode(slice_hu(src))
    cache.write_entry(dst, data)
    return len(data)


Result = tuple[list[Done], list[tuple], int, tuple | None]


def _cache_items(data_dir: str, work: str, items: list[Item]) -> Result:
    """A chunk of the cache, in a pool worker: (cached items, skipped (path, reason, size, mtime_ns), bytes written,
    the first write failure or None)."""
    layout = Layout(data=Path(data_dir), work=Path(work))
    done: list[Done] = []
    skipped: list[tuple] = []
    written = 0
    for image_id, rel, size, mtime in items:
        dst = cache.cache_path(layout, image_id)
        try:
            written += cache_one(os.path.join(data_dir, rel), dst)
        except dicom.SourceUnreadable as e:  # the DICOM could not be read: stop, record nothing as bad
            raise UserError(
                f"cannot read {e.filename} ({e.strerror}); fix its permissions or the disk, then rerun "
                f"(the slices cached so far are kept)"
            ) from None
        except dicom.DicomError as e:
            skipped.append((rel, e.reason, size, mtime))
            continue
        except OSError as e:  # the write failed: the DICOM is fine, the disk or folder is not
            return done, skipped, written, (str(dst), e.errno, e.strerror)
        except Exception as e:  # a decoder bug costs one file, never the run (as in the meta scan): skipped, named
            skipped.append((rel, f"cannot decode ({type(e).__name__}: {e})", size, mtime))
            continue
        st = os.stat(dst)
        done.append((image_id, rel, size, mtime, st.st_size, st.st_mtime_ns))
    return done, skipped, written, None


def _rows(layout: Layout, splits: tuple[str, ...] | None) -> pd.DataFrame:
    """image_id, path, size, mtime_ns of every slice of meta.csv (fresh), or of `splits` only."""
    meta = meta_mod.load_meta(layout)
    if splits is not None:
        meta = meta.loc[meta["split"].isin(splits)]
    listing = inputs.read_listing(layout.meta_inputs)
    return meta[["image_id", "path"]].merge(listing[["path", "size", "mtime_ns"]], on="path", how="inner")


def _matches(rows: pd.DataFrame, table: pd.DataFrame, key: list[str]) -> np.ndarray:
    """Per row: whether `table` has a row with the same values in `key` (same file, same size and mtime)."""
    table = table[key].astype({"size": "int64", "mtime_ns": "int64"}).drop_duplicates()
    return (rows[key].merge(table, on=key, how="left", indicator=True)["_merge"] == "both").to_numpy()


def _plan(layout: Layout, splits: tuple[str, ...] | None, retry_skipped: bool) -> tuple[pd.DataFrame, int]:
    """(slices to cache, how many are already cached from their current DICOM)."""
    rows = _rows(layout, splits)
    sources = cache.read_sources(layout)
    cached = cache.cached_ids(layout) - cache.damaged(layout, sources)
    fresh = _matches(rows, sources, _KEY) & rows["image_id"].isin(cached).to_numpy()
    todo = rows.loc[~fresh]
    if not retry_skipped:  # known-bad files are retried only once they change
        todo = todo.loc[~_matches(todo, cache.read_skipped(layout), ["path", "size", "mtime_ns"])]
    return todo, int(fresh.sum())


class _Outcome:
    """What one run cached and skipped so far, recorded in sources.csv / skipped.csv as it goes (every
    RECORD_EVERY_S, so even a kill -9 loses little) and once more at the end, whatever stopped the run."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.done: list[Done] = []
        self.skipped: list[tuple] = []
        self.written = 0
        self.failure: tuple | None = None  # the first failed write: (path, errno, strerror)
        self._recorded = self._recorded_skipped = 0  # done[:_recorded], skipped[:_recorded_skipped] are recorded
        self._last_record = time.perf_counter()

    def collect(self, result: Result) -> bool:
        """Keep a chunk's outcome; True (stop the run) at a failed write."""
        done, skipped, written, self.failure = result
        self.done += done
        self.skipped += skipped
        self.written += written
        if self.failure is not None:
            return True
        if time.perf_counter() - self._last_record > RECORD_EVERY_S:
            self.record()
        return False

    def record(self) -> None:
        _record(self.layout, self.done[self._recorded :], self.skipped[self._recorded_skipped :])
        self._recorded, self._recorded_skipped = len(self.done), len(self.skipped)
        self._last_record = time.perf_counter()


def preprocess(
    layout: Layout, workers: int | None = None, splits: tuple[str, ...] | None = None, retry_skipped: bool = True
) -> dict:
    """Cache every readable slice of meta.csv (train and test, or only `splits`); resumable.

    Returns {"cached", "existing", "skipped", "bytes_written", "seconds", "images_per_s"}.
    """
    layout.require_data()
    cache.reset_if_foreign(layout)
    todo, existing = _plan(layout, splits, retry_skipped)
    items: list[Item] = list(todo[_KEY].itertuples(index=False, name=None))
    t0 = time.perf_counter()
    outcome = _Outcome(layout)
    try:
        pool.run(
            partial(_cache_items, str(layout.data), str(layout.work)),
            items,
            chunk=CHUNK,
            workers=max(1, workers or os.cpu_count() or 1),
            in_process_below=IN_PROCESS_BELOW,
            collect=outcome.collect,
            crashed=lambda item: ([], [(item[1], pool.WORKER_DIED, item[2], item[3])], 0, None),
            desc="cache",
        )
    finally:
        outcome.record()  # whatever stopped the run, its work stays known
    if outcome.failure is not None:
        path, code, reason = outcome.failure
        raise cannot_write(path, OSError(code, reason), folder=layout.cache_dir)
    return _summary(layout, outcome, existing, time.perf_counter() - t0)


def _summary(layout: Layout, outcome: _Outcome, existing: int, seconds: float) -> dict:
    """The run's figures, also logged with the first 50 skipped files and why."""
    done, skipped, written = outcome.done, outcome.skipped, outcome.written
    result = {
        "cached": len(done),
        "existing": existing,
        "skipped": len(skipped),
        "bytes_written": written,
        "seconds": round(seconds, 2),
        "images_per_s": round(len(done) / seconds, 1) if seconds > 0 else 0.0,
    }
    log.info(
        f"cache: {len(done)} new, {existing} already cached, {len(skipped)} skipped, "
        f"{written / max(len(done), 1) / 1024:.0f} kB/image, {result['images_per_s']} img/s -> {layout.cache_dir}"
    )
    for path, reason, _, _ in skipped[:50]:
        log.info(f"  skipped {path}: {reason}")
    return result


def _record(layout: Layout, done: list[Done], skipped: list[tuple]) -> None:
    """Add this run's entries to sources.csv and its bad files to skipped.csv (earlier findings on other files stay)."""
    if not done and not skipped:
        return
    new = pd.DataFrame(done, columns=cache.SOURCE_COLUMNS + cache.ENTRY_COLUMNS)
    sources = cache.read_sources(layout)
    cache.write_sources(
        layout, pd.concat([sources.loc[~sources["image_id"].isin(new["image_id"])], new], ignore_index=True)
    )
    bad = pd.DataFrame(skipped, columns=cache.SKIPPED_COLUMNS)
    earlier = cache.read_skipped(layout)
    tried = set(new["path"]) | set(bad["path"])
    cache.write_skipped(layout, pd.concat([earlier.loc[~earlier["path"].isin(tried)], bad], ignore_index=True))


def ensure(layout: Layout, workers: int | None = None, splits: tuple[str, ...] | None = None) -> dict | None:
    """Run `preprocess` only if some readable slice is not cached from its current DICOM (unchanged known-bad files
    do not count). `splits=("test",)` caches only the test slices (inference in a Kaggle kernel)."""
    if not (layout.train_dir.is_dir() or layout.test_dir.is_dir()):
        return None  # a work folder without its DICOMs: the cache is what it is
    if cache.format_ok(layout) and _plan(layout, splits, retry_skipped=False)[0].empty:
        return None
    return preprocess(layout, workers=workers, splits=splits, retry_skipped=False)
