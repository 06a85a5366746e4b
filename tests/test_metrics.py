"""The metric equals sklearn's log_loss on the long file with per-row weights (any=2); the CLI prints it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from ich_kaggle.core.labels import LABEL_WEIGHTS, LABELS, parse_long
from ich_kaggle.core import metrics
from ich_kaggle.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def sklearn_long(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Reference: flatten to the long ID,Label form and weigh each row like Kaggle did."""
    weights = np.tile(LABEL_WEIGHTS, len(y_true))
    p = np.clip(y_pred, metrics.EPS, 1 - metrics.EPS).ravel()  # sklearn>=1.5 clips at machine eps, Kaggle at 1e-15
    return log_loss(y_true.ravel(), p, sample_weight=weights, labels=[0, 1])


def to_long(wide: pd.DataFrame) -> pd.DataFrame:
    order = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]
    ids = [f"{i}_{label}" for i in wide["image_id"] for label in order]
    return pd.DataFrame({"ID": ids, "Label": wide[order].to_numpy().ravel()})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random((500, 6)) < rng.random(6) * 0.3).astype(np.int8)
    p = rng.random((500, 6))
    assert metrics.weighted_log_loss(y, p) == pytest.approx(sklearn_long(y, p), rel=1e-12)
    per = metrics.per_label_log_loss(y, p)
    assert list(per) == list(LABELS)
    for j, label in enumerate(LABELS):
        assert per[label] == pytest.approx(log_loss(y[:, j], p[:, j], labels=[0, 1]), rel=1e-12)
    # the weighted loss is the weighted mean of the per-label losses
    assert metrics.weighted_log_loss(y, p) == pytest.approx(np.dot(LABEL_WEIGHTS, list(per.values())) / 7, rel=1e-12)


def test_edge_cases():
    y = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    perfect = y.astype(float)
    assert metrics.weighted_log_loss(y, perfect) == pytest.approx(-np.log(1 - 1e-15), abs=1e-12)
    wrong = 1.0 - perfect  # exact 0/1 mistakes are clipped at 1e-15, not infinite
    assert metrics.weighted_log_loss(y, wrong) == pytest.approx(-np.log(1e-15), rel=1e-4)
    assert metrics.weighted_log_loss(y, wrong) == pytest.approx(sklearn_long(y, wrong), rel=1e-9)
    half = np.full((2, 6), 0.5)
    assert metrics.weighted_log_loss(y, half) == pytest.approx(np.log(2), rel=1e-12)
    # all-negative truth (a single class) still scores, like sklearn with labels=[0, 1]
    zeros = np.zeros((3, 6))
    p = np.full((3, 6), 0.1)
    assert metrics.weighted_log_loss(zeros, p) == pytest.approx(sklearn_long(zeros, p), rel=1e-12)
    # one image as a 1-D row
    assert metrics.weighted_log_loss(y[0], half[0]) == pytest.approx(np.log(2))
    # `any` counts twice: a mistake on `any` costs twice a mistake on a subtype
    base = np.full((1, 6), 0.5)
    a, s = base.copy(), base.copy()
    a[0, 0], s[0, 1] = 0.01, 0.01
    truth = np.ones((1, 6))
    d_any = metrics.weighted_log_loss(truth, a) - metrics.weighted_log_loss(truth, base)
    d_sub = metrics.weighted_log_loss(truth, s) - metrics.weighted_log_loss(truth, base)
    assert d_any == pytest.approx(2 * d_sub)


def test_rejects_bad_arrays():
    with pytest.raises(ValueError):
        metrics.weighted_log_loss(np.zeros((3, 5)), np.zeros((3, 5)))
    with pytest.raises(ValueError):
        metrics.weighted_log_loss(np.zeros((3, 6)), np.full((3, 6), np.nan))
    with pytest.raises(ValueError):
        metrics.weighted_log_loss(np.zeros((0, 6)), np.zeros((0, 6)))


def _frames(n=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"ID_{i:09x}" for i in rng.choice(16**9, n, replace=False)]
    truth = pd.DataFrame((rng.random((n, 6)) < 0.2).astype(int), columns=list(LABELS))
    truth.insert(0, "image_id", ids)
    pred = pd.DataFrame(rng.random((n, 6)), columns=list(LABELS))
    pred.insert(0, "image_id", ids)
    return truth, pred


def test_score_frames_joins_on_image_id_and_names_missing_images():
    truth, pred = _frames()
    expected = metrics.weighted_log_loss(truth[list(LABELS)].to_numpy(), pred[list(LABELS)].to_numpy())
    shuffled = pred.sample(frac=1, random_state=1)
    extra = pd.concat([shuffled, pd.DataFrame([["ID_extra", *[0.5] * 6]], columns=pred.columns)])
    result = metrics.score_frames(truth, extra)
    assert result["weighted_log_loss"] == pytest.approx(expected, rel=1e-12)
    assert set(result["per_label"]) == set(LABELS)
    with pytest.raises(UserError, match=r"lacks predictions for 2 of 40 .*e\.g\. ID_"):
        metrics.score_frames(truth, pred.iloc[2:])
    with pytest.raises(UserError, match=r"infinite predictions for 1 images"):
        metrics.score_frames(truth, pred.assign(any=[np.inf] + [0.5] * (len(pred) - 1)))


@pytest.mark.parametrize("values", ["labels", "probabilities"])
def test_one_long_parser_handles_duplicates_and_any_row_order(values):
    truth, _ = _frames(n=10)
    long = to_long(truth)
    long = pd.concat([long, long.iloc[:6]]).sample(frac=1, random_state=0)  # duplicated rows, shuffled
    wide = parse_long(long, "x.csv", values)
    assert list(wide.columns) == ["image_id", *LABELS]
    back = wide.set_index("image_id").loc[truth["image_id"]]
    np.testing.assert_array_equal(back.to_numpy(), truth[list(LABELS)].to_numpy())
    bad = long.copy()
    bad.iloc[0, 0] = "ID_abc_hemorrhage"
    with pytest.raises(UserError, match="does not end in one of"):
        parse_long(bad, "x.csv", values)
    with pytest.raises(UserError, match="has no row for subtype"):
        parse_long(to_long(truth).iloc[1:], "x.csv", values)
    conflict = pd.concat([long, long.iloc[:1].assign(Label=1 - long["Label"].iloc[0])])
    with pytest.raises(UserError, match="appears twice with different values"):
        parse_long(conflict, "x.csv", values)
    with pytest.raises(UserError, match=r"row 2 \(ID .*\) has 7"):
        parse_long(long.assign(Label=[7] + [0] * (len(long) - 1)), "x.csv", values)


def test_score_rejects_what_validate_rejects(tmp_path):
    """Out-of-range, NaN, non-numeric and conflicting predictions, truth labels other than 0/1, a folder: exit 2."""
    truth, pred = _frames(n=8, seed=1)
    truth_csv = tmp_path / "labels.csv"
    to_long(truth).to_csv(truth_csv, index=False)
    long = to_long(pred)
    cases = {
        "negative": long.assign(Label=[-0.2] + list(long["Label"].iloc[1:])),
        "above_one": long.assign(Label=[1.5] + list(long["Label"].iloc[1:])),
        "seven": long.assign(Label=[7] + list(long["Label"].iloc[1:])),
        "nan": long.assign(Label=[np.nan] + list(long["Label"].iloc[1:])),
        "text": long.assign(Label=["high"] + list(long["Label"].iloc[1:])),
        "conflict": pd.concat([long, long.iloc[:1].assign(Label=0.123)]),
    }
    for name, frame in cases.items():
        sub = tmp_path / f"{name}.csv"
        frame.to_csv(sub, index=False)
        out = subprocess.run(
            [sys.executable, "-m", "ich_kaggle", "score", "--truth", str(truth_csv), "--submission", str(sub)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert out.returncode == 2, (name, out.stdout, out.stderr)
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and str(sub) in out.stderr, name
        assert "np." not in out.stderr and "Traceback" not in out.stderr, name
    wide_nan = pred.assign(any=[np.nan] + list(pred["any"].iloc[1:]))
    wide_nan.to_csv(tmp_path / "wide_nan.csv", index=False)
    with pytest.raises(UserError, match="has an empty cell for any"):
        metrics.score_files(truth_csv, tmp_path / "wide_nan.csv")
    with pytest.raises(UserError, match="is a folder"):
        metrics.score_files(truth_csv, tmp_path)
    bad_truth = tmp_path / "bad_truth.csv"
    to_long(truth.assign(any=7)).to_csv(bad_truth, index=False)
    with pytest.raises(UserError, match="must be 0 or 1"):
        metrics.score_files(bad_truth, truth_csv)
    trailing = tmp_path / "trailing.csv"
    trailing.write_text(
        "ID,Label\n" + "".join(f"{i},{v},\n" for i, v in zip(to_long(truth)["ID"], to_long(truth)["Label"]))
    )
    assert metrics.read_truth(trailing).equals(metrics.read_truth(truth_csv))  # a trailing comma is harmless


def test_score_files_and_cli(tmp_path):
    truth, pred = _frames(n=25, seed=3)
    truth_csv, sub_csv = tmp_path / "labels.csv", tmp_path / "sub.csv"
    to_long(truth).to_csv(truth_csv, index=False)
    to_long(pred).to_csv(sub_csv, index=False)
    expected = sklearn_long(truth[list(LABELS)].to_numpy(), pred[list(LABELS)].to_numpy())
    assert metrics.score_files(truth_csv, sub_csv)["weighted_log_loss"] == pytest.approx(expected, rel=1e-12)
    # wide predictions (oof.csv form) score the same
    pred.to_csv(tmp_path / "wide.csv", index=False)
    assert metrics.score_files(truth_csv, tmp_path / "wide.csv")["weighted_log_loss"] == pytest.approx(
        expected, rel=1e-12
    )

    out = subprocess.run(
        [sys.executable, "-m", "ich_kaggle", "score", "--truth", str(truth_csv), "--submission", str(sub_csv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"weighted_log_loss: {expected:.6f}"
    assert [line.split(":")[0] for line in lines[1:]] == list(LABELS)

    to_long(pred.iloc[3:]).to_csv(sub_csv, index=False)
    out = subprocess.run(
        [sys.executable, "-m", "ich_kaggle", "score", "--truth", str(truth_csv), "--submission", str(sub_csv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "lacks predictions for 3 of 25" in out.stderr


def test_real_labels_prior_score():
    """On the full stage-1 labels the prior-only (label means) score is ~0.232: the floor every model must beat."""
    from conftest import shared_file

    wide = pd.read_csv(shared_file("stage_1_train_labels_wide.csv.gz")).rename(columns={"Image": "image_id"})
    score = metrics.prior_log_loss(wide, wide)
    assert score == pytest.approx(0.2320, abs=5e-4)
    assert metrics.weighted_log_loss(wide[list(LABELS)].to_numpy(), np.full((len(wide), 6), 0.5)) == pytest.approx(
        np.log(2)
    )


def test_mini_set_long_labels(mini_dir):
    wide = metrics.read_long_or_wide(mini_dir / "stage_2_train.csv")
    assert len(wide) == 616 and int(wide["any"].sum()) == 51 and int(wide["epidural"].sum()) == 0
