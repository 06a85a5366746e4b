"""Dataset, transforms and losses: 2.5D neighbour order, window jitter, black-border crop, augment pipeline, loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ich_kaggle.core.labels import LABEL_WEIGHTS, LABELS
from ich_kaggle.core import config
from ich_kaggle.data import dataset as D
from ich_kaggle.data.transforms import build_eval_transforms, build_train_transforms
from ich_kaggle.data.windows import named
from ich_kaggle.engine.plan import epoch_indices, image_size, repeat_factors
from ich_kaggle.engine.losses import FocalLoss, WeightedBCE, build_loss, label_weights


def _meta() -> pd.DataFrame:
    # two series; rows deliberately shuffled so order must come from slice_rank, not file order
    rows = [("a2", "S1", 2), ("a0", "S1", 0), ("b1", "S2", 1), ("a1", "S1", 1), ("b0", "S2", 0), ("a3", "S1", 3)]
    return pd.DataFrame(rows, columns=["image_id", "series_id", "slice_rank"])


def test_neighbor_ids_follow_slice_rank_and_clamp_at_series_ends():
    frame = pd.DataFrame({"image_id": ["a0", "a1", "a3", "b0", "b1"]})
    nb = D.neighbor_ids(frame, _meta(), 1)
    assert nb.tolist() == [
        ["a0", "a0", "a1"],
        ["a0", "a1", "a2"],
        ["a2", "a3", "a3"],
        ["b0", "b0", "b1"],
        ["b0", "b1", "b1"],
    ]
    nb2 = D.neighbor_ids(pd.DataFrame({"image_id": ["a1"]}), _meta(), 2)
    assert nb2.tolist() == [["a0", "a0", "a1", "a2", "a3"]]  # never crosses into series S2


def test_neighbor_ids_unknown_image_raises():
    with pytest.raises(KeyError):
        D.neighbor_ids(pd.DataFrame({"image_id": ["zz"]}), _meta(), 1)


def test_head_bbox_crops_air_with_margin():
    hu = np.full((100, 120), -1000.0, dtype=np.float32)
    hu[20:60, 30:90] = 40.0  # the head
    y0, y1, x0, x1 = D.head_bbox(hu, margin=0.1)
    assert (y0, y1, x0, x1) == (16, 64, 24, 96)
    # nothing above -500 HU: keep the whole image
    assert D.head_bbox(np.full((50, 40), -2000.0), 0.04) == (0, 50, 0, 40)
    # margin clamps at the image edges
    hu2 = np.full((30, 30), -1000.0)
    hu2[0:30, 0:10] = 100
    assert D.head_bbox(hu2, margin=0.5) == (0, 30, 0, 15)


def test_brain_fraction():
    hu = np.full((10, 10), -1000.0)
    hu[:5, :4] = 35
    assert D.brain_fraction(hu) == pytest.approx(0.2)


def test_window_jitter_moves_centre_and_width_within_limits():
    rng = np.random.default_rng(0)
    base = [(40.0, 80.0), (80.0, 200.0)]
    assert D.jitter_windows(base, 0.0, 10.0, rng) == base
    seen = [D.jitter_windows(base, 1.0, 10.0, rng) for _ in range(200)]
    arr = np.array(seen)  # (200, 2, 2)
    assert np.all(np.abs(arr[:, :, 0] - [40, 80]) <= 10) and np.all(np.abs(arr[:, :, 1] - [80, 200]) <= 10)
    assert arr[:, 0, 0].std() > 3  # it really moves
    half = np.array([D.jitter_windows(base, 0.5, 10.0, rng) for _ in range(400)])
    moved = (half[:, 0, 0] != 40.0).mean()
    assert 0.35 < moved < 0.65


def test_train_transforms_compose_only_enabled_steps():
    cfg = config.load("tiny")
    names = [type(t).__name__ for t in build_train_transforms(cfg, 48).transforms]
    assert names[0] == "Resize" and "HorizontalFlip" in names and "Affine" in names
    assert "Transpose" not in names and "GaussianBlur" not in names  # probability 0 in the defaults
    cfg2 = config.load(
        "tiny",
        [
            "augment.hflip=0",
            "augment.shift_scale_rotate=0",
            "augment.brightness_contrast=0",
            "augment.blur=0.5",
            "augment.transpose=0.5",
            "augment.random_resized_crop=0.5",
            "tta.transforms=identity",
        ],
    )  # no flip in training: no flip view
    names2 = [type(t).__name__ for t in build_train_transforms(cfg2).transforms]
    assert names2 == ["Resize", "RandomResizedCrop", "Transpose", "GaussianBlur"]
    hu = [np.random.default_rng(k).normal(40, 300, (90, 70)).astype(np.float32) for k in range(3)]  # 2.5D slices
    windows = named(cfg.data.windows)
    out = build_train_transforms(cfg2, 40)(hu, windows)
    assert out.shape == (9, 40, 40) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    ev = build_eval_transforms(cfg)(hu, windows)
    assert ev.shape == (9, 64, 64)
    np.testing.assert_array_equal(ev[3:6], build_eval_transforms(cfg)(hu[1:2], windows))  # slice-major channels


def test_loss_matches_metric_weighting():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 6), (torch.rand(8, 6) > 0.7).float()
    loss = WeightedBCE(label_weights("metric"))(logits, y)
    p = torch.sigmoid(logits).numpy()
    t = y.numpy()
    per = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    w = np.array(LABEL_WEIGHTS)
    assert float(loss) == pytest.approx(float((per * w).sum(1).mean() / w.sum()), rel=1e-5)
    from ich_kaggle.core import metrics

    assert float(loss) == pytest.approx(metrics.weighted_log_loss(t, p), rel=1e-4)


def test_focal_and_frequency_weights():
    logits = torch.tensor([[4.0] * 6, [-4.0] * 6])
    y = torch.tensor([[1.0] * 6, [0.0] * 6])
    w = label_weights("metric")
    assert float(FocalLoss(w, 2.0)(logits, y)) < float(WeightedBCE(w)(logits, y)) / 10  # easy examples vanish
    labels = np.zeros((100, 6))
    labels[:20, 0] = 1
    labels[:1, 1] = 1  # epidural rare
    labels[:19, 2] = 1
    fw = label_weights("frequency", labels)
    assert float(fw.sum()) == pytest.approx(sum(LABEL_WEIGHTS))
    assert fw[1] > fw[2] > 0
    cfg = config.load("tiny", ["train.loss=focal", "train.class_weights=frequency"])
    assert isinstance(build_loss(cfg, labels), FocalLoss)


def test_oversample_repeats_rare_subtypes_and_subsample_is_seeded():
    labels = np.zeros((100, 6))
    labels[:40, 0] = 1
    labels[:36, 5] = 1  # subdural common
    labels[36:40, 1] = 1  # epidural rare
    rf = repeat_factors(labels)
    assert rf[36] == 3 and rf[0] == 1 and rf[99] == 1  # round(sqrt(36/4)) = 3
    cfg = config.load("tiny", ["train.balance=oversample"])
    idx = epoch_indices(cfg, labels, 0)
    assert len(idx) == 100 + 4 * 2 and (idx == 36).sum() == 3
    cfg2 = config.load("tiny", ["train.max_images_per_epoch=30"])
    a, b, c = epoch_indices(cfg2, labels, 0), epoch_indices(cfg2, labels, 0), epoch_indices(cfg2, labels, 1)
    assert len(a) == 30 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_progressive_sizes():
    cfg = config.load("tiny", ["train.progressive_sizes=[32,48]"])
    assert [image_size(cfg, e) for e in range(4)] == [32, 48, 64, 64]


def test_slice_dataset_stacks_neighbours_in_series_order(monkeypatch):
    """Every slice is a constant HU = 10 * its rank: the channel blocks must read prev, current, next."""
    meta = _meta()
    rank = dict(zip(meta["image_id"], meta["slice_rank"]))

    def fake_hu(layout, image_id):
        hu = np.full((40, 40), -1000.0, dtype=np.float32)
        hu[5:35, 5:35] = 10.0 * rank[image_id]
        return hu

    monkeypatch.setattr(D, "_load_hu", fake_hu)
    cfg = config.load(
        "tiny", ["data.neighbors=1", "data.windows=[brain]", "data.image_size=30", "data.crop_black_border=false"]
    )
    frame = pd.DataFrame({"image_id": ["a0", "a2", "b1"], "any": [0, 1, 0]})
    for c in LABELS[1:]:
        frame[c] = 0
    ds = D.SliceDataset(frame, layout=None, cfg=cfg, transform=build_eval_transforms(cfg), meta=meta)
    x, y, i = ds[1]
    assert x.shape == (3, 30, 30) and x.dtype == torch.float32 and i == 1
    assert y.tolist() == [1, 0, 0, 0, 0, 0]
    centre = x[:, 15, 15].numpy()  # brain window (40, 80): HU h -> (h - 0) / 80
    np.testing.assert_allclose(centre, [10 / 80, 20 / 80, 30 / 80], atol=1e-5)  # a1, a2, a3
    np.testing.assert_allclose(ds[0][0][:, 15, 15].numpy(), [0, 0, 10 / 80], atol=1e-5)  # a0 clamps: a0, a0, a1
    np.testing.assert_allclose(ds[2][0][:, 15, 15].numpy(), [0, 10 / 80, 10 / 80], atol=1e-5)  # b0, b1, b1
    assert float(ds[0][0][0, 0, 0]) == 0.0  # air is black

    # the black-border crop: the 30x30 head fills the output after cropping, so no air row is left at the top
    cfg_crop = config.load("tiny", ["data.windows=[brain]", "data.image_size=30", "data.crop_black_border=true"])
    frame2 = pd.DataFrame({"image_id": ["a3"]})
    xc = D.SliceDataset(frame2, None, cfg_crop, transform=build_eval_transforms(cfg_crop), meta=meta)[0][0]
    assert float(xc[0, 1, 15]) > 0.3 and xc.shape == (1, 30, 30)
    assert D.SliceDataset(frame2, None, cfg_crop, meta=meta)[0][1].tolist() == [0.0] * 6  # unlabelled -> zeros


def test_training_augmentation_is_seeded_by_epoch_and_index(monkeypatch):
    monkeypatch.setattr(
        D, "_load_hu", lambda layout, i: np.random.default_rng(hash(i) % 97).normal(40, 60, (48, 48)).astype(np.float32)
    )
    cfg = config.load("tiny", ["data.image_size=32", "augment.window_jitter=1.0", "augment.hflip=0.5"])
    frame = pd.DataFrame({"image_id": ["a0", "a1"]})
    ds = D.SliceDataset(frame, None, cfg, transform=build_train_transforms(cfg), train=True, meta=_meta())
    a = ds[0][0]
    assert torch.equal(a, ds[0][0])  # same (epoch, index): same draw, whatever worker/rank asks
    ds.set_epoch(1)
    assert not torch.equal(a, ds[0][0])


def test_unreadable_image_in_eval_gives_blank_and_is_recorded(monkeypatch):
    def broken(layout, image_id):
        raise OSError("truncated cache file")

    monkeypatch.setattr(D, "_load_hu", broken)
    cfg = config.load("tiny", ["data.image_size=16"])
    ds = D.SliceDataset(
        pd.DataFrame({"image_id": ["a0"]}), None, cfg, transform=build_eval_transforms(cfg), meta=_meta()
    )
    x, y, i = ds[0]
    assert x.shape == (3, 16, 16) and float(x.abs().sum()) == 0 and ds.failed == {"a0"}
    assert torch.isnan(y).all()  # the mark by which predict leaves it out instead of predicting a blank image


def test_a_broken_cache_is_one_clear_error_not_an_endless_loop(monkeypatch):
    from ich_kaggle.core.errors import UserError

    def broken(layout, image_id):
        raise OSError("not a cache file")

    monkeypatch.setattr(D, "_load_hu", broken)
    cfg = config.load("tiny", ["data.image_size=16"])
    frame = pd.DataFrame({"image_id": ["a0", "a1", "a2"]})
    ds = D.SliceDataset(frame, None, cfg, transform=build_train_transforms(cfg), train=True, meta=_meta())
    with pytest.raises(UserError, match="unreadable images in a row.*preprocess"):
        ds[0]
    assert ds.failed == {"a0", "a1", "a2"}


def test_blank_eval_image_follows_the_transform_size(monkeypatch):
    monkeypatch.setattr(D, "_load_hu", lambda layout, i: (_ for _ in ()).throw(OSError("gone")))
    cfg = config.load("tiny", ["data.image_size=64", "data.neighbors=1"])
    ds = D.SliceDataset(
        pd.DataFrame({"image_id": ["a1"]}), None, cfg, transform=build_eval_transforms(cfg, 24), meta=_meta()
    )
    assert ds[0][0].shape == (9, 24, 24)


def _extent(mask: np.ndarray) -> tuple[int, int]:
    """(height, width) of the pixels set in `mask`."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def test_the_head_crop_keeps_the_heads_aspect_ratio(monkeypatch):
    """An elliptical head phantom 1.5x wider than tall, near the image's top edge (its square crop leaves the image):
    the output head is 1.5x wider than tall too, in eval and in training without augmentation, and what the square
    reaches beyond the image is black like air; data.crop_square=false (checkpoints made before it) stretches it."""
    yy, xx = np.mgrid[:512, :512]
    r = ((yy - 130) / 120.0) ** 2 + ((xx - 256) / 180.0) ** 2
    hu = np.where(r <= 1, 1000, -1000).astype(np.int16)  # skull
    hu[r <= 0.85] = 30  # brain
    monkeypatch.setattr(D, "_load_hu", lambda layout, image_id: hu)
    frame = pd.DataFrame({"image_id": ["a1"]})
    in_h, in_w = _extent(hu > -500)
    assert in_w / in_h == pytest.approx(1.5, rel=0.01)
    no_aug = [f"augment.{k}=0" for k in ("hflip", "shift_scale_rotate", "brightness_contrast")] + [
        "tta.transforms=identity"
    ]
    for square in (True, False):
        overrides = ["data.image_size=96", "data.neighbors=1", f"data.crop_square={str(square).lower()}"]
        cfg = config.load("tiny", overrides)
        ds = D.SliceDataset(frame, None, cfg, transform=build_eval_transforms(cfg), meta=_meta())
        planes = ds.load_planes(0)
        assert all(p.shape == planes[0].shape for p in planes)
        x = ds[0][0].numpy()
        assert x.shape == (9, 96, 96) and x.min() >= 0 and x.max() <= 1
        h, w = _extent(x[3] > 0)  # the current slice's brain window: skull and brain
        if not square:
            assert w / h == pytest.approx(1.0, rel=0.04), (h, w)  # the old crop: stretched to the square
            continue
        assert planes[0].shape[0] == planes[0].shape[1]
        assert w / h == pytest.approx(1.5, rel=0.04), (h, w)
        assert w > 0.85 * 96  # still cropped to the head: it spans the output's width (less the margin)
        assert float(x[:, :8].max()) == 0.0  # the part of the square above the image's edge is black
        cfg_train = config.load("tiny", [*overrides, *no_aug])
        train = D.SliceDataset(
            frame, None, cfg_train, transform=build_train_transforms(cfg_train), train=True, meta=_meta()
        )
        np.testing.assert_array_equal(train[0][0].numpy(), x)  # training without augmentation = eval geometry


def test_a_checkpoint_config_from_before_the_square_crop_keeps_the_stretched_crop():
    from ich_kaggle.core.config import from_dict

    stored = config.load("tiny").to_dict()
    assert from_dict(stored).data.crop_square is True
    del stored["data"]["crop_square"]
    assert from_dict(stored).data.crop_square is False
