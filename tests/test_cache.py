"""HU cache: lossless codec, resumable preprocessing, skipped files, CLI."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from ich_kaggle import cli
from ich_kaggle.data import cache, dicom, meta
from ich_kaggle.core.layout import Layout


@pytest.mark.parametrize("level", [cache.FAST, cache.SMALL])
def test_codec_is_lossless(level, mini_dir):
    rng = np.random.default_rng(0)
    cases = [
        rng.integers(-1100, 3000, size=(512, 512)),
        rng.integers(-32768, 32768, size=(37, 53)),  # extremes: row-delta mode with int16 wrap-around
        np.full((7, 9), -3024), np.array([[32767, -32768, 0]]), np.array([[8191, -8192], [-8192, 8191]]),
        # residuals right at the packing thresholds (zigzag 3/4, 15/16, 255/256) in 16-value blocks
        np.cumsum(np.repeat([[-2, 2, -8, 8, -128, 128, 0, 1]], 16, axis=0).reshape(8, 16), axis=1),
    ]
    for path in sorted((mini_dir / "stage_2_train").glob("*.dcm"))[:5]:
        cases.append(dicom.read_hu(path, dtype=np.int16))
    for hu in cases:
        hu = hu.astype(np.int16)
        blob = cache.encode(hu, level)
        out = cache.decode(blob)
        assert out.dtype == np.int16
        np.testing.assert_array_equal(out, hu)
    real = cases[-1]
    assert len(cache.encode(real, level)) < real.nbytes * (0.4 if level == cache.FAST else 0.35)


def test_decode_rejects_damaged_files():
    blob = cache.encode(np.zeros((8, 8), np.int16))
    for bad in (blob[:10], blob[:-1], b"PNG" + blob[3:]):
        with pytest.raises(cache.CacheError):
            cache.decode(bad)


def _small_comp(mini_dir, tmp_path, n=12):
    data = tmp_path / "comp"
    for split in ("train", "test"):
        (data / f"stage_2_{split}").mkdir(parents=True)
        for f in sorted((mini_dir / f"stage_2_{split}").glob("*.dcm"))[:n // 2]:
            shutil.copy(f, data / f"stage_2_{split}" / f.name)
    shutil.copy(mini_dir / "stage_2_train.csv", data / "stage_2_train.csv")
    return data


def test_preprocess_resumes_and_matches_dicom(mini_dir, tmp_path, capsys):
    data = _small_comp(mini_dir, tmp_path)
    layout = Layout.of(data, tmp_path / "work")
    first = cache.preprocess(layout, workers=1)
    assert (first["cached"], first["existing"], first["skipped"]) == (12, 0, 0)
    m = meta.load_meta(layout)
    for row in m.itertuples():
        np.testing.assert_array_equal(cache.load_hu(layout, row.image_id), dicom.read_hu(data / row.path, dtype=np.int16))
    assert cache.ensure(layout) is None  # complete: nothing to do
    victim = cache.cache_path(layout, m["image_id"].iloc[3])
    victim.unlink()
    stale = victim.parent / f".{victim.name}.123.tmp"
    stale.write_bytes(b"half a file")  # what a kill mid-write could leave
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    live = victim.parent / ".other.hu.456.tmp"
    live.write_bytes(b"being written by a concurrent run")
    again = cache.ensure(layout)
    assert (again["cached"], again["existing"]) == (1, 11)
    assert victim.exists() and list(layout.cache_dir.rglob("*.tmp")) == [live]
    assert "1 new, 11 already cached" in capsys.readouterr().out


def test_unreadable_image_is_skipped_not_fatal(mini_dir, tmp_path, capsys):
    data = _small_comp(mini_dir, tmp_path, n=4)
    layout = Layout.of(data, tmp_path / "work")
    meta.build_meta(layout, workers=1)
    victim = data / meta.load_meta(layout)["path"].iloc[0]
    victim.write_bytes(victim.read_bytes()[:3000])  # truncated after the header scan
    result = cache.preprocess(layout, workers=1)
    assert (result["cached"], result["skipped"]) == (3, 1)
    assert "truncated" in capsys.readouterr().out
    skipped = pd.read_csv(layout.cache_dir / "skipped.csv")
    assert skipped["path"].tolist() == [victim.relative_to(data).as_posix()]
    assert cache.ensure(layout) is None  # a known-bad file does not trigger endless re-runs
    with pytest.raises(FileNotFoundError):
        cache.load_hu(layout, victim.stem)


def test_cli_preprocess_parallel(mini_dir, tmp_path, monkeypatch):
    data = _small_comp(mini_dir, tmp_path, n=8)
    monkeypatch.setattr(cache, "IN_PROCESS_BELOW", 0)  # force the process pool on a tiny set
    monkeypatch.setattr(cache, "CHUNK", 2)
    work = tmp_path / "work"
    assert cli.main(["preprocess", "--data", str(data), "--work", str(work), "--workers", "2"]) == 0
    layout = Layout.of(data, work)
    assert cache.cached_ids(layout) == set(meta.load_meta(layout)["image_id"])


def test_cli_preprocess_small_format(mini_dir, tmp_path):
    data = _small_comp(mini_dir, tmp_path, n=4)
    work = tmp_path / "work"
    assert cli.main(["preprocess", "--data", str(data), "--work", str(work), "--workers", "1", "--small"]) == 0
    layout = Layout.of(data, work)
    for row in meta.load_meta(layout).itertuples():
        blob = cache.cache_path(layout, row.image_id).read_bytes()
        assert blob[4] & cache.FLAG_LOW_DEFLATED and len(blob) < 0.35 * 512 * 512 * 2
        np.testing.assert_array_equal(cache.load_hu(layout, row.image_id), dicom.read_hu(data / row.path, dtype=np.int16))


def test_ensure_test_split_only(mini_dir, tmp_path):
    data = _small_comp(mini_dir, tmp_path, n=6)
    layout = Layout.of(data, tmp_path / "work")
    m = meta.build_meta(layout, workers=1)
    bad = data / m.loc[m["split"] == "train", "path"].iloc[0]
    bad.write_bytes(bad.read_bytes()[:2000])
    result = cache.ensure(layout, splits=("test",))  # what a Kaggle inference kernel needs
    assert (result["cached"], result["skipped"]) == (3, 0)
    assert cache.cached_ids(layout) == set(m.loc[m["split"] == "test", "image_id"])
    assert cache.ensure(layout, splits=("test",)) is None
    assert cache.ensure(layout)["cached"] == 2  # then the train slices; the truncated one is listed
    assert cache.ensure(layout, splits=("test",)) is None and cache.ensure(layout) is None
    cache.preprocess(layout, splits=("test",))  # a later partial run keeps the train entry in skipped.csv
    assert pd.read_csv(layout.cache_dir / "skipped.csv")["path"].tolist() == [bad.relative_to(data).as_posix()]


def test_old_cache_format_is_rewritten(mini_dir, tmp_path):
    data = _small_comp(mini_dir, tmp_path, n=2)
    layout = Layout.of(data, tmp_path / "work")
    cache.preprocess(layout, workers=1)
    image_id = meta.load_meta(layout)["image_id"].iloc[0]
    path = cache.cache_path(layout, image_id)
    path.write_bytes(b"IHU0" + path.read_bytes()[4:])  # as if written by an older version
    (layout.cache_dir / "FORMAT").write_text("IHU0\n")
    assert not cache.format_ok(layout) and cache.cached_ids(layout) == set()
    assert cache.ensure(layout)["cached"] == 2
    np.testing.assert_array_equal(cache.load_hu(layout, image_id), dicom.read_hu(data / meta.load_meta(layout)["path"].iloc[0], dtype=np.int16))
