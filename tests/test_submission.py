"""Writer, validator and submit(): every kind of bad submission is named, good ones round-trip to the same score."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ich_kaggle.core.labels import LABELS
from ich_kaggle.core import config, freshness, manifest, metrics
from ich_kaggle.core.config import Config
from ich_kaggle.submit import stage as submission
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Layout, Run

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]  # the sample's order


def make_sample(path: Path, n: int = 12, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    images = [f"ID_{i:09x}" for i in rng.choice(16**9, n, replace=False)]
    ids = [f"{img}_{label}" for img in images for label in ORDER]
    pd.DataFrame({"ID": ids, "Label": 0.5}).to_csv(path, index=False)
    return images


def wide_preds(images: list[str], seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.random((len(images), 6)), columns=list(LABELS))
    df.insert(0, "image_id", images)
    return df.sample(frac=1, random_state=seed).reset_index(drop=True)  # any order in


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "stage_2_sample_submission.csv"
    return path, make_sample(path)


def test_write_keeps_sample_order_clips_and_round_trips(tmp_path, sample):
    sample_csv, images = sample
    pred = wide_preds(images)
    pred.loc[0, "any"] = 1.0
    pred.loc[1, "epidural"] = 0.0
    out = submission.write_submission(pred, sample_csv, tmp_path / "out" / "sub.csv")
    assert out == tmp_path / "out" / "sub.csv"
    written = pd.read_csv(out)
    assert list(written.columns) == ["ID", "Label"]
    assert written["ID"].tolist() == pd.read_csv(sample_csv)["ID"].tolist()
    assert written["Label"].min() >= 1e-6 and written["Label"].max() <= 1 - 1e-6
    lookup = pred.set_index("image_id")
    img, sub = written["ID"].iloc[7].rsplit("_", 1)
    assert written["Label"].iloc[7] == pytest.approx(lookup.loc[img, sub], abs=1e-6)
    with gzip.open(out.with_name("sub.csv.gz"), "rb") as f:
        assert f.read() == out.read_bytes()
    assert not list(out.parent.glob(".*tmp"))  # atomic: no temporary left behind
    assert submission.validate_file(sample_csv, out) == []
    assert submission.validate_file(sample_csv, out.with_name("sub.csv.gz")) == []
    # round trip: scoring the written file equals scoring the (clipped, rounded) wide predictions
    truth = pred.copy()
    truth[list(LABELS)] = (np.random.default_rng(5).random((len(pred), 6)) < 0.3).astype(int)
    got = metrics.score_frames(truth, metrics.read_long_or_wide(out))["weighted_log_loss"]
    clipped = np.clip(pred[list(LABELS)].to_numpy(), 1e-6, 1 - 1e-6)
    assert got == pytest.approx(metrics.weighted_log_loss(truth[list(LABELS)].to_numpy(), clipped), rel=1e-4)


def test_write_rejects_missing_images_and_nan(tmp_path, sample):
    sample_csv, images = sample
    pred = wide_preds(images)
    with pytest.raises(UserError, match=r"no prediction for 2 images"):
        submission.write_submission(pred.iloc[2:], sample_csv, tmp_path / "s.csv")
    pred.loc[3, "subdural"] = np.nan
    with pytest.raises(UserError, match="NaN"):
        submission.write_submission(pred, sample_csv, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def _good(sample_csv: Path) -> pd.DataFrame:
    df = pd.read_csv(sample_csv, dtype=str)
    df["Label"] = "0.25"
    return df


def _problems(sample_csv, sub_df):
    return submission.validate(pd.read_csv(sample_csv, dtype=str), sub_df)


def test_validator_names_each_problem(sample):
    sample_csv, _ = sample
    good = _good(sample_csv)
    assert _problems(sample_csv, good) == []
    assert _problems(sample_csv, good.iloc[::-1]) == []  # any row order is accepted by Kaggle

    cases = {
        "missing": (good.iloc[6:], r"^6 IDs of the sample submission are missing"),
        "extra": (
            pd.concat([good, pd.DataFrame({"ID": ["ID_zzz_any"], "Label": ["0.1"]})]),
            r"^1 IDs are not in the sample",
        ),
        "duplicate": (pd.concat([good, good.iloc[:2]]), r"^2 duplicate IDs"),
        "nan": (good.assign(Label=["nan"] + [""] + ["0.2"] * (len(good) - 2)), r"^2 labels are NaN/empty"),
        "non-numeric": (good.assign(Label=["abc"] + ["0.2"] * (len(good) - 1)), r"^1 labels are not numbers: .*'abc'"),
        "range": (
            good.assign(Label=["1.5", "-0.1", "inf"] + ["0.2"] * (len(good) - 3)),
            r"^3 labels are outside \[0, 1\]",
        ),
        "header": (good.rename(columns={"Label": "label"}), r"^bad header 'ID,label'"),
    }
    for name, (df, pattern) in cases.items():
        problems = _problems(sample_csv, df.reset_index(drop=True))
        assert len(problems) == 1, (name, problems)
        assert pd.Series(problems).str.contains(pattern, regex=True).any(), (name, problems)
    assert _problems(sample_csv, good.iloc[:0]) == [f"no rows: expected {len(good)} rows (six per test image)"]


def test_validator_reports_several_problems_at_once(sample):
    sample_csv, _ = sample
    bad = pd.concat(
        [_good(sample_csv).iloc[1:], pd.DataFrame({"ID": ["ID_x_any", "ID_x_any"], "Label": ["2", "oops"]})]
    )
    problems = _problems(sample_csv, bad.reset_index(drop=True))
    kinds = ["duplicate IDs", "are missing", "not in the sample", "not numbers", "outside [0, 1]"]
    assert len(problems) == len(kinds)
    for kind in kinds:
        assert sum(kind in p for p in problems) == 1, (kind, problems)


def test_validate_file_and_cli(tmp_path, sample):
    sample_csv, images = sample
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert submission.validate_file(sample_csv, empty) == [
        f"{empty}: empty file; expected 'ID,Label' then six rows per test image"
    ]
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("ID,Label\nID_a_any,0.1,7,8\n")
    (problem,) = submission.validate_file(sample_csv, ragged)
    assert problem.startswith(f"{ragged}: not a readable CSV")
    assert submission.validate_file(sample_csv, tmp_path / "nope.csv") == [f"{tmp_path / 'nope.csv'}: file not found"]

    good = submission.write_submission(wide_preds(images), sample_csv, tmp_path / "good.csv")
    cli = [sys.executable, "-m", "ich_kaggle", "validate", "--sample", str(sample_csv), "--submission"]
    out = subprocess.run([*cli, str(good)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == f"{good}: valid"
    bad = tmp_path / "bad.csv"
    df = pd.read_csv(good, dtype=str).iloc[3:]
    df.iloc[0, 1] = "NaN"
    df.to_csv(bad, index=False)
    out = subprocess.run([*cli, str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1
    assert len(out.stdout.splitlines()) == 2 and all(line.startswith(str(bad)) for line in out.stdout.splitlines())


def _experiment(tmp_path: Path, images: list[str], unreadable: list[str], with_stack: bool):
    """A data folder (labels + sample) and a run folder as predict/stack write them."""
    data = tmp_path / "data"
    data.mkdir()
    make_sample(data / "stage_2_sample_submission.csv")
    rng = np.random.default_rng(7)
    train_images = [f"ID_t{i:08d}" for i in range(60)]
    train = pd.DataFrame((rng.random((60, 6)) < 0.25).astype(int), columns=list(LABELS))
    train["any"] = train[list(LABELS[1:])].max(axis=1)
    train.insert(0, "image_id", train_images)
    long = pd.DataFrame(
        {
            "ID": [f"{i}_{lab}" for i in train_images for lab in ORDER],
            "Label": train.set_index("image_id")[ORDER].to_numpy().ravel(),
        }
    )
    long.to_csv(data / "stage_2_train.csv", index=False)
    run = tmp_path / "runs" / "tiny"
    (run / "predictions").mkdir(parents=True)
    readable = [i for i in images if i not in unreadable]
    wide_preds(readable, seed=2).to_csv(run / "predictions" / "test.csv", index=False)
    pd.DataFrame({"image_id": unreadable}).to_csv(run / "predictions" / "unreadable_test.csv", index=False)
    oof = train.copy()
    oof[list(LABELS)] = np.clip(train[list(LABELS)].to_numpy() * 0.8 + 0.1, 0, 1)
    oof.iloc[:40].to_csv(run / "predictions" / "oof.csv", index=False)
    cfg = config.load("tiny")
    layout, runs = Layout.of(data, tmp_path / "work"), Run(run)
    for k in range(cfg.cv.k):  # finished folds, as training leaves them
        runs.fold(k).dir.mkdir(parents=True)
        runs.fold(k).best.write_bytes(b"weights")
        runs.fold(k).done.write_text("{}")
    for path in (runs.predictions.test, runs.predictions.oof):
        manifest.write(path, freshness.predictions(runs, list(range(cfg.cv.k)), cfg.tta))
    if with_stack:
        (run / "stack").mkdir()
        stacked = wide_preds(readable, seed=3)
        stacked.to_csv(run / "stack" / "test.csv", index=False)
        better = oof.copy()  # the stack's OOF closer to the labels: submit chooses it by its OOF score
        better[list(LABELS)] = np.clip(train[list(LABELS)].to_numpy() * 0.9 + 0.05, 0, 1)
        better.iloc[:40].to_csv(run / "stack" / "oof.csv", index=False)
        for path in (runs.stack.oof, runs.stack.test):
            manifest.write(path, freshness.stacked(runs.prediction_sources([]), layout, cfg.stack, cfg.cv))
    return layout, train, oof.iloc[:40]


def test_submit_fills_unreadable_with_prior_and_reports_oof(tmp_path, capsys):
    images = make_sample(tmp_path / "probe.csv")
    layout, train, oof = _experiment(tmp_path, images, unreadable=images[:2], with_stack=True)
    cfg = config.load("tiny")
    out = submission.submit(cfg, layout, runs=tmp_path / "runs", out_dir=tmp_path / "subs")
    assert out == tmp_path / "subs" / "tiny.csv" and out.with_name("tiny.csv.gz").exists()
    assert submission.validate_file(layout.sample_csv, out) == []
    wide = metrics.read_long_or_wide(out).set_index("image_id")
    prior = train[list(LABELS)].mean().to_numpy()
    np.testing.assert_allclose(wide.loc[images[0]].to_numpy(), np.clip(prior, 1e-6, 1 - 1e-6), atol=1e-6)
    stacked = pd.read_csv(tmp_path / "runs" / "tiny" / "stack" / "test.csv").set_index("image_id")
    np.testing.assert_allclose(
        wide.loc[images[5]].to_numpy(), stacked.loc[images[5], list(LABELS)].to_numpy(), atol=1e-6
    )
    text = capsys.readouterr().out
    assert "2 of 12 test images have no prediction (2 listed in" in text and images[0] in text
    expected = metrics.score_frames(train.iloc[:40], oof)["weighted_log_loss"]
    assert f"{expected:.5f}" in text and "stack/oof.csv" in text
    assert "submit: using the stacked (" in text  # the probability stack, chosen by OOF

    # a fold retrained since predict ran: the first stage is stale, and so is everything made from it
    runs = Run(tmp_path / "runs" / "tiny")
    runs.fold(1).best.write_bytes(b"retrained weights")
    with pytest.raises(UserError, match=r"predictions/test.csv is stale \(input fold1 changed\); rerun `make predict"):
        submission.submit(cfg, layout, runs=tmp_path / "runs", out_dir=tmp_path / "subs")
    for path in (runs.predictions.test, runs.predictions.oof):  # predicted again: a new first stage (issue 21)
        manifest.write(path, freshness.predictions(runs, list(range(cfg.cv.k)), cfg.tta))
    submission.submit(cfg, layout, runs=tmp_path / "runs", out_dir=tmp_path / "subs")
    text = capsys.readouterr().out
    assert "stack/test.csv is stale (input source0:oof.csv changed" in text and "using the first stage" in text


def test_submit_without_predictions_says_run_predict(tmp_path):
    images = make_sample(tmp_path / "probe.csv")
    layout, _, _ = _experiment(tmp_path, images, unreadable=[], with_stack=False)
    with pytest.raises(UserError, match="make predict"):
        submission.submit(Config(name="other"), layout, runs=tmp_path / "runs", out_dir=tmp_path / "subs")


def test_real_sample_submission_is_valid_and_rewritable(mini_dir, tmp_path):
    sample_csv = mini_dir / "stage_2_sample_submission.csv"
    assert submission.validate_file(sample_csv, sample_csv) == []
    wide = metrics.read_long_or_wide(sample_csv)
    assert len(wide) == 43
    out = submission.write_submission(wide, sample_csv, tmp_path / "real.csv")
    assert pd.read_csv(out)["ID"].tolist() == pd.read_csv(sample_csv)["ID"].tolist()


def test_submit_without_training_labels(tmp_path, capsys):
    """A kernel may see only the test set: submit still works when nothing needs the prior."""
    images = make_sample(tmp_path / "probe.csv")
    layout, _, _ = _experiment(tmp_path, images, unreadable=[], with_stack=False)
    layout.train_csv.unlink()
    out = submission.submit(config.load("tiny"), layout, runs=tmp_path / "runs", out_dir=tmp_path / "subs")
    assert submission.validate_file(layout.sample_csv, out) == []
    assert "no expected score" in capsys.readouterr().out
    run = Run(tmp_path / "runs" / "tiny")
    lost = pd.read_csv(run.predictions.test)  # an image lost at predict time: left out, listed as unreadable
    lost.iloc[1:].to_csv(run.predictions.test, index=False)
    lost.iloc[:1][["image_id"]].to_csv(run.predictions.unreadable, index=False)
    manifest.write(run.predictions.test, freshness.predictions(run, list(range(5)), config.load("tiny").tta))
    with pytest.raises(UserError, match="no training prior"):
        submission.submit(config.load("tiny"), layout, runs=tmp_path / "runs", out_dir=tmp_path / "subs")
