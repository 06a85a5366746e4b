"""data.source=dicom: every slice read from its DICOM at load time gives the cache's HU bit for bit, so a fold trained
that way is the fold trained from the cache (same seed: same weights, same OOF), without any cache on disk; read
errors behave as the cache's do, and a transient one is retried instead of losing the sample or the run."""

from __future__ import annotations

import errno

import numpy as np
import pandas as pd
import pytest
import torch

from ich_kaggle import train
from ich_kaggle.core import config
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Layout
from ich_kaggle.data import cache, dicom, preprocess, source
from ich_kaggle.data import dataset as D
from ich_kaggle.data.meta import load_meta
from ich_kaggle.data.transforms import build_eval_transforms, build_train_transforms
from ich_kaggle.models.checkpoint import read_checkpoint
from train_helpers import FAST


@pytest.fixture(scope="module")
def data(competition):
    """The session's synthetic competition (shared, read only)."""
    return competition(seed=0)


# 2.5D, the brain-fraction filter and window jitter: every path that reads HU
EXTRA = ["train.epochs=2", "data.neighbors=1", "data.min_brain_fraction=0.05", "augment.window_jitter=0.5"]


def _cfg(src: str, *extra: str) -> config.Config:
    return config.load("tiny", [*FAST, *EXTRA, f"data.source={src}", *extra])


def _same_weights(a, b) -> None:
    wa, wb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_every_slice_from_its_dicom_equals_its_cache_entry(data, tmp_path):
    layout = Layout.of(data, tmp_path / "work")
    preprocess.preprocess(layout, workers=1)
    meta = load_meta(layout)
    read = D.hu_reader(layout, "dicom", meta)
    cached = cache.cached_ids(layout)
    assert cached and len(read) == len(meta)
    for image_id in meta["image_id"]:
        hu = read(image_id)
        if image_id in cached:
            ref = cache.load_hu(layout, image_id)
            assert hu.dtype == ref.dtype == np.int16 and np.array_equal(hu, ref), image_id
    with pytest.raises(KeyError, match="not in the meta table"):
        read("ID_nope")


@pytest.mark.slow
def test_a_fold_from_the_dicoms_is_the_fold_from_the_cache(data, tmp_path):
    from_cache = Layout.of(data, tmp_path / "work_cache")
    from_dicom = Layout.of(data, tmp_path / "work_dicom")
    a = train.train_fold(_cfg("cache"), from_cache, 0, runs=tmp_path / "a")
    b = train.train_fold(_cfg("dicom"), from_dicom, 0, runs=tmp_path / "b")
    assert (from_cache.cache_dir).is_dir() and not from_dicom.cache_dir.exists()  # nothing cached, nothing claimed
    for name in ("last.pt", "best.pt"):
        _same_weights(a / name, b / name)
    assert (a / "oof.csv").read_bytes() == (b / "oof.csv").read_bytes()  # the checkpoints predict the same
    assert pd.read_csv(a / "log.csv")["val_weighted_log_loss"].equals(
        pd.read_csv(b / "log.csv")["val_weighted_log_loss"]
    )
    assert "images from their DICOMs under" in (b / "train.log").read_text()
    assert "images from the cache" in (a / "train.log").read_text()
    assert config.load(str(b / "config.yaml")).data.source == "dicom"  # the fold says what it read

    # the source is no part of the checkpoint's identity: a fold started from the DICOMs resumes from the cache and
    # ends where the uninterrupted one did
    c = train.train_fold(_cfg("dicom"), from_dicom, 0, runs=tmp_path / "c", stop_after_epochs=1)
    train.train_fold(_cfg("cache"), from_cache, 0, runs=tmp_path / "c")
    assert "resuming fold 0 of tiny from epoch 1/2" in (c / "train.log").read_text()
    _same_weights(a / "last.pt", c / "last.pt")


def test_predict_reads_the_cache_whatever_the_fold_trained_from(data, tmp_path):
    from ich_kaggle.predict import stage

    cfg = _cfg("dicom")
    assert stage._from_cache(cfg).data.source == "cache" and cfg.data.source == "dicom"  # a copy, cfg untouched
    assert stage._from_cache(cfg).data.neighbors == cfg.data.neighbors
    plain = _cfg("cache")
    assert stage._from_cache(plain) is plain


def test_config_knob_is_checked_at_load_time():
    assert config.load("tiny").data.source == "cache"
    assert config.load("tiny", ["data.source=dicom"]).data.source == "dicom"
    with pytest.raises(UserError, match=r"^config 'tiny': data.source='disk' is not one of cache, dicom; ") as e:
        config.load("tiny", ["data.source=disk"])
    assert "\n" not in str(e.value)
    assert source.SOURCES == ("cache", "dicom")


def _flaky(monkeypatch, fails: dict[str, int]) -> list[str]:
    """dicom.read_hu failing transiently (EIO) `fails[name]` times for files whose name holds `name` (-1: always)."""
    real, calls = dicom.read_hu, []

    def read_hu(path, *args, **kwargs):
        calls.append(str(path))
        for name, left in fails.items():
            if name in str(path) and left != 0:
                fails[name] = left - 1
                raise dicom.SourceUnreadable(errno.EIO, "Input/output error", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dicom, "read_hu", read_hu)
    return calls


def _dataset(data, tmp_path, train_mode: bool, monkeypatch):
    layout = Layout.of(data, tmp_path / "work")
    meta = load_meta(layout)
    cfg = _cfg("dicom", "data.neighbors=0")
    transform = build_train_transforms(cfg) if train_mode else build_eval_transforms(cfg)
    ds = D.SliceDataset(meta.head(6), layout, cfg, transform=transform, train=train_mode, meta=meta)
    ds.read_hu.delays = (0.0, 0.0, 0.0)
    return ds, meta


def test_a_transient_read_error_is_retried_then_the_sample_is_the_same(data, tmp_path, monkeypatch, caplog):
    ds, meta = _dataset(data, tmp_path, True, monkeypatch)
    want = ds[2][0]
    victim = meta["image_id"].iloc[2]
    calls = _flaky(monkeypatch, {victim: 2})
    x, _, i = ds[2]
    assert i == 2 and torch.equal(x, want) and sum(victim in c for c in calls) == 3
    assert "retrying" in caplog.text and not ds.failed


def test_a_read_that_keeps_failing_replaces_a_training_sample_and_stops_evaluation(data, tmp_path, monkeypatch):
    ds, meta = _dataset(data, tmp_path, True, monkeypatch)
    victim = meta["image_id"].iloc[1]
    _flaky(monkeypatch, {victim: -1})
    x, _, i = ds[1]
    assert i != 1 and ds.failed == {victim}  # one flaky file never sinks a long run: another image trains instead
    ev, _ = _dataset(data, tmp_path, False, monkeypatch)
    with pytest.raises(UserError, match=r"cannot read .*Input/output error.* after retries; .*resumes") as e:
        ev[1]  # a blank validation image would be a wrong prediction: stop instead
    assert "\n" not in str(e.value)
    # nor is a neighbour's transient failure papered over with the slice itself (2.5D)
    layout = Layout.of(data, tmp_path / "work")
    cfg = _cfg("dicom")
    meta_sorted = meta.sort_values(["series_id", "slice_rank"]).reset_index(drop=True)
    middle = meta_sorted.iloc[[3]]
    neighbour = meta_sorted["image_id"].iloc[4]
    assert meta_sorted["series_id"].iloc[3] == meta_sorted["series_id"].iloc[4]
    assert victim not in (middle["image_id"].iloc[0], neighbour)
    _flaky(monkeypatch, {neighbour: -1})
    ev3 = D.SliceDataset(middle, layout, cfg, transform=build_eval_transforms(cfg), train=False, meta=meta)
    ev3.read_hu.delays = ()
    with pytest.raises(UserError, match="after retries"):
        ev3[0]
    # a DICOM that no longer decodes is an unreadable image, as a missing cache entry is: a blank prediction
    monkeypatch.setattr(dicom, "read_hu", lambda *a, **k: (_ for _ in ()).throw(dicom.DicomError("truncated")))
    x, _, i = ev[3]
    assert i == 3 and float(x.abs().sum()) == 0
    # the whole folder gone: one line naming the data folder, not the cache
    with pytest.raises(UserError, match=r"unreadable images in a row under .*data.source=dicom.*mounted"):
        ds[0]
