"""HU cache: lossless codec, resumable preprocessing, freshness, skipped files, failures that stop the stage, CLI."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import struct
import time

import numpy as np
import pandas as pd
import pytest

from ich_kaggle import cli
from ich_kaggle.bench import handcodec
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Layout
from ich_kaggle.data import cache, codec, dicom, meta, pool, preprocess, synth


def test_codec_is_lossless(mini_dir):
    rng = np.random.default_rng(0)
    cases = [
        rng.integers(-1100, 3000, size=(512, 512)),
        rng.integers(-32768, 32768, size=(37, 53)),
        np.full((7, 9), -3024),
        np.array([[32767, -32768, 0]]),
        np.zeros((0, 4)),
    ]
    for path in sorted((mini_dir / "stage_2_train").glob("*.dcm"))[:5]:
        cases.append(dicom.read_hu(path, dtype=np.int16))
    for hu in cases:
        hu = hu.astype(np.int16)
        out = codec.decode(codec.encode(hu))
        assert out.dtype == np.int16 and out.shape == hu.shape
        np.testing.assert_array_equal(out, hu)
    real = cases[-1]
    # a real 512 px slice: ~232 kB of 512 (LZ4 over shuffle: 47% more than zstd for a 3.4x faster decode)
    assert len(codec.encode(real)) < real.nbytes * 0.5


def test_decode_rejects_damaged_files():
    blob = codec.encode(np.arange(64 * 64, dtype=np.int16).reshape(64, 64))
    wrong_shape = blob[:4] + (65).to_bytes(4, "little") + blob[8:]
    for bad in (blob[:10], blob[:40], blob[:-1], blob + b"\0", b"IHU2" + blob[4:], wrong_shape):
        with pytest.raises(codec.CacheError):
            codec.decode(bad)


def _small_comp(mini_dir, tmp_path, n=12):
    data = tmp_path / "comp"
    for split in ("train", "test"):
        (data / f"stage_2_{split}").mkdir(parents=True)
        for f in sorted((mini_dir / f"stage_2_{split}").glob("*.dcm"))[: n // 2]:
            shutil.copy(f, data / f"stage_2_{split}" / f.name)
    shutil.copy(mini_dir / "stage_2_train.csv", data / "stage_2_train.csv")
    return data


def _synth(tmp_path, name="comp"):
    return synth.write_competition(tmp_path / name, seed=0, studies=4, slices=4, size=32)  # 12 train + 4 test slices


def _damage_unnoticed(path):
    """Break the DICM marker in place, keeping size and mtime: meta.csv stays fresh, the cache step finds it."""
    st = path.stat()
    blob = bytearray(path.read_bytes())
    blob[128:132] = b"XXXX"
    path.write_bytes(bytes(blob))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _same_as_dicoms(layout):
    for row in meta.load_meta(layout).itertuples():
        np.testing.assert_array_equal(
            cache.load_hu(layout, row.image_id), dicom.read_hu(layout.data / row.path, dtype=np.int16)
        )


def test_preprocess_resumes_and_matches_dicom(mini_dir, tmp_path, capsys):
    data = _small_comp(mini_dir, tmp_path)
    layout = Layout.of(data, tmp_path / "work")
    first = preprocess.preprocess(layout, workers=1)
    assert (first["cached"], first["existing"], first["skipped"]) == (12, 0, 0)
    _same_as_dicoms(layout)
    assert preprocess.ensure(layout) is None  # complete: nothing to do
    m = meta.load_meta(layout)
    victim = cache.cache_path(layout, m["image_id"].iloc[3])
    victim.unlink()
    stale = victim.parent / f".{victim.name}.123.tmp"
    stale.write_bytes(b"half a file")  # what a kill mid-write could leave
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    live = victim.parent / ".other.hu.456.tmp"
    live.write_bytes(b"being written by a concurrent run")
    again = preprocess.ensure(layout)
    assert (again["cached"], again["existing"]) == (1, 11)
    assert victim.exists() and list(layout.cache_dir.rglob("*.tmp")) == [live]
    assert "1 new, 11 already cached" in capsys.readouterr().out


def test_changed_dicom_is_cached_again(tmp_path):
    data = _synth(tmp_path)
    layout = Layout.of(data, tmp_path / "work")
    preprocess.preprocess(layout, workers=1)
    m = meta.load_meta(layout)
    a, b = (data / p for p in m.loc[m["split"] == "train", "path"].iloc[:2])
    a.write_bytes(b.read_bytes())  # the file's content changes under the same name (e.g. a re-download)
    assert preprocess.ensure(layout)["cached"] == 1
    _same_as_dicoms(layout)  # the entry of `a` now holds b's pixels
    np.testing.assert_array_equal(cache.load_hu(layout, a.stem), cache.load_hu(layout, b.stem))
    assert preprocess.ensure(layout) is None


def test_unreadable_image_is_skipped_and_retried_once_changed(mini_dir, tmp_path, capsys):
    data = _small_comp(mini_dir, tmp_path, n=4)
    layout = Layout.of(data, tmp_path / "work")
    meta.build_meta(layout, workers=1)
    victim = data / meta.load_meta(layout)["path"].iloc[0]
    good = victim.read_bytes()
    _damage_unnoticed(victim)
    result = preprocess.preprocess(layout, workers=1)
    assert (result["cached"], result["skipped"]) == (3, 1)
    assert "not a DICOM" in capsys.readouterr().out
    skipped = pd.read_csv(layout.cache_skipped)
    assert skipped["path"].tolist() == [victim.relative_to(data).as_posix()]
    assert preprocess.ensure(layout) is None  # a known-bad file does not trigger endless re-runs
    with pytest.raises(FileNotFoundError):
        cache.load_hu(layout, victim.stem)
    victim.write_bytes(good)  # fixed: size and mtime change, so the next run tries it again
    assert preprocess.ensure(layout)["cached"] == 1
    assert pd.read_csv(layout.cache_skipped).empty
    _same_as_dicoms(layout)


def test_cli_preprocess_parallel(mini_dir, tmp_path, monkeypatch):
    data = _small_comp(mini_dir, tmp_path, n=8)
    monkeypatch.setattr(preprocess, "IN_PROCESS_BELOW", 0)  # force the process pool on a tiny set
    monkeypatch.setattr(preprocess, "CHUNK", 2)
    work = tmp_path / "work"
    assert cli.main(["preprocess", "--data", str(data), "--work", str(work), "--workers", "2"]) == 0
    layout = Layout.of(data, work)
    assert cache.cached_ids(layout) == set(meta.load_meta(layout)["image_id"])
    _same_as_dicoms(layout)


def test_ensure_test_split_only(mini_dir, tmp_path):
    data = _small_comp(mini_dir, tmp_path, n=6)
    layout = Layout.of(data, tmp_path / "work")
    m = meta.build_meta(layout, workers=1)
    bad = data / m.loc[m["split"] == "train", "path"].iloc[0]
    _damage_unnoticed(bad)
    result = preprocess.ensure(layout, splits=("test",))  # what a Kaggle inference kernel needs
    assert (result["cached"], result["skipped"]) == (3, 0)
    assert cache.cached_ids(layout) == set(m.loc[m["split"] == "test", "image_id"])
    assert preprocess.ensure(layout, splits=("test",)) is None
    later = preprocess.ensure(layout)
    assert (later["cached"], later["skipped"]) == (2, 1)  # then the train slices; the damaged one is listed
    assert preprocess.ensure(layout, splits=("test",)) is None and preprocess.ensure(layout) is None
    preprocess.preprocess(layout, splits=("test",))  # a later partial run keeps the train entry in skipped.csv
    assert pd.read_csv(layout.cache_skipped)["path"].tolist() == [bad.relative_to(data).as_posix()]


def test_old_cache_format_is_rebuilt_with_one_line(mini_dir, tmp_path, capsys):
    data = _small_comp(mini_dir, tmp_path, n=2)
    layout = Layout.of(data, tmp_path / "work")
    m = meta.build_meta(layout, workers=1)
    for row in m.itertuples():  # a cache as the previous version wrote it (hand-written codec, marker IHU2)
        path = cache.cache_path(layout, row.image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(handcodec.encode(dicom.read_hu(data / row.path, dtype=np.int16)))
    layout.cache_format.write_text("IHU2\n")
    assert not cache.format_ok(layout) and cache.cached_ids(layout) == set()
    capsys.readouterr()
    assert preprocess.ensure(layout)["cached"] == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "older cache format" in line]
    assert len(lines) == 1 and "IHU2" in lines[0] and codec.FORMAT in lines[0]
    assert cache.format_ok(layout)
    _same_as_dicoms(layout)


def _one_line_error(capsys, *words):
    captured = capsys.readouterr().err
    lines = [line for line in captured.splitlines() if line.startswith("error: ")]  # the rest: progress bars
    assert len(lines) == 1 and "Traceback" not in captured, captured
    err = lines[0]
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free space"), (errno.EACCES, "writable")])
def test_failed_write_stops_with_one_line_and_no_debris(tmp_path, monkeypatch, capsys, code, fix):
    data = _synth(tmp_path)
    work = tmp_path / "work"
    layout = Layout.of(data, work)
    meta.build_meta(layout, workers=1)
    real, calls = cache._write_file, []

    def failing(path, blob):  # the third write runs out of space (or permission) halfway through
        calls.append(path)
        if len(calls) >= 3:
            path.write_bytes(blob[: len(blob) // 2])
            raise OSError(code, os.strerror(code), str(path))
        real(path, blob)

    monkeypatch.setattr(cache, "_write_file", failing)
    monkeypatch.setattr(preprocess, "CHUNK", 1)
    monkeypatch.setattr(preprocess, "RECORD_EVERY_S", 0.0)  # progress recorded after every chunk, too
    assert cli.main(["preprocess", "--data", str(data), "--work", str(work), "--workers", "1"]) == 2
    _one_line_error(capsys, "cannot write", str(layout.cache_dir), os.strerror(code), fix)
    assert len(calls) == 3  # stopped at the first failure, not after trying every remaining file
    assert list(work.rglob("*.tmp")) == []
    assert pd.read_csv(layout.cache_skipped).empty  # a write failure is not a bad DICOM
    sources = pd.read_csv(layout.cache_sources)
    assert len(cache.cached_ids(layout)) == 2 and len(sources) == 2 and sources["image_id"].is_unique
    monkeypatch.setattr(cache, "_write_file", real)  # the cause is fixed: the rerun does the rest
    assert preprocess.ensure(layout)["cached"] == 14
    _same_as_dicoms(layout)


def test_read_only_work_folder_is_one_line(tmp_path, monkeypatch, capsys):
    data = _synth(tmp_path)
    work = tmp_path / "work"

    def denied(*args, dir=None, **kwargs):  # what mkstemp raises in a read-only folder (tests run as root)
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr("ich_kaggle.core.io.tempfile.mkstemp", denied)
    assert cli.main(["meta", "--data", str(data), "--work", str(work)]) == 2
    _one_line_error(capsys, "cannot write", str(work / "meta.csv"), "writable")
    assert cli.main(["preprocess", "--data", str(data), "--work", str(work)]) == 2
    _one_line_error(capsys, "cannot write", "writable")


def _die_on(victim: str):
    real = dicom.read_hu

    def read_hu(path, *args, **kwargs):
        if str(path).endswith(victim):
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        return real(path, *args, **kwargs)

    return read_hu


def test_a_killed_worker_and_a_corrupt_dicom_cost_only_their_own_file(tmp_path, monkeypatch, capsys):
    """The pool's crash policy (`data.pool`, the meta scan's too): a DICOM that does not decode is skipped with its
    reason, a worker process killed on a file costs only that file (skipped, named); the run goes on and exits 0."""
    data = _synth(tmp_path)
    work = tmp_path / "work"
    layout = Layout.of(data, work)
    m = meta.build_meta(layout, workers=1)
    victim, corrupt = m["path"].iloc[-1], m["path"].iloc[0]
    _damage_unnoticed(data / corrupt)
    monkeypatch.setattr(preprocess, "IN_PROCESS_BELOW", 0)
    monkeypatch.setattr(preprocess, "CHUNK", 2)
    # fork, so the workers inherit the patched reader that kills the worker on one file
    monkeypatch.setattr(pool, "START_METHOD", "fork")
    monkeypatch.setattr(dicom, "read_hu", _die_on(victim))
    assert cli.main(["preprocess", "--data", str(data), "--work", str(work), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"skipped {victim}: {pool.WORKER_DIED}" in printed and f"skipped {corrupt}: " in printed
    reasons = pd.read_csv(layout.cache_skipped).set_index("path")["reason"]
    assert set(reasons.index) == {victim, corrupt} and reasons[victim] == pool.WORKER_DIED
    assert "DICM" in reasons[corrupt] or "DICOM" in reasons[corrupt], reasons[corrupt]
    lost = set(m.set_index("path").loc[[victim, corrupt], "image_id"])
    assert cache.cached_ids(layout) == set(m["image_id"]) - lost  # every other slice cached
    monkeypatch.undo()
    result = preprocess.preprocess(layout, workers=1)  # `make preprocess` retries the skipped files
    assert (result["cached"], result["skipped"]) == (1, 1)
    assert pd.read_csv(layout.cache_skipped)["path"].tolist() == [corrupt]


def test_missing_dicoms_folder_keeps_existing_cache(tmp_path):
    data = _synth(tmp_path)
    layout = Layout.of(data, tmp_path / "work")
    preprocess.preprocess(layout, workers=1)
    moved = Layout(data=tmp_path / "elsewhere", work=layout.work)  # the work folder alone, e.g. copied to a GPU box
    (tmp_path / "elsewhere").mkdir()
    assert preprocess.ensure(moved) is None and len(meta.load_meta(moved)) == 16
    with pytest.raises(UserError, match="neither stage_2_train"):
        preprocess.preprocess(moved)


def test_a_cache_file_of_the_previous_blosc2_format_is_not_misread():
    """IHU3 (blosc2 zstd-1 over shuffle+bytedelta) files are another format: refused, so the cache is rebuilt."""
    import blosc2

    hu = np.arange(-1024, 1024, dtype=np.int16).reshape(32, 64)
    cp = blosc2.CParams(
        codec=blosc2.Codec.ZSTD,
        clevel=1,
        typesize=2,
        nthreads=1,
        filters=[blosc2.Filter.SHUFFLE, blosc2.Filter.BYTEDELTA],
        filters_meta=[0, 0],
    )
    old = struct.pack("<4sII", b"IHU3", 32, 64) + blosc2.compress2(hu, cparams=cp)
    with pytest.raises(codec.CacheError, match="version"):
        codec.decode(old)
    assert codec.MAGIC != b"IHU3" and not codec.FORMAT.startswith("IHU3")
    np.testing.assert_array_equal(codec.decode(codec.encode(hu)), hu)
