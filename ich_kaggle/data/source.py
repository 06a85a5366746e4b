"""Where a slice's HU come from (`data.source`): the cache (`make preprocess`) or its DICOM, read at load time.

`slice_hu` is the one function that turns a DICOM into the int16 HU the cache stores (`preprocess.cache_one` encodes
exactly its result, losslessly), so a slice read from its DICOM equals the same slice read from the cache, bit for
bit: a fold trained with `data.source=dicom` is the fold trained from the cache.

The DICOM source needs no disk beyond the competition's files (the training kernel uses it where the cache of the
train images would not fit the session's disk) and costs a full read of each file (~525 kB for a 512 px slice
against ~226 kB of cache) plus the strict reader's checks per slice per epoch.

Read errors: a file that no longer decodes (`dicom.DicomError`) is an unreadable image, as a missing cache entry is
(`SliceDataset` replaces a training sample; in evaluation it returns a blank image with NaN labels, which
predict leaves out and lists as unreadable; both with a warning). A read that
fails for a reason outside the file (`dicom.SourceUnreadable`: I/O error, permissions, too many open files) is
retried a few times first, so one flaky read of a mounted disk neither loses the sample nor kills a long run; one
that keeps failing is raised as such, and the dataset decides (see `SliceDataset.__getitem__`).
"""

from __future__ import annotations

import logging
import time
import typing
from pathlib import Path

import numpy as np
import pandas as pd

from . import dicom
from ..core.config import DataSource

log = logging.getLogger(__name__)

SOURCES = typing.get_args(DataSource)  # `data.source`: declared once, by the config field
RETRY_DELAYS_S = (0.1, 0.5, 2.0)  # between the attempts at a transiently unreadable DICOM (~2.6 s in all)


def slice_hu(path: str | Path) -> np.ndarray:
    """The int16 HU (H, W) of one DICOM slice, as the cache holds it. Raises dicom.DicomError (not a CT slice) or
    dicom.SourceUnreadable (the read failed for a reason outside the file)."""
    return dicom.read_hu(path, dtype=np.int16)


class DicomSlices:
    """image_id -> int16 HU straight from its DICOM (meta's `path`, relative to the data folder).

    The id -> path table is kept in two numpy byte arrays (no per-row Python objects), so forked loader workers
    share it instead of copying it page by page as reference counts change."""

    def __init__(self, data_dir: str | Path, meta: pd.DataFrame, delays: tuple[float, ...] = RETRY_DELAYS_S) -> None:
        self.data_dir = Path(data_dir)
        ids = meta["image_id"].astype(str).to_numpy()
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order].astype(np.bytes_)
        self.paths = meta["path"].astype(str).to_numpy()[order].astype(np.bytes_)
        self.delays = tuple(delays)

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, image_id: str) -> Path:
        key = np.bytes_(image_id)
        i = int(np.searchsorted(self.ids, key))
        if i >= len(self.ids) or self.ids[i] != key:
            raise KeyError(f"image {image_id} is not in the meta table")
        return self.data_dir / self.paths[i].decode()

    def __call__(self, image_id: str) -> np.ndarray:
        path = self.path(image_id)
        for attempt, delay in enumerate((*self.delays, None)):
            try:
                return slice_hu(path)
            except dicom.SourceUnreadable as e:
                if delay is None:
                    raise
                log.warning(
                    f"cannot read {path} ({e.strerror}); retrying in {delay:g} s (attempt {attempt + 2} of "
                    f"{len(self.delays) + 1})"
                )
                time.sleep(delay)
        raise AssertionError("unreachable")
