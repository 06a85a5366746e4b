"""The synthetic competition: files read back through the toolkit's own DICOM reader with the intended HU, labels match
the drawn lesions, series geometry is consistent, test labels stay out of training, it is deterministic and
learnable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ich_kaggle.core.labels import LABELS
from ich_kaggle.core import metrics
from ich_kaggle.data import dicom, synth
from ich_kaggle.core.labels import read_labels
from ich_kaggle.data.phantom import SUBTYPES
from ich_kaggle.core.layout import Layout

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(seed=5, studies=20, slices=12, size=64)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return synth.write_competition(tmp_path_factory.mktemp("small") / "comp", **SMALL)


@pytest.fixture(scope="module")
def truth():
    """Ground truth arrays straight from the generator, before anything is written."""
    return list(synth.generate(**SMALL))


def _path(data: Path, study: synth.Study, image_id: str) -> Path:
    return data / ("stage_2_train" if study.split == "train" else "stage_2_test") / f"{image_id}.dcm"


def test_every_file_reads_back_with_the_intended_hu(small, truth):
    seen = {"signed16": 0, "unsigned12": 0, "corrupt12": 0}
    syntaxes = set()
    for study, r in truth:
        for k, image_id in enumerate(study.image_ids):
            path = _path(small, study, image_id)
            np.testing.assert_array_equal(
                dicom.read_hu(path, dtype=np.int16), r.hu[k], err_msg=f"{path} ({study.variant})"
            )
        header = dicom.read_header(_path(small, study, study.image_ids[0]))
        bits, rep, intercept = synth.VARIANTS[study.variant]
        assert (header["BitsStored"], header["PixelRepresentation"], header["RescaleIntercept"]) == (
            bits,
            rep,
            intercept,
        )
        assert header["Modality"] == "CT" and header["SOPInstanceUID"] == study.image_ids[0]
        assert header["PatientID"].startswith("ID_") and len(header["PatientID"]) == 11
        assert (
            len(header["StudyInstanceUID"]) == len(header["SeriesInstanceUID"]) == 13 and len(study.image_ids[0]) == 12
        )
        syntaxes.add(header["TransferSyntaxUID"])
        seen[study.variant] += 1
        if study.variant == "corrupt12":  # the fix matters: without it, brain and air would read as nonsense
            px, h = dicom.read_pixels(_path(small, study, study.image_ids[0]))
            naive = px.astype(np.float32) * h["RescaleSlope"] + h["RescaleIntercept"]
            assert h["RescaleIntercept"] > -100 and not np.array_equal(naive, r.hu[0])
    assert all(seen.values()), seen
    assert syntaxes == {dicom.IMPLICIT_LE, dicom.EXPLICIT_LE}
    # realistic tissue values: air, brain, bone
    hu = np.concatenate([r.hu.ravel() for _, r in truth])
    assert hu.min() == -1000 and np.percentile(hu, 99.9) > 1000
    brain = np.concatenate([r.hu[r.regions["brain"] & ~r.regions["ventricles"]] for _, r in truth])
    assert 25 <= np.median(brain) <= 40


def test_pydicom_reads_the_files_too(small, truth):
    import pydicom

    study, r = truth[0]
    ds = pydicom.dcmread(_path(small, study, study.image_ids[3]))
    assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
    assert ds.Rows == ds.Columns == SMALL["size"] and len(ds.PixelSpacing) == 2
    assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
    assert ds.pixel_array.shape == (SMALL["size"],) * 2


def test_labels_agree_with_the_drawn_lesions(small, truth):
    train = read_labels(small / "stage_2_train.csv").set_index("image_id")
    test = read_labels(small / "stage_2_test_labels.csv").set_index("image_id")
    studies_with = {k: 0 for k in SUBTYPES}
    for study, r in truth:
        table = train if study.split == "train" else test
        np.testing.assert_array_equal(table.loc[study.image_ids, list(LABELS)].to_numpy(), r.labels)
        np.testing.assert_array_equal(r.labels[:, 0], r.labels[:, 1:].max(axis=1))  # any = union
        assert set(r.masks) == {les.kind for les in study.lesions}
        for kind, mask in r.masks.items():
            j = LABELS.index(kind)
            np.testing.assert_array_equal(r.labels[:, j], mask.any(axis=(1, 2)))  # positive exactly where drawn
            runs = np.flatnonzero(np.diff(np.r_[0, r.labels[:, j], 0]))
            assert len(runs) == 2, f"{kind} lesion should cover one contiguous run of slices"
            studies_with[kind] += 1
            brain, skull, vent, csf = (r.regions[k] for k in ("brain", "skull", "ventricles", "csf_space"))
            assert not (mask & skull).any() and (mask <= brain).all()
            touches_skull = (_dilate(mask) & skull).any()
            if kind in ("epidural", "subdural"):
                assert touches_skull, kind  # extra-axial: against the inner table
            if kind == "intraparenchymal":
                assert not touches_skull and not (mask & vent).any()
            if kind == "intraventricular":
                assert (mask <= vent).all()
            if kind == "subarachnoid":
                assert (mask <= csf).all()  # blood in sulci, convexity or cisterns
            # blood density (50-90 HU before blur and noise) in the lesion's interior
            inner = mask & ~_dilate(~mask)
            if inner.sum() > 20:
                assert 45 <= np.median(r.hu[inner]) <= 95, kind
    assert all(v >= 1 for v in studies_with.values()), studies_with


def _dilate(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[:, 1:, :] |= m[:, :-1, :]
    out[:, :-1, :] |= m[:, 1:, :]
    out[:, :, 1:] |= m[:, :, :-1]
    out[:, :, :-1] |= m[:, :, 1:]
    return out


def test_series_positions_are_consistent(small, truth, tmp_path):
    from ich_kaggle.data import meta

    frame = meta.build_meta(Layout.of(small, tmp_path / "work"), workers=1).set_index("image_id")
    tilted = 0
    for study, r in truth:
        rows = frame.loc[study.image_ids]
        np.testing.assert_array_equal(
            rows["slice_rank"].to_numpy(), np.arange(len(study.image_ids))
        )  # order from positions
        z = rows["z"].to_numpy()
        assert (np.diff(z) > 0).all()
        np.testing.assert_allclose(np.diff(z), study.geometry.dz, atol=2e-5)  # constant spacing along the normal
        assert rows["patient_id"].nunique() == rows["series_id"].nunique() == 1
        if study.geometry.tilt_deg:
            tilted += 1
            assert not np.allclose(z, rows["ipp_z"].to_numpy(), atol=1.0)  # z along the normal differs from IPP[2]
            np.testing.assert_allclose(
                np.diff(rows["ipp_z"].to_numpy()),
                study.geometry.dz * np.cos(np.deg2rad(study.geometry.tilt_deg)),
                atol=2e-5,
            )
    assert tilted >= 1
    # files are on disk in random order: their names do not follow the slice order
    assert any(sorted(s.image_ids) != s.image_ids for s, _ in truth)


def test_competition_layout_and_splits(small, truth):
    train_files = {p.stem for p in (small / "stage_2_train").glob("*.dcm")}
    test_files = {p.stem for p in (small / "stage_2_test").glob("*.dcm")}
    raw_train = pd.read_csv(small / "stage_2_train.csv")
    assert list(raw_train.columns) == ["ID", "Label"] and raw_train["ID"].duplicated().sum() == 6  # like the real file
    train_ids = set(read_labels(small / "stage_2_train.csv")["image_id"])
    sample = pd.read_csv(small / "stage_2_sample_submission.csv")
    sample_ids = set(metrics.split_ids(sample["ID"])[0])
    test_label_ids = set(read_labels(small / "stage_2_test_labels.csv")["image_id"])
    assert train_ids == train_files and sample_ids == test_files == test_label_ids
    assert not train_ids & test_files  # test labels never reach stage_2_train.csv
    assert (sample["Label"] == 0.5).all()
    assert [i.rsplit("_", 1)[1] for i in sample["ID"][:6]] == list(synth.SAMPLE_ORDER)
    from ich_kaggle.submit.stage import validate_file

    assert validate_file(small / "stage_2_sample_submission.csv", small / "stage_2_sample_submission.csv") == []
    # patients: disjoint between train and test, some with two studies
    split_of = pd.DataFrame(
        [(s.patient_id, s.study_id, s.split) for s, _ in truth], columns=["patient", "study", "split"]
    )
    assert split_of.groupby("patient")["split"].nunique().max() == 1
    assert split_of.groupby("patient")["study"].nunique().max() == 2
    n = SMALL["slices"]
    assert len(train_files) + len(test_files) == SMALL["studies"] * n


def test_deterministic_for_a_seed(tmp_path, small):
    args = dict(SMALL, studies=4, slices=3)
    a = synth.write_competition(tmp_path / "a", **args)
    b = synth.write_competition(tmp_path / "b", **args)
    c = synth.write_competition(tmp_path / "c", **dict(args, seed=6))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "stage_2_train.csv").read_bytes() != (c / "stage_2_train.csv").read_bytes()


def test_cli_rerun_is_instant_and_foreign_folders_are_safe(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "ich_kaggle",
        "synth",
        "--out",
        str(tmp_path / "s"),
        "--studies",
        "3",
        "--slices",
        "2",
        "--size",
        "32",
    ]
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).returncode == 0
    stamp = (tmp_path / "s" / "stage_2_train.csv").stat().st_mtime_ns
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).returncode == 0
    assert (tmp_path / "s" / "stage_2_train.csv").stat().st_mtime_ns == stamp  # same parameters: nothing rewritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    out = subprocess.run(cmd[:-8] + ["--out", str(tmp_path / "mine")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "not written by `synth`" in out.stderr and out.stderr.count("\n") == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_preview_png(small, tmp_path):
    out = synth.preview_png(small, tmp_path / "preview.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def _features(data: Path, ids: list[str], folder: str) -> np.ndarray:
    """Per-window histograms of each slice's head pixels: what a model sees, without any learning of shapes."""
    windows = [(40, 80), (80, 200)]
    out = []
    for image_id in ids:
        hu = dicom.read_hu(data / folder / f"{image_id}.dcm")
        head = hu[(hu > 0) & (hu < 200)]
        feats = [np.log1p(head.size)]
        for c, w in windows:
            v = np.clip((head - (c - w / 2)) / w, 0, 1)
            hist = np.histogram(v, bins=16, range=(0, 1))[0]
            feats.extend(np.log1p(hist))
        out.append(feats)
    return np.asarray(out, np.float64)


def test_default_competition_is_sized_and_learnable(synth_dir):
    """Defaults: ~1,500 train + ~300 test slices at 128 px, ~40 % bleeding studies, every subtype in >= 5 studies;
    a logistic regression on window histograms beats the prior-only log loss on the held-out test labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train = read_labels(synth_dir / "stage_2_train.csv")
    test = read_labels(synth_dir / "stage_2_test_labels.csv")
    assert len(train) == 1500 and len(test) == 300
    assert dicom.read_hu(synth_dir / "stage_2_train" / f"{train['image_id'][0]}.dcm").shape == (128, 128)
    studies = synth.plan(0)
    per_study = pd.concat([train, test]).set_index("image_id")
    positive = pd.DataFrame([per_study.loc[s.image_ids, list(LABELS)].max() for s in studies])
    assert 0.35 <= positive["any"].mean() <= 0.5
    assert (positive[list(SUBTYPES)].sum() >= 5).all(), positive.sum()
    assert 0.08 <= train["any"].mean() <= 0.25  # slice prevalence near the real ~14 %
    # 3-D lesions persist over adjacent slices (one lesion per subtype and study)
    counts = pd.DataFrame([per_study.loc[s.image_ids, list(SUBTYPES)].sum() for s in studies])
    spans = counts.to_numpy()[counts.to_numpy() > 0]
    assert (spans >= 2).all(), np.sort(spans)[:10]

    x_train = _features(synth_dir, train["image_id"].tolist(), "stage_2_train")
    x_test = _features(synth_dir, test["image_id"].tolist(), "stage_2_test")
    scaler = StandardScaler().fit(x_train)
    pred = np.zeros((len(test), len(LABELS)))
    for j, label in enumerate(LABELS):
        model = LogisticRegression(C=0.3, max_iter=2000).fit(scaler.transform(x_train), train[label])
        pred[:, j] = model.predict_proba(scaler.transform(x_test))[:, 1]
    y = test[list(LABELS)].to_numpy()
    prior = metrics.prior_log_loss(train, test)
    model_loss = metrics.weighted_log_loss(y, pred)
    print(f"\nsynthetic test: prior-only weighted log loss {prior:.4f}, histogram logistic regression {model_loss:.4f}")
    assert model_loss < 0.8 * prior
