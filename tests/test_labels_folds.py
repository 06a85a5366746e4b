"""Label parsing (mini set, bad files, competition scale) and patient-grouped balanced folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import shared_file
from ich_kaggle.core.labels import LABELS
from ich_kaggle import cli
from ich_kaggle.data import folds, meta
from ich_kaggle.core import labels
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Layout

MINI_COUNTS = {
    "any": 51,
    "epidural": 0,
    "intraparenchymal": 35,
    "intraventricular": 3,
    "subarachnoid": 14,
    "subdural": 6,
}


def test_mini_labels(mini_dir):
    wide = labels.read_labels(mini_dir / "stage_2_train.csv")
    assert list(wide.columns) == ["image_id", *LABELS] and len(wide) == 616 and wide["image_id"].is_unique
    assert all(wide[label].dtype == np.int8 for label in LABELS)
    assert wide[list(LABELS)].sum().to_dict() == MINI_COUNTS
    assert ((wide[list(LABELS[1:])].max(axis=1)) <= wide["any"]).all()


def _write(tmp_path, text):
    path = tmp_path / "stage_2_train.csv"
    path.write_text(text)
    return path


GOOD = "".join(f"ID_abc_{label},{int(label in ('any', 'subdural'))}\n" for label in LABELS)


def test_duplicates_and_roundtrip(tmp_path):
    path = _write(
        tmp_path,
        "ID,Label\n"
        + GOOD
        + GOOD.splitlines(keepends=True)[2]
        + "".join(f"ID_def_{label},0\n" for label in reversed(LABELS)),
    )
    wide = labels.read_labels(path)
    assert wide["image_id"].tolist() == ["ID_abc", "ID_def"]
    assert wide.iloc[0][list(LABELS)].tolist() == [1, 0, 0, 0, 0, 1] and wide.iloc[1][list(LABELS)].sum() == 0
    labels.write_labels(wide, tmp_path / "again.csv")
    pd.testing.assert_frame_equal(labels.read_labels(tmp_path / "again.csv"), wide)


@pytest.mark.parametrize(
    "text,words",
    [
        (
            "Image,Label\nID_abc_any,1\n",
            "expected the header ID,Label (the competition's long format), found Image,Label",
        ),
        ("ID,Label\n", "has no rows"),
        ("ID,Label\n" + GOOD.replace("ID_abc_epidural,0", "ID_abc_epidural,2"), "Label must be 0 or 1"),
        (
            "ID,Label\n" + GOOD.replace("ID_abc_epidural,0", "ID_abc_epidural,"),
            "Label must be 0 or 1; row 3 (ID ID_abc_epidural) has an empty cell",
        ),
        ("ID,Label\n" + GOOD.replace("epidural", "epiduralx"), "does not end in one of"),
        ("ID,Label\n" + GOOD.replace("ID_abc_epidural,0\n", ""), "has no row for subtype epidural"),
        ("ID,Label\n" + GOOD + "ID_abc_any,0\n", "appears twice with different values"),
    ],
)
def test_bad_label_files(tmp_path, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as err:
        labels.read_labels(path)
    message = str(err.value)
    assert words in message and str(path) in message and "\n" not in message


def test_binary_label_file(tmp_path):
    path = tmp_path / "stage_2_train.csv"
    path.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(UserError, match="stage_2_train.csv"):
        labels.read_labels(path)


def test_missing_label_file(tmp_path):
    with pytest.raises(UserError, match="stage_2_train.csv"):
        labels.read_labels(tmp_path / "stage_2_train.csv")


@pytest.mark.slow
def test_labels_at_competition_scale(tmp_path):
    wide = pd.read_csv(shared_file("stage_1_train_labels_wide.csv.gz")).rename(columns={"Image": "image_id"})
    wide = wide[["image_id", *LABELS]].astype({label: np.int8 for label in LABELS})
    assert len(wide) == 674258
    long = labels.to_long(wide)
    assert len(long) == 6 * 674258
    long = pd.concat([long, long.sample(5000, random_state=0)], ignore_index=True)  # duplicate rows, as in stage 2
    path = tmp_path / "stage_2_train.csv"
    long.to_csv(path, index=False)
    back = labels.read_labels(path)
    pd.testing.assert_frame_equal(back, wide.reset_index(drop=True))


def _check_folds(frame: pd.DataFrame, fold: pd.Series, k: int) -> None:
    assert set(fold.unique()) == set(range(k))
    assert (frame.assign(fold=fold).groupby("patient_id")["fold"].nunique() == 1).all()  # no patient in two folds
    for label in LABELS:
        carriers = frame.loc[frame[label] == 1, "patient_id"].nunique()
        if carriers >= k:
            per_fold = frame.assign(fold=fold).groupby("fold")[label].sum()
            assert (per_fold.reindex(range(k), fill_value=0) > 0).all(), (label, per_fold.to_dict())


def test_mini_folds_cli_and_determinism(mini_dir, tmp_path, capsys):
    work = tmp_path / "w"
    out = tmp_path / "f.csv"
    assert (
        cli.main(["folds", "--data", str(mini_dir), "--work", str(work), "--out", str(out), "--k", "3", "--seed", "7"])
        == 0
    )
    assert "616 labelled train slices of 18 patients in 3 folds" in capsys.readouterr().out
    f = folds.read_folds(out)
    assert list(f.columns) == folds.FOLD_COLUMNS and len(f) == 616
    _check_folds(f, f["fold"], 3)
    assert (work / "meta.csv").exists()  # folds scanned the headers it needed
    layout = Layout.of(mini_dir, work)
    again = folds.build_folds(layout, k=3, seed=7)
    pd.testing.assert_frame_equal(again, f)
    other = folds.assign_folds(f, k=3, seed=8)
    assert not other.equals(f["fold"].rename("fold"))  # the seed matters


def test_load_folds_rebuilds_when_stale_and_stops_on_another_k(mini_dir, tmp_path):
    layout = Layout.of(mini_dir, tmp_path / "w")
    f5 = folds.load_folds(layout)
    assert f5["fold"].nunique() == 5
    stamp = layout.folds_csv.stat().st_mtime_ns
    assert folds.load_folds(layout).equals(f5) and layout.folds_csv.stat().st_mtime_ns == stamp  # cached
    with pytest.raises(UserError, match=r"was made with k=5, seed=42 but this config asks for cv.k=4"):
        folds.load_folds(layout, k=4)  # never rebuilt behind the user's back: trained folds depend on it
    assert layout.folds_csv.stat().st_mtime_ns == stamp
    f4 = folds.build_folds(layout, k=4)
    assert f4["fold"].nunique() == 4
    m = meta.load_meta(layout)
    meta.build_meta(layout, workers=1)  # newer meta.csv -> folds rebuilt
    assert layout.folds_csv.stat().st_mtime_ns > stamp
    assert folds.load_folds(layout, k=4).equals(f4) and len(m) == 659


def test_folds_need_enough_patients_and_labels(mini_dir, tmp_path):
    frame = pd.DataFrame({"patient_id": ["a", "a", "b"], **{label: [0, 0, 0] for label in LABELS}})
    with pytest.raises(UserError, match="cannot make 5"):
        folds.assign_folds(frame, k=5)
    data = tmp_path / "comp"
    (data / "stage_2_train").mkdir(parents=True)
    with pytest.raises(UserError, match="stage_2_train.csv"):
        folds.build_folds(Layout.of(data, tmp_path / "w"))


@pytest.mark.slow
def test_folds_at_competition_scale():
    headers = pd.read_csv(shared_file("stage_1_test_dicom_headers.csv.gz"))
    frame = meta.frame_from_headers(headers)
    rng = np.random.default_rng(0)
    # random labels with the competition's rates, clustered by series like real bleeds
    rates = {
        "epidural": 0.004,
        "intraparenchymal": 0.048,
        "intraventricular": 0.035,
        "subarachnoid": 0.047,
        "subdural": 0.063,
    }
    series = frame["series_id"].unique()
    for label, rate in rates.items():
        bleeding = set(rng.choice(series, size=max(1, int(len(series) * rate * 3)), replace=False))
        frame[label] = (frame["series_id"].isin(bleeding) & (rng.random(len(frame)) < 0.35)).astype(np.int8)
    frame["any"] = frame[list(rates)].max(axis=1)
    k = 5
    fold = folds.assign_folds(frame, k=k, seed=42)
    _check_folds(frame, fold, k)
    sizes = fold.value_counts()
    assert sizes.max() / sizes.min() < 1.1
    per_fold = frame.assign(fold=fold).groupby("fold")[list(LABELS)].sum()
    share = per_fold / per_fold.sum()
    assert (share.sub(1 / k).abs() < 0.05).all().all(), share  # every label within 5 points of 20% per fold
    assert folds.assign_folds(frame, k=k, seed=42).equals(fold)


def test_rare_label_coverage_on_random_cohorts():
    """Patients carrying several rare labels can trap a greedy pass; the repair step must still cover every fold."""
    for trial in range(120):
        rng = np.random.default_rng(trial)
        n_patients, k = int(rng.integers(5, 40)), int(rng.integers(2, 6))
        if n_patients < k:
            continue
        rows = []
        for p in range(n_patients):
            carried = (rng.random(5) < rng.uniform(0.05, 0.4, 5)) & (rng.random() < 0.5)
            for _ in range(int(rng.integers(1, 30))):
                lab = (carried & (rng.random(5) < 0.5)).astype(int)
                rows.append([f"P{p}", lab.max(), *lab])
        frame = pd.DataFrame(rows, columns=["patient_id", *LABELS])
        _check_folds(frame, folds.assign_folds(frame, k=k, seed=trial), k)
