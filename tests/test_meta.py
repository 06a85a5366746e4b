"""Header scan -> meta.csv on the real mini set, skipped files, and slice ordering (also at competition scale)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
import warnings

import numpy as np
import pandas as pd
import pydicom
import pytest

from conftest import shared_file
from dicom_factory import write_ct
from ich_kaggle.core.labels import LABELS
from ich_kaggle import cli
from ich_kaggle.data import dicom, meta
from ich_kaggle.core import labels
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Layout


@pytest.fixture(scope="module")
def mini_meta(mini_dir, tmp_path_factory):
    layout = Layout.of(mini_dir, tmp_path_factory.mktemp("work"))
    return layout, meta.build_meta(layout, workers=1)


def test_mini_meta_counts_and_labels(mini_meta):
    layout, m = mini_meta
    assert set(meta.COLUMNS) <= set(m.columns)
    assert (m["split"] == "train").sum() == 616 and (m["split"] == "test").sum() == 43
    assert pd.read_csv(layout.skipped_csv).empty
    assert m["image_id"].is_unique and m["path"].str.match(r"stage_2_(train|test)/ID_[0-9a-f]+\.dcm").all()
    joined = m.merge(labels.read_labels(layout.train_csv), on="image_id")
    assert len(joined) == 616
    assert joined[list(LABELS)].sum().to_dict() == {
        "any": 51,
        "epidural": 0,
        "intraparenchymal": 35,
        "intraventricular": 3,
        "subarachnoid": 14,
        "subdural": 6,
    }
    assert set(m["bits_stored"]) == {12, 16} and set(m["transfer_syntax"]) == {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
    }
    assert m.loc[m["study_id"] == "ID_1f6d1e8aeb", "series_len"].tolist() == [32] * 32
    again = meta.load_meta(layout)  # reads the CSV back with the same content
    pd.testing.assert_frame_equal(again[["image_id", "slice_rank"]], m[["image_id", "slice_rank"]])


def test_series_order_is_complete_and_sorted(mini_meta):
    _, m = mini_meta
    for _, s in m.groupby("series_id"):
        assert sorted(s["slice_rank"]) == list(range(len(s))) and (s["series_len"] == len(s)).all()
        ordered = s.sort_values("slice_rank")
        assert ordered["z"].is_monotonic_increasing
    dup = m[m["study_id"] == "ID_4fef99f0df"].sort_values("slice_rank")
    assert dup["z"].duplicated().any()  # the real duplicate-position study
    ties = dup[dup["z"].duplicated(keep=False)]
    for _, group in ties.groupby("z"):  # equal z: ordered by image_id (no InstanceNumber in RSNA files)
        assert group["image_id"].is_monotonic_increasing


def test_every_mini_dicom_reads_like_pydicom(mini_dir, mini_meta):
    _, m = mini_meta
    for rel in m["path"]:
        path = mini_dir / rel
        hu = dicom.read_hu(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
        ref = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu.shape == (ds.Rows, ds.Columns)
        np.testing.assert_array_equal(hu, ref.astype(np.float32), err_msg=rel)
        assert -3100 < hu.min() and hu.max() < 4000


def test_cli_meta_lists_skipped_files(mini_dir, tmp_path, capsys):
    data = tmp_path / "comp"
    (data / "stage_2_train").mkdir(parents=True)
    (data / "stage_2_test").mkdir()
    good = sorted((mini_dir / "stage_2_train").glob("*.dcm"))[:3]
    for f in good:
        shutil.copy(f, data / "stage_2_train" / f.name)
    blob = good[0].read_bytes()
    (data / "stage_2_train" / "ID_6431af929.dcm").write_bytes(blob[:4000])  # like the competition's broken file
    (data / "stage_2_test" / "ID_notdicom.dcm").write_text("hello")
    write_ct(data / "stage_2_test" / "ID_rgb.dcm", np.zeros((4, 4, 3), np.uint8), samples=3, photometric="RGB")
    write_ct(data / "stage_2_test" / "ID_nopix.dcm", None)
    write_ct(data / "stage_2_test" / "ID_nopatient.dcm", np.zeros((4, 4), np.int16), patient=None)
    out = tmp_path / "m.csv"
    assert cli.main(["meta", "--data", str(data), "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name, words in [
        ("ID_6431af929", "truncated"),
        ("ID_notdicom", "not a DICOM"),
        ("ID_rgb", "colour"),
        ("ID_nopix", "no PixelData"),
        ("ID_nopatient", "missing tag PatientID"),
    ]:
        assert any(name in line and words in line for line in printed.splitlines()), (name, printed)
    m = meta.read_meta(out)
    assert sorted(m["image_id"]) == sorted(f.stem for f in good)
    skipped = pd.read_csv(tmp_path / "m_skipped.csv")
    assert len(skipped) == 5 and list(skipped.columns) == ["path", "reason"]


def test_missing_data_folder_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        meta.build_meta(Layout.of(tmp_path / "nope", tmp_path / "w"))
    assert cli.main(["meta", "--data", str(tmp_path / "nope"), "--work", str(tmp_path / "w")]) == 2


def _frame(rows):
    cols = ["image_id", "series_id", "ipp_x", "ipp_y", "ipp_z", "instance_number"] + [f"iop{i}" for i in range(6)]
    return pd.DataFrame(rows, columns=cols).assign(study_id="s", patient_id="p")


def test_order_slices_fallbacks_and_ties():
    axial = [1, 0, 0, 0, 1, 0]
    nan6 = [np.nan] * 6
    df = _frame(
        [
            ["ID_c", "A", 0, 0, 5.0, 3] + axial,
            ["ID_b", "A", 0, 0, 5.0, 1] + axial,  # same z: InstanceNumber decides
            ["ID_a", "A", 0, 0, 5.0, np.nan] + axial,  # same z, no InstanceNumber: after those that have one
            ["ID_d", "A", 0, 0, -2.0, 9] + axial,
            ["ID_e", "B", 0, 0, 10.0, 1] + nan6,  # no orientation: IPP z
            ["ID_f", "B", 0, 0, 2.0, 2] + nan6,
            ["ID_g", "C", np.nan, np.nan, np.nan, 2] + nan6,  # no position: InstanceNumber
            ["ID_h", "C", np.nan, np.nan, np.nan, 1] + nan6,
            ["ID_j", "D", np.nan, np.nan, np.nan, np.nan] + nan6,  # nothing at all: image_id
            ["ID_i", "D", np.nan, np.nan, np.nan, np.nan] + nan6,
        ]
    )
    out = meta.order_slices(df)
    order = {s: g.sort_values("slice_rank")["image_id"].tolist() for s, g in out.groupby("series_id")}
    assert order == {
        "A": ["ID_d", "ID_b", "ID_c", "ID_a"],
        "B": ["ID_f", "ID_e"],
        "C": ["ID_h", "ID_g"],
        "D": ["ID_i", "ID_j"],
    }
    assert out.groupby("series_id")["series_len"].first().to_dict() == {"A": 4, "B": 2, "C": 2, "D": 2}
    shuffled = meta.order_slices(df.sample(frac=1, random_state=3))
    pd.testing.assert_frame_equal(shuffled, out)  # independent of input order


def test_tilted_gantry_uses_the_normal():
    t = np.deg2rad(20)
    iop = [1, 0, 0, 0, np.cos(t), -np.sin(t)]
    normal = np.cross(iop[:3], iop[3:])
    # positions along the normal, with a y drift that would mislead a sort on IPP[2] alone
    rows = [[f"ID_{i}", "S", 0.0, 30.0 - 9 * i, 0.0, np.nan] + iop for i in range(4)]
    for i, r in enumerate(rows):
        r[2:5] = list(np.array([0, 30.0 - 9 * i, 0]) + 5.0 * i * normal)
    out = meta.order_slices(_frame(rows))
    np.testing.assert_allclose(
        out.sort_values("slice_rank")["z"],
        5.0 * np.arange(4) + np.dot([0, 30.0, 0], normal) - 9 * np.arange(4) * normal[1],
        atol=1e-9,
    )
    assert out.sort_values("slice_rank")["image_id"].tolist() == ["ID_0", "ID_1", "ID_2", "ID_3"]


@pytest.mark.slow
def test_series_order_at_competition_scale():
    headers = pd.read_csv(shared_file("stage_1_test_dicom_headers.csv.gz"))
    out = meta.frame_from_headers(headers)
    assert len(out) == 78545 and out["image_id"].is_unique
    g = out.groupby("series_id")
    assert (g["slice_rank"].min() == 0).all() and (g["slice_rank"].max() == g.size() - 1).all()
    assert (g["slice_rank"].nunique() == g.size()).all() and (
        out["series_len"] == g["image_id"].transform("size")
    ).all()
    assert out["z"].notna().all()
    ranked = out.sort_values(["series_id", "slice_rank"])
    assert (ranked.groupby("series_id")["z"].diff().dropna() >= 0).all()
    # spot-check z = IPP . (row x col) against a direct computation from the raw strings
    for _, h in headers.sample(50, random_state=0).iterrows():
        ipp = np.array(eval(h["ImagePositionPatient"]), dtype=float)  # noqa: S307 - test data written by pydicom
        iop = np.array(eval(h["ImageOrientationPatient"]), dtype=float)  # noqa: S307
        z = out.loc[out["image_id"] == h["SOPInstanceUID"], "z"].item()
        assert z == pytest.approx(np.dot(ipp, np.cross(iop[:3], iop[3:])))


def test_parallel_scan_equals_sequential(mini_dir, mini_meta, tmp_path, monkeypatch):
    monkeypatch.setattr(meta, "IN_PROCESS_BELOW", 0)  # force the process pool on the small set
    monkeypatch.setattr(meta, "CHUNK", 64)
    parallel = meta.build_meta(Layout.of(mini_dir, tmp_path / "w"), workers=2)
    pd.testing.assert_frame_equal(parallel, mini_meta[1])


def _items(layout: Layout) -> list[tuple[str, str]]:
    """(path, split) of every DICOM of the layout, as the meta scan lists them."""
    from ich_kaggle.data import inputs

    return list(inputs.list_inputs(layout)[0][["path", "split"]].itertuples(index=False, name=None))


def test_scan_survives_a_dying_worker_and_a_reader_bug(mini_dir, tmp_path, monkeypatch):
    import crash_reader

    monkeypatch.setattr(meta, "IN_PROCESS_BELOW", 0)  # the process pool, on a small set
    monkeypatch.setattr(meta, "CHUNK", 3)
    data = tmp_path / "comp"
    (data / "stage_2_train").mkdir(parents=True)
    real = sorted((mini_dir / "stage_2_train").glob("*.dcm"))[:5]
    for f in real:
        shutil.copy(f, data / "stage_2_train" / f.name)
    (data / "stage_2_train" / "ID_crash.dcm").write_bytes(real[0].read_bytes())
    layout = Layout.of(data, tmp_path / "w")
    m, skipped = meta.scan_files(data, _items(layout), workers=2, reader=crash_reader.scan_or_die)
    assert skipped.values.tolist() == [["stage_2_train/ID_crash.dcm", meta.WORKER_DIED]]  # only the culprit lost
    assert sorted(m["image_id"]) == sorted(f.stem for f in real)
    (data / "stage_2_train" / "ID_crash.dcm").rename(data / "stage_2_train" / "ID_bug.dcm")
    m, skipped = meta.scan_files(data, _items(layout), workers=1, reader=crash_reader.scan_or_raise)
    assert skipped.values.tolist() == [["stage_2_train/ID_bug.dcm", "reader error (RuntimeError: a reader bug)"]]
    assert len(m) == len(real)


def test_scan_of_odd_bytes_lists_only_what_the_cache_reads(mini_dir, tmp_path):
    from dicom_mutations import mutants

    data = tmp_path / "comp"
    (data / "stage_2_train").mkdir(parents=True)
    odd = [d for _, d in mutants([sorted((mini_dir / "stage_2_train").glob("*.dcm"))[0].read_bytes()], 3, seed=1)]
    for i, blob in enumerate(odd):
        (data / "stage_2_train" / f"ID_odd{i:02d}.dcm").write_bytes(blob)
    m, skipped = meta.scan_files(data, _items(Layout.of(data, tmp_path / "w")), workers=1)
    assert len(m) + len(skipped) == len(odd) and len(m) >= 10 and len(skipped) >= 10
    assert not skipped["reason"].str.startswith("reader error").any(), skipped
    for path in m["path"]:  # what meta lists, the cache step reads
        assert dicom.read_hu(data / path, dtype=np.int16).ndim == 2
    for path, reason in skipped.itertuples(index=False):
        if not reason.startswith("missing tag"):  # no patient or series: a readable image that meta cannot place
            with pytest.raises(dicom.DicomError):
                dicom.read_hu(data / path, dtype=np.int16)


def _synth(tmp_path, name="comp"):
    from ich_kaggle.data import synth

    return synth.write_competition(tmp_path / name, seed=0, studies=4, slices=4, size=32)  # 12 train + 4 test slices


def test_meta_rescans_only_added_removed_and_changed_dicoms(tmp_path, monkeypatch, capsys):
    data = _synth(tmp_path)
    layout = Layout.of(data, tmp_path / "work")
    first = meta.build_meta(layout, workers=1)
    train = first.loc[first["split"] == "train", "path"].tolist()
    test = first.loc[first["split"] == "test", "path"].tolist()
    shutil.copy(data / test[0], data / "stage_2_test" / "ID_added0000.dcm")  # a test DICOM added later
    (data / train[0]).unlink()  # one removed
    changed = data / train[1]
    changed.write_bytes(changed.read_bytes()[:300])  # one damaged: now a skipped file, not a meta row
    scanned = []
    real_scan = dicom.scan
    monkeypatch.setattr(dicom, "scan", lambda p: scanned.append(p) or real_scan(p))
    m = meta.load_meta(layout)
    assert sorted(os.path.basename(p) for p in scanned) == sorted(["ID_added0000.dcm", changed.name])
    assert "1 DICOM(s) added, 1 changed, 1 removed" in capsys.readouterr().out
    assert "ID_added0000" in set(m["image_id"]) and train[0] not in set(m["path"]) and train[1] not in set(m["path"])
    assert pd.read_csv(layout.skipped_csv)["path"].tolist() == [train[1]]
    fresh = Layout.of(data, tmp_path / "fresh")
    meta.build_meta(fresh, workers=1)  # the same file as a scan from scratch
    pd.testing.assert_frame_equal(meta.read_meta(layout.meta_csv), meta.read_meta(fresh.meta_csv))
    scanned.clear()
    assert meta.load_meta(layout) is not None and scanned == []  # fresh: nothing scanned again
    shutil.copy(data / train[2], changed)  # the damaged file replaced: retried, listed again
    assert changed.stem in set(meta.load_meta(layout)["image_id"]) and pd.read_csv(layout.skipped_csv).empty


def test_symlink_loop_does_not_abort_the_scan(tmp_path, capsys):
    data = _synth(tmp_path)
    train = data / "stage_2_train"
    os.symlink(train / "ID_loop_b.dcm", train / "ID_loop_a.dcm")
    os.symlink(train / "ID_loop_a.dcm", train / "ID_loop_b.dcm")
    os.symlink(train / "ID_gone.dcm", train / "ID_dangling.dcm")
    assert cli.main(["meta", "--data", str(data), "--work", str(tmp_path / "work")]) == 0
    layout = Layout.of(data, tmp_path / "work")
    assert len(meta.load_meta(layout)) == 16
    skipped = pd.read_csv(layout.skipped_csv).set_index("path")["reason"]
    assert (
        "symbolic links" in skipped["stage_2_train/ID_loop_a.dcm"]
        and "symbolic links" in skipped["stage_2_train/ID_loop_b.dcm"]
    )
    assert "No such file" in skipped["stage_2_train/ID_dangling.dcm"]


def test_work_folder_is_keyed_by_the_resolved_path(tmp_path, monkeypatch, capsys):
    from ich_kaggle.data import cache

    monkeypatch.chdir(tmp_path)
    a = synth_a = _synth(tmp_path / "a", "synth")
    b = _synth(tmp_path / "b", "synth")
    (b / "stage_2_train" / sorted(os.listdir(b / "stage_2_train"))[0]).unlink()  # b differs from a
    la, lb = Layout.of(a), Layout.of(b)
    assert la.work != lb.work and la.work.parent == lb.work.parent == Path("work")
    assert la.work.name.startswith("synth-") and lb.work.name.startswith("synth-")
    os.symlink(a, tmp_path / "link")
    assert Layout.of(tmp_path / "link").work == Layout.of(Path("a") / "synth").work == la.work  # same folder, same work
    for data in (synth_a, b):  # the same stages on two folders of one name, default work folders
        assert cli.main(["preprocess", "--data", str(data), "--workers", "1"]) == 0
    assert len(meta.load_meta(la)) == 16 and len(meta.load_meta(lb)) == 15
    assert pd.read_csv(lb.cache_skipped).empty and len(cache.cached_ids(lb)) == 15 and len(cache.cached_ids(la)) == 16
