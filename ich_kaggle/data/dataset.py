"""torch Dataset over cached slices: HU -> (2.5D neighbours) -> head crop -> transform (transforms.py).

The head crop (`data.crop_black_border`) is the current slice's head bounding box, widened to the square centred on
it (`data.crop_square`, the default; beyond the image's edge filled with a HU below every window), so the
transform's resize to size x size scales the head without stretching it.

Per sample each slice is decoded once and stays in HU through the geometry (resize, crop, flips, affine) at the
model's size; the (jittered) windows are computed after, so the work follows what the model sees: 2n+1 HU planes
resampled, not (2n+1) x windows float channels at full size.

Channel order with `data.neighbors = n`: slice-major, i.e. [slice-n windows..., ..., current windows..., ...,
slice+n windows...], each block in `data.windows` order. Neighbours follow the meta table's `slice_rank` within the
series and are clamped at the series ends (the first slice uses itself as its previous neighbour).

Randomness (augmentations, window jitter) is drawn from a generator seeded by (seed, epoch, index), so a sample's
augmentation does not depend on worker count, rank or resume point: training is reproducible.
"""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ..core.labels import LABELS
from ..core.config import Config
from ..core.errors import UserError
from ..core.io import write_csv
from ..core.layout import Layout
from . import dicom
from .source import DicomSlices
from .windows import jitter, named, window_planes

log = logging.getLogger(__name__)

AIR_HU = -500.0  # pixels above this are head, headrest or tissue; below it air or scanner padding
# ...enough that the shift / scale TTA views cut no intracranial pixel (`bench --what tta-subtypes`; design-choices.md)
BRAIN_HU = (0.0, 80.0)
MAX_REPLACEMENTS = 50  # consecutive unreadable draws before giving up: the cache itself is broken


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: containers and Kaggle's 4 CPUs), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def loader_workers(requested: int, processes: int = 1) -> int:
    """`data.num_workers`: as set, or for -1 the usable CPUs shared by the `processes` ranks on this machine."""
    return requested if requested >= 0 else max(1, usable_cpus() // max(1, processes))


def head_bbox(hu: np.ndarray, margin: float, threshold: float = AIR_HU) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the pixels above `threshold`, widened by `margin`; the whole image if nothing is there."""
    h, w = hu.shape[:2]
    # a row (column) holds a pixel above the threshold iff its maximum is above it: no boolean image to build
    rows, cols = np.flatnonzero(hu.max(axis=1) > threshold), np.flatnonzero(hu.max(axis=0) > threshold)
    if len(rows) < 8 or len(cols) < 8:  # empty or a few stray pixels: cropping would only magnify noise
        return 0, h, 0, w
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    my, mx = int(round((y1 - y0) * margin)), int(round((x1 - x0) * margin))
    return max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx)


def square_box(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) widened along its shorter side to a square with the same centre (may leave the image)."""
    y0, y1, x0, x1 = box
    side = max(y1 - y0, x1 - x0)
    y0 -= (side - (y1 - y0)) // 2
    x0 -= (side - (x1 - x0)) // 2
    return y0, y0 + side, x0, x0 + side


def crop(hu: np.ndarray, box: tuple[int, int, int, int], fill: float) -> np.ndarray:
    """hu[y0:y1, x0:x1], a view when the box lies inside the image; the part outside it is `fill` (a copy)."""
    y0, y1, x0, x1 = box
    h, w = hu.shape
    if y0 >= 0 and x0 >= 0 and y1 <= h and x1 <= w:
        return hu[y0:y1, x0:x1]
    out = np.full((y1 - y0, x1 - x0), fill, dtype=hu.dtype)
    iy0, iy1, ix0, ix1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = hu[iy0:iy1, ix0:ix1]
    return out


def brain_fraction(hu: np.ndarray) -> float:
    """Fraction of pixels in the brain HU range: near 0 for slices above the skull or below the skull base."""
    lo, hi = BRAIN_HU
    return float(((hu >= lo) & (hu <= hi)).mean())


# One OpenCV thread, set at import, before any loader worker is forked: each worker is one CPU already
# (data.num_workers=-1), and a forked worker that touches the thread pool its parent started (even to shrink it
# with setNumThreads) waits forever on the pool's lock.
cv2.setNumThreads(1)


def jitter_windows(
    windows: list[tuple[float, float]], prob: float, max_hu: float, rng: np.random.Generator
) -> list[tuple[float, float]]:
    """With probability `prob` per window, shift its center and width each by U(-max_hu, max_hu)."""
    out = []
    for window in windows:
        out.append(
            jitter([window], rng, max_hu)[0]
            if prob > 0 and rng.random() < prob
            else (float(window[0]), float(window[1]))
        )
    return out


def neighbor_ids(frame: pd.DataFrame, meta: pd.DataFrame, n: int) -> np.ndarray:
    """(len(frame), 2n+1) image ids of each row's series neighbours at offsets -n..n, clamped at the series ends."""
    ids = frame["image_id"].to_numpy()
    if n == 0:
        return ids.reshape(-1, 1).astype(object)
    m = meta[["image_id", "series_id", "slice_rank"]].sort_values(["series_id", "slice_rank"]).reset_index(drop=True)
    pos = pd.Series(np.arange(len(m)), index=m["image_id"].to_numpy())
    series_codes = pd.factorize(m["series_id"])[0]  # rows of a series are contiguous after the sort
    first = pd.Series(np.arange(len(m))).groupby(series_codes).transform("min").to_numpy()
    last = pd.Series(np.arange(len(m))).groupby(series_codes).transform("max").to_numpy()
    missing = [i for i in ids if i not in pos.index]
    if missing:
        raise KeyError(f"{len(missing)} image ids are not in the meta table (e.g. {missing[0]})")
    p = pos.loc[ids].to_numpy()
    offsets = np.arange(-n, n + 1)
    q = np.clip(p[:, None] + offsets[None, :], first[p][:, None], last[p][:, None])
    return m["image_id"].to_numpy()[q].astype(object)


def _load_meta(layout: Layout) -> pd.DataFrame:
    from . import meta

    return meta.load_meta(layout)


def _load_hu(layout: Layout, image_id: str) -> np.ndarray:
    from . import cache

    return cache.load_hu(layout, image_id)


class _CachedSlices:
    """image_id -> int16 HU from the cache (through `_load_hu`, looked up per call)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def __call__(self, image_id: str) -> np.ndarray:
        return _load_hu(self.layout, image_id)


def hu_reader(layout: Layout, source: str, meta: pd.DataFrame | None = None):
    """image_id -> int16 HU from `source` (`data.source`): the cache, or each slice's DICOM (path from `meta`; the
    same int16 values, see `data.source`)."""
    if source == "dicom":
        return DicomSlices(layout.data, _load_meta(layout) if meta is None else meta)
    return _CachedSlices(layout)


class SliceDataset(Dataset):
    """Items: (image float32 C x H x W, labels float32 (6,) (zeros if unlabelled), row index in `frame`).

    An image that cannot be loaded is replaced by another one in training; in evaluation it comes back blank with
    NaN labels, the mark by which predict leaves it out and reports it."""

    def __init__(
        self,
        frame: pd.DataFrame,
        layout: Layout | None,
        cfg: Config,
        transform=None,
        train: bool = False,
        meta: pd.DataFrame | None = None,
        read_hu=None,
    ) -> None:
        self.frame = frame.reset_index(drop=True)
        self.layout, self.cfg, self.transform, self.train = layout, cfg, transform, train
        self.windows = named(cfg.data.windows)
        if cfg.data.source == "dicom" and meta is None and read_hu is None:
            meta = _load_meta(layout)
        self.source = cfg.data.source
        # `read_hu`: image_id -> int16 HU given by the caller (`infer` reads any DICOM layout; no layout then)
        self.read_hu = read_hu if read_hu is not None else hu_reader(layout, cfg.data.source, meta)
        self.epoch = 0
        self.seed = cfg.train.seed
        if all(c in self.frame.columns for c in LABELS):
            self.labels = self.frame[list(LABELS)].to_numpy(dtype=np.float32, copy=True)  # writable
        else:
            self.labels = np.zeros((len(self.frame), len(LABELS)), dtype=np.float32)
        self.image_ids = self.frame["image_id"].astype(str).to_numpy()
        if cfg.data.neighbors > 0:
            self.neighbors = neighbor_ids(self.frame, _load_meta(layout) if meta is None else meta, cfg.data.neighbors)
        else:
            self.neighbors = self.image_ids.reshape(-1, 1).astype(object)
        self.failed: set[str] = set()
        # beyond the image's edge a square crop is filled with a HU below every window (what the affine fills with)
        from .transforms import fill_hu  # albumentations: imported where a dataset is made

        self.fill = math.floor(fill_hu(cfg))

    def __len__(self) -> int:
        return len(self.frame)

    def set_epoch(self, epoch: int) -> None:
        """Changes the augmentation draw of every sample (called once per epoch, before the loader iterates)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def load_planes(self, index: int) -> list[np.ndarray]:
        """HU planes (int16) of row `index` and its neighbours in channel order, cropped to the current slice's head
        (`data.crop_square`: to the square centred on it, views unless it leaves the image): each slice decoded
        once, whatever the number of windows made from it."""
        ids = self.neighbors[index]
        center = len(ids) // 2
        current = self.read_hu(str(ids[center]))
        slices = []
        for j, nid in enumerate(ids):
            if j == center or nid == ids[center]:
                slices.append(current)
                continue
            try:
                hu = self.read_hu(str(nid))
                slices.append(hu if hu.shape == current.shape else current)
            except dicom.SourceUnreadable:  # the disk, not the file: never papered over (see __getitem__)
                raise
            except Exception as e:  # an unreadable neighbour: use the slice itself rather than lose the sample
                log.warning("neighbour %s of %s unreadable (%s); using the slice itself", nid, ids[center], e)
                slices.append(current)
        if self.cfg.data.crop_black_border:
            box = head_bbox(current, self.cfg.data.crop_margin)
            if self.cfg.data.crop_square:  # the resize to size x size then keeps the head's aspect ratio
                box = square_box(box)
            cropped: dict[int, np.ndarray] = {}  # the current slice stands in for missing neighbours: crop it once
            for s in slices:
                if id(s) not in cropped:
                    cropped[id(s)] = crop(s, box, self.fill)
            slices = [cropped[id(s)] for s in slices]
        return slices

    def _item(self, index: int) -> torch.Tensor:
        rng = self._rng(index) if self.train else None
        planes = self.load_planes(index)
        windows = self.windows
        if rng is not None and self.cfg.augment.window_jitter > 0:
            windows = jitter_windows(windows, self.cfg.augment.window_jitter, self.cfg.augment.window_jitter_hu, rng)
        if self.transform is None:
            return torch.from_numpy(window_planes(planes, windows))
        if rng is not None:
            self.transform.set_random_state(rng, random.Random(int(rng.integers(2**31))))
        return torch.from_numpy(self.transform(planes, windows))

    def _blank(self) -> torch.Tensor:
        """An all-air image of the size the transform produces (which changes with progressive resizing)."""
        size = self.cfg.data.image_size if self.transform is None else self.transform.size
        return torch.zeros((len(self.windows) * self.neighbors.shape[1], size, size), dtype=torch.float32)

    def __getitem__(self, index: int):
        current, rng = index, None
        for _ in range(MAX_REPLACEMENTS):
            try:
                return self._item(current), torch.from_numpy(self.labels[current]), current
            except dicom.SourceUnreadable as e:  # still unreadable after the retries (source.DicomSlices)
                if not self.train:  # a blank validation or test image would be a wrong prediction: stop
                    raise UserError(
                        f"cannot read {e.filename} ({e.strerror}) after retries; fix the disk or its "
                        f"permissions and rerun (training resumes from last.pt)"
                    ) from None
                self._unreadable(current, e)
                rng = rng or self._rng(index)
                current = int(rng.integers(len(self)))
            except Exception as e:  # a corrupt cache file must not end a long run
                if isinstance(e, MemoryError) or "memory" in str(e).lower():  # not the image's fault: say so
                    raise UserError(
                        f"out of memory making image {self.image_ids[current]} at data.image_size="
                        f"{getattr(self.cfg.data, 'image_size', '?')} ({type(e).__name__}); lower "
                        f"data.image_size or train.batch_size"
                    ) from None
                image_id = self.image_ids[current]
                if image_id not in self.failed:  # warn once per image (per worker)
                    self.failed.add(image_id)
                    log.warning(
                        "image %s unreadable (%s); %s",
                        image_id,
                        e,
                        "replaced by another training image" if self.train else "left out of the predictions",
                    )
                if not self.train:  # NaN labels mark it: predict leaves it out and lists it as unreadable
                    return self._blank(), torch.full((len(LABELS),), float("nan")), index
                rng = rng or self._rng(index)
                current = int(rng.integers(len(self)))
        if self.source == "dicom":
            raise UserError(
                f"{MAX_REPLACEMENTS} unreadable images in a row under {self.layout.data} (last: "
                f"{self.image_ids[current]}, read from its DICOM: data.source=dicom); check that the "
                f"data folder is mounted and readable"
            )
        cache_dir = getattr(self.layout, "cache_dir", "the cache")
        raise UserError(
            f"{MAX_REPLACEMENTS} unreadable images in a row under {cache_dir} (last: "
            f"{self.image_ids[current]}); rerun `python -m ich_kaggle preprocess` (it makes damaged "
            f"entries again from their DICOMs), or check that the work folder is readable"
        )

    def _unreadable(self, index: int, e: BaseException) -> None:
        image_id = self.image_ids[index]
        if image_id not in self.failed:
            self.failed.add(image_id)
            log.warning("image %s unreadable (%s); replaced by another training image", image_id, e)


def brain_fractions(layout: Layout, image_ids: list[str] | np.ndarray, read_hu=None) -> pd.Series:
    """Brain-range pixel fraction per image, cached in <work>/brain_fraction.csv (computed once, then reused).
    `read_hu`: image_id -> HU (`hu_reader`; default the cache)."""
    read_hu = read_hu or _CachedSlices(layout)
    path = Path(layout.work) / "brain_fraction.csv"
    known = pd.read_csv(path) if path.exists() else pd.DataFrame({"image_id": [], "brain_fraction": []})
    known = known.drop_duplicates("image_id").set_index("image_id")["brain_fraction"].astype(float)
    todo = [i for i in pd.unique(np.asarray(image_ids, dtype=object)) if i not in known.index]
    if todo:
        from tqdm import tqdm

        values, unreadable = {}, {}
        for image_id in tqdm(todo, desc="brain fraction", unit="img", leave=False):
            try:
                values[image_id] = brain_fraction(read_hu(image_id))
            except Exception as e:  # kept (fraction 1) but not remembered: it may be readable next time
                log.warning("image %s unreadable for the brain fraction (%s); kept", image_id, e)
                unreadable[image_id] = 1.0
        known = pd.concat([known, pd.Series(values, dtype=float)])
        write_csv(known.rename_axis("image_id").reset_index(name="brain_fraction"), path)
        known = pd.concat([known, pd.Series(unreadable, dtype=float)])
    return known.loc[list(image_ids)]


def drop_empty_slices(frame: pd.DataFrame, layout: Layout, min_fraction: float, read_hu=None) -> pd.DataFrame:
    """Training rows whose brain fraction is at least `min_fraction` (positives are always kept)."""
    if min_fraction <= 0 or frame.empty:
        return frame
    frac = brain_fractions(layout, frame["image_id"].to_numpy(), read_hu).to_numpy()
    keep = frac >= min_fraction
    if all(c in frame.columns for c in LABELS):
        keep |= frame["any"].to_numpy() > 0
    return frame.loc[keep].reset_index(drop=True)
