"""The fast loader path (geometry on HU slices, windows after) against the path it replaced (windows at full size,
then one albumentations Compose on the windowed channels), on real slices of the mini set: same geometry for the
same seed, same pixel statistics."""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest

from ich_kaggle.core import config
from ich_kaggle.core.layout import Layout
from ich_kaggle.data import cache, meta, preprocess
from ich_kaggle.data.dataset import SliceDataset
from ich_kaggle.data.transforms import build_eval_transforms, build_train_transforms
from ich_kaggle.data.windows import apply_windows, named

ALL_AUGMENTS = [
    "augment.hflip=0.5",
    "augment.transpose=0.5",
    "augment.random_resized_crop=0.5",
    "augment.shift_scale_rotate=0.8",
    "augment.rotate_limit=20",
    "augment.brightness_contrast=0.5",
    "augment.blur=0.3",
]


def _old_compose(cfg, size: int, train: bool) -> A.Compose:
    """The pipeline the dataset ran before on windowed (H, W, C) images in [0, 1] (air filled with 0)."""
    aug = cfg.augment
    steps = [A.Resize(size, size, interpolation=cv2.INTER_LINEAR)]
    if not train:
        return A.Compose(steps)
    if aug.random_resized_crop > 0:
        steps.append(
            A.RandomResizedCrop(
                size=(size, size), scale=tuple(aug.crop_scale), ratio=(0.9, 1.1), p=aug.random_resized_crop
            )
        )
    if aug.hflip > 0:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.transpose > 0:
        steps.append(A.Transpose(p=aug.transpose))
    if aug.shift_scale_rotate > 0:
        steps.append(
            A.Affine(
                translate_percent=(-aug.shift_limit, aug.shift_limit),
                scale=(1 - aug.scale_limit, 1 + aug.scale_limit),
                rotate=(-aug.rotate_limit, aug.rotate_limit),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=aug.shift_scale_rotate,
            )
        )
    if aug.brightness_contrast > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=aug.brightness_contrast))
    if aug.blur > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), p=aug.blur))
    return A.Compose(steps)


def _old(planes, windows, compose: A.Compose, seed: int | None) -> np.ndarray:
    img = np.concatenate([apply_windows(p.astype(np.float32), windows) for p in planes], axis=2)
    if seed is not None:
        compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
    out = np.clip(compose(image=img)["image"], 0.0, 1.0)
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def _new(planes, windows, transform, seed: int | None) -> np.ndarray:
    if seed is not None:
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform(planes, windows)


@pytest.fixture(scope="module")
def real(mini_dir, tmp_path_factory):
    """Two whole series of the real mini set, cached in a temporary work folder; (layout, meta, their rows)."""
    layout = Layout.of(mini_dir, tmp_path_factory.mktemp("work"))
    m = meta.load_meta(layout)
    train = m.loc[m["split"] == "train"]
    series = train["series_id"].value_counts().index[:2]
    rows = train.loc[train["series_id"].isin(series)].reset_index(drop=True)
    for image_id, rel in zip(rows["image_id"], rows["path"]):
        preprocess.cache_one(mini_dir / rel, cache.cache_path(layout, image_id))
    return layout, m, rows


def _centroid(ch: np.ndarray) -> np.ndarray | None:
    total = ch.sum()
    if total < 0.5:
        return None
    yy, xx = np.mgrid[: ch.shape[0], : ch.shape[1]]
    return np.array([(ch * yy).sum(), (ch * xx).sum()]) / total


def test_same_seed_gives_the_same_geometry_and_pixels_as_the_old_path(real):
    """A bright marker beside a real slice lands where the old pipeline put it, for the same seed (so the random
    draws are the same ones, in the same order), and the slice's windows agree pixel for pixel up to resampling."""
    layout, m, rows = real
    cfg = config.load("tiny", ALL_AUGMENTS)
    size = 256
    windows = named(cfg.data.windows)
    ds = SliceDataset(rows, layout, cfg, meta=m)
    new_t, old_t = build_train_transforms(cfg, size), _old_compose(cfg, size, train=True)
    moved = flipped = 0
    diffs = []
    for seed in range(60):
        planes = ds.load_planes(seed % len(rows))
        marker = np.full(planes[0].shape, -1000, dtype=np.int16)
        y, x = planes[0].shape[0] // 3, planes[0].shape[1] // 4
        marker[y : y + 4, x : x + 4] = 1000
        old = _old(planes + [marker], windows, old_t, seed)
        new = _new(planes + [marker], windows, new_t, seed)
        assert new.shape == old.shape == (6, size, size)
        a, b = _centroid(old[3]), _centroid(new[3])
        assert (a is None) == (b is None) or max(old[3].sum(), new[3].sum()) < 4, seed
        if a is not None and b is not None:
            assert np.abs(a - b).max() < 0.75, (seed, a, b)
            moved += int(np.abs(a - np.array([y + 2, x + 2]) * size / np.array(planes[0].shape)).max() > 2)
            flipped += int(b[1] > size / 2)
        diffs.append(float(np.abs(old[:3] - new[:3]).mean()))
    assert moved > 20 and flipped > 3  # the augmentation really moved (and mirrored) the marker
    assert np.median(diffs) < 0.01 and max(diffs) < 0.03, diffs  # the same images, resampled once instead of twice


@pytest.mark.parametrize("name", ["seresnext50_512", "seresnext101_480"])
def test_pixel_statistics_match_the_old_path_on_real_slices(real, name):
    """Per channel over many real (2.5D: 9-channel) samples: mean, spread, black and white fractions as before,
    with the config's own augmentation (one random draw per sample, the same for both paths) and the eval resize."""
    layout, m, rows = real
    cfg = config.load(name)
    size = cfg.data.image_size
    windows = named(cfg.data.windows)
    ds = SliceDataset(rows, layout, cfg, meta=m)
    for train in (True, False):
        new_t = (build_train_transforms if train else build_eval_transforms)(cfg, size)
        old_t = _old_compose(cfg, size, train)
        old, new = [], []
        for k, i in enumerate(np.random.default_rng(1).permutation(len(rows))[:16]):
            planes = ds.load_planes(int(i))
            seed = 1000 + k if train else None  # the same draw for both: only the path differs
            old.append(_old(planes, windows, old_t, seed)[:, ::4, ::4])
            new.append(_new(planes, windows, new_t, seed)[:, ::4, ::4])
        old, new = np.stack(old), np.stack(new)
        assert old.shape == new.shape and old.shape[1] == len(windows) * (2 * cfg.data.neighbors + 1)
        per_channel = (0, 2, 3)
        np.testing.assert_allclose(new.mean(axis=per_channel), old.mean(axis=per_channel), atol=0.002)
        np.testing.assert_allclose(new.std(axis=per_channel), old.std(axis=per_channel), atol=0.005)
        # windows after resampling keep edges sharp: a pixel half air, half tissue is black where the old path made
        # it grey, ~1% of the pixels (measured 0.7-1.5%), the same at the saturated end
        for frac in (lambda v: (v == 0).mean(axis=per_channel), lambda v: (v >= 0.999).mean(axis=per_channel)):
            assert np.all(frac(new) - frac(old) > -0.002) and np.all(frac(new) - frac(old) < 0.025)


def test_the_dataset_output_equals_the_old_path_without_augmentation(real):
    """Eval: the old and new paths differ only where windows clip inside one resampled pixel."""
    layout, m, rows = real
    cfg = config.load("seresnext101_480")
    ds = SliceDataset(rows, layout, cfg, transform=build_eval_transforms(cfg), meta=m)
    old_t = _old_compose(cfg, cfg.data.image_size, train=False)
    x = ds[3][0].numpy()
    ref = _old(ds.load_planes(3), named(cfg.data.windows), old_t, None)
    assert x.shape == ref.shape == (9, 480, 480)
    close = np.abs(x - ref) < 0.01
    assert close.mean() > 0.97 and np.abs(x - ref).mean() < 0.005
    frame = pd.DataFrame({"image_id": rows["image_id"]})
    assert SliceDataset(frame, layout, cfg, meta=m)[3][0].shape[0] == 9  # no transform: windows at crop size


def _extent(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)) if len(rows) else (0, 0)


def test_real_heads_keep_their_aspect_ratio(real):
    """The head crop is a square around the head, so the head's width/height in the model input is the slice's
    (real heads are longer than wide: stretching the crop to the square changed it by 10-30%)."""
    layout, m, rows = real
    cfg = config.load("seresnext50_512")
    soft = list(cfg.data.windows).index("soft_tissue")
    low = named(["soft_tissue"])[0][0] - named(["soft_tissue"])[0][1] / 2
    ds = SliceDataset(rows, layout, cfg, transform=build_eval_transforms(cfg), meta=m)
    kept, aspects = [], []
    for i in range(0, len(rows), 3):
        h, w = _extent(cache.load_hu(layout, rows["image_id"][i]) > low + 20)
        if min(h, w) < 100:  # the skull's top or base: a few islands
            continue
        oh, ow = _extent(ds[i][0].numpy()[soft] > 20 / 380)
        kept.append((ow / oh) / (w / h))
        aspects.append(w / h)
    assert len(kept) >= 5
    assert np.median(np.abs(np.array(aspects) - 1)) > 0.05, aspects  # these heads are not square: the test bites
    assert np.median(np.abs(np.array(kept) - 1)) < 0.02 and np.max(np.abs(np.array(kept) - 1)) < 0.05, kept
