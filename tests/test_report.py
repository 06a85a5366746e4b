"""Report, compare and Grad-CAM on a small fake experiment with realistic files (log.csv, oof.csv, folds, meta)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ich_kaggle.core.labels import LABELS
from ich_kaggle.core import config
from ich_kaggle.report import evaluation as ev
from ich_kaggle.report import stage as report
from ich_kaggle.core.errors import UserError
from ich_kaggle.report.gradcam import GradCAM, overlay
from ich_kaggle.core.layout import Layout
from train_helpers import experiment_args

SUBTYPES = LABELS[1:]


def fake_data(work: Path, seed: int = 0, series: int = 14, slices: int = 12, k: int = 3) -> pd.DataFrame:
    """folds.csv + meta.csv in `work`: series with contiguous bleeding slices, a few subtypes, 3 patient folds."""
    rng = np.random.default_rng(seed)
    rows, meta = [], []
    for s in range(series):
        sid, patient = f"ID_ser{s:03d}", f"ID_pat{s // 2:03d}"
        n = slices + int(rng.integers(-2, 3))
        kinds = [] if s % 3 == 0 else list(rng.choice(SUBTYPES, size=int(rng.integers(1, 3)), replace=False))
        lo = int(rng.integers(2, n - 5))
        for r in range(n):
            iid = f"ID_{s:03d}{r:03d}"
            lab = {label: 0 for label in LABELS}
            if kinds and lo <= r < lo + 4:
                for kind in kinds:
                    lab[kind] = 1
                lab["any"] = 1
            rows.append(
                {
                    "image_id": iid,
                    "patient_id": patient,
                    "study_id": f"ID_stu{s:03d}",
                    "series_id": sid,
                    "fold": (s // 2) % k,
                    **lab,
                }
            )
            meta.append(
                {
                    "image_id": iid,
                    "patient_id": patient,
                    "study_id": f"ID_stu{s:03d}",
                    "series_id": sid,
                    "split": "train",
                    "path": f"stage_2_train/{iid}.dcm",
                    "z": 5.0 * r,
                    "slice_rank": r,
                    "series_len": n,
                    "rows": 512,
                    "cols": 512,
                    "pixel_spacing": 0.45,
                    "bits_stored": 12 if s % 5 else 16,
                    "pixel_representation": 0 if s % 5 else 1,
                    "intercept": -1024.0 if s % 4 else -1000.0,
                    "slope": 1.0,
                }
            )
    for t in range(3):  # unlabelled test series
        for r in range(10):
            meta.append(
                {
                    "image_id": f"ID_t{t}{r:02d}",
                    "patient_id": f"ID_tp{t}",
                    "study_id": f"ID_ts{t}",
                    "series_id": f"ID_tser{t}",
                    "split": "test",
                    "path": f"stage_2_test/ID_t{t}{r:02d}.dcm",
                    "z": 5.0 * r,
                    "slice_rank": r,
                    "series_len": 10,
                    "rows": 512,
                    "cols": 512,
                    "pixel_spacing": 0.45,
                    "bits_stored": 12,
                    "pixel_representation": 0,
                    "intercept": -1024.0,
                    "slope": 1.0,
                }
            )
    work.mkdir(parents=True, exist_ok=True)
    folds = pd.DataFrame(rows)
    folds.to_csv(work / "folds.csv", index=False)
    pd.DataFrame(meta).to_csv(work / "meta.csv", index=False)
    return folds


def fake_run(
    run: Path, folds: pd.DataFrame, seed: int = 0, epochs: int = 3, skill: float = 1.6, best_pt: bool = True
) -> None:
    """fold<k>/{log.csv, oof.csv[, best.pt]} with numbers shaped like a real CPU run."""
    rng = np.random.default_rng(seed)
    for fold in sorted(folds["fold"].unique()):
        d = run / f"fold{fold}"
        d.mkdir(parents=True, exist_ok=True)
        val = folds[folds["fold"] == fold]
        y = val[list(LABELS)].to_numpy(float)
        logit = skill * (2 * y - 1) + rng.normal(0, 1.3, y.shape) - 1.5
        oof = pd.DataFrame(1 / (1 + np.exp(-logit)), columns=list(LABELS))
        oof.insert(0, "image_id", val["image_id"].to_numpy())
        oof.to_csv(d / "oof.csv", index=False)
        log = {
            "epoch": np.arange(epochs),
            "lr": np.geomspace(1e-3, 1e-5, epochs),
            "train_loss": np.linspace(0.35, 0.12, epochs) + rng.normal(0, 0.01, epochs),
            "val_weighted_log_loss": np.linspace(0.30, 0.16, epochs) + rng.normal(0, 0.01, epochs),
        }
        for i, label in enumerate(LABELS):
            log[f"val_{label}"] = np.linspace(0.35, 0.1, epochs) * (1 + 0.1 * i)
        log["seconds"] = 40 + rng.normal(0, 2, epochs)
        log["train_images_per_s"] = 90 + rng.normal(0, 3, epochs)
        pd.DataFrame(log).to_csv(d / "log.csv", index=False)
        if best_pt:
            (d / "best.pt").write_bytes(b"not a real checkpoint")  # Grad-CAM must report it, not crash
            bce = -(y * np.log(oof[list(LABELS)].to_numpy()) + (1 - y) * np.log1p(-oof[list(LABELS)].to_numpy()))
            done = {
                "fold": int(fold),
                "best_epoch": epochs - 1,
                "n_val": len(val),
                "oof_weighted_log_loss": float((bce * [2, 1, 1, 1, 1, 1]).sum(axis=1).mean() / 7),
            }
            (d / "done.json").write_text(json.dumps(done))


def _experiment(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    layout = Layout.of(data, tmp_path / "work")
    folds = fake_data(layout.work)
    cfg = config.load("tiny")
    runs = tmp_path / "runs"
    fake_run(runs / cfg.name, folds)
    return cfg, layout, runs, folds


@pytest.fixture
def experiment(tmp_path):
    return _experiment(tmp_path)


def fake_stack(run: Path, folds: pd.DataFrame) -> pd.DataFrame:
    """stack/{oof,metrics}.csv as the second stage writes them (stage column first)."""
    rng = np.random.default_rng(7)
    y = folds[list(LABELS)].to_numpy(float)
    oof = pd.DataFrame(np.clip(y * 0.8 + rng.random(y.shape) * 0.2, 0.01, 0.99), columns=list(LABELS))
    oof.insert(0, "image_id", folds["image_id"].to_numpy())
    (run / "stack").mkdir(parents=True, exist_ok=True)
    oof.to_csv(run / "stack" / "oof.csv", index=False)
    metrics = pd.DataFrame(
        [
            {
                "stage": "first_stage",
                "weighted_log_loss": 0.31,
                **{label: 0.3 + 0.01 * i for i, label in enumerate(LABELS)},
            },
            {
                "stage": "stacked",
                "weighted_log_loss": 0.22,
                **{label: 0.2 + 0.01 * i for i, label in enumerate(LABELS)},
            },
            {
                "stage": "stacked_embeddings",
                "weighted_log_loss": 0.27,
                **{label: 0.25 + 0.01 * i for i, label in enumerate(LABELS)},
            },
        ]
    )
    metrics.to_csv(run / "stack" / "metrics.csv", index=False)
    from ich_kaggle.core import freshness, manifest
    from ich_kaggle.core.config import CVConfig, StackConfig
    from ich_kaggle.core.layout import Layout, Predictions

    oof.to_csv(run / "stack" / "test.csv", index=False)  # stands in for the test predictions; its manifest matters
    manifest.write(
        run / "stack" / "test.csv",
        freshness.stacked(
            [Predictions(run / "predictions")],
            Layout.of(run, run / "work"),
            StackConfig(use_embeddings=True),
            CVConfig(k=3),
        ),
    )
    steps = np.arange(0, 40, 5)  # the inner validation curve the stacker stopped on (stack/curve.csv)
    pd.DataFrame(
        [
            {
                "fold": f,
                "step": s,
                "epoch": s / 5,
                "train_loss": 0.3,
                "val_loss": 0.3 - 0.1 * np.exp(-s / 8) + 0.001 * s,
            }
            for f in range(3)
            for s in steps
        ]
    ).to_csv(run / "stack" / "curve.csv", index=False)
    return oof


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """The whole report, drawn once (matplotlib is the slow part on a small CPU)."""
    cfg, layout, runs, folds = _experiment(tmp_path_factory.mktemp("full"))
    fake_stack(runs / cfg.name, folds)
    return report.make_report(cfg, layout, runs=runs, threshold=0.5), (cfg, layout, runs, folds)


def check_page(index: Path) -> list[Path]:
    """Every href/src of the page resolves to a file; every PNG is a real, non-trivial, non-uniform image."""
    page = index.read_text()
    links = re.findall(r'(?:src|href)="([^"#][^"]*)"', page)
    assert links, "the page links no figure"
    pngs = []
    for link in links:
        target = index.parent / link
        assert target.is_file(), f"broken link {link}"
        if target.suffix == ".png":
            pngs.append(target)
            img = cv2.imread(str(target))
            assert img is not None, f"{target} is not a readable PNG"
            assert img.shape[0] > 200 and img.shape[1] > 300, f"{target} is tiny: {img.shape}"
            packed = (img[..., 0].astype(np.int32) << 16) | (img[..., 1].astype(np.int32) << 8) | img[..., 2]
            assert img.std() > 10 and len(np.unique(packed)) > 20, f"{target} is blank"
    return pngs


def test_report_on_fake_experiment(full_report):
    index, (cfg, layout, runs, folds) = full_report
    assert index == runs / cfg.name / "report" / "index.html"
    names = {p.name for p in check_page(index)}
    expected = {
        "curves_fold0.png",
        "curves_fold1.png",
        "curves_fold2.png",
        "roc.png",
        "pr.png",
        "confusion_any.png",
        "f1.png",
        "label_counts.png",
        "cooccurrence.png",
        "dicom_values.png",
        "series_lengths.png",
        "stages.png",
        "stack_curve.png",
    }
    assert expected <= names, expected - names
    page = index.read_text()
    assert "Section failed" not in page
    # the fake best.pt files are reported per fold, the rest of the page still renders
    assert "best.pt" in page and "unreadable" in page
    assert "stage_2_test_labels.csv: the real competition keeps test labels on Kaggle" in page
    # the stack's design, from its manifest
    assert (
        "Second stage: gru, embeddings: per_fold (16 components per model); fitted on the first stage's folds "
        "(cv.split=patient, folds [0, 1, 2])"
    ) in page.replace("&#x27;", "'")

    # the numbers in the page are the numbers of the files
    oof = pd.concat([pd.read_csv(runs / cfg.name / f"fold{k}" / "oof.csv") for k in range(3)])
    joined = ev.join_truth_pred(folds, oof)
    series = pd.read_csv(index.parent / "series_table.csv").set_index("Hemorrhage subtype")
    expected_series = ev.series_table(joined, 0.5)
    pd.testing.assert_frame_equal(series, expected_series, check_dtype=False)
    assert series.loc["any", "POS"] == folds.groupby("series_id")["any"].max().sum()
    summary = json.loads((index.parent / "summary.json").read_text())
    y = joined[list(LABELS)].to_numpy(float)
    p = np.clip(joined[[ev.pred_col(label) for label in LABELS]].to_numpy(float), 1e-15, 1 - 1e-15)
    bce = -(y * np.log(p) + (1 - y) * np.log1p(-p)).mean(axis=0)
    assert summary["weighted_log_loss"] == pytest.approx((2 * bce[0] + bce[1:].sum()) / 7)
    assert summary["series_auc_any"] == pytest.approx(expected_series.loc["any", "AUC"])
    assert summary["folds_done"] == 3 and summary["images"] == len(folds)
    thresholds = pd.read_csv(index.parent / "thresholds.csv").set_index("label")
    assert thresholds.loc["any", "F1"] == pytest.approx(ev.confusion(joined["any"], joined["any_pred"]).f1)
    assert "0 (0%)" not in ev.format_series_table(expected_series).loc["any", "POS"]
    stacked = pd.read_csv(runs / cfg.name / "stack" / "oof.csv")
    stacked_series = pd.read_csv(index.parent / "series_table_stacked.csv").set_index("Hemorrhage subtype")
    pd.testing.assert_frame_equal(
        stacked_series, ev.series_table(ev.join_truth_pred(folds, stacked)), check_dtype=False
    )


def test_report_threshold_changes_confusion(experiment):
    cfg, layout, runs, folds = experiment
    index = report.make_report(cfg, layout, runs=runs, threshold=0.9, gradcam=0, sections=["thresholds", "gradcam"])
    assert "Grad-CAM turned off" in index.read_text()
    assert {p.name for p in check_page(index)} == {"confusion_any.png", "f1.png"}
    table = pd.read_csv(index.parent / "thresholds.csv").set_index("label")
    oof = pd.concat([pd.read_csv(runs / cfg.name / f"fold{k}" / "oof.csv") for k in range(3)])
    joined = ev.join_truth_pred(folds, oof)
    assert table.loc["any", "PREC"] == pytest.approx(ev.confusion(joined["any"], joined["any_pred"], 0.9).precision)


def test_report_with_missing_inputs(tmp_path):
    """Only log.csv of one fold, no predictions, no labels, no meta: notes in the page, no crash."""
    cfg = config.load("tiny")
    runs = tmp_path / "runs"
    folds = fake_data(tmp_path / "unused")
    fake_run(runs / cfg.name, folds[folds["fold"] == 0], best_pt=False)
    (runs / cfg.name / "fold0" / "oof.csv").unlink()
    layout = Layout.of(tmp_path / "nodata", tmp_path / "nowork")
    index = report.make_report(cfg, layout, runs=runs)
    page = index.read_text()
    assert page.count('class="note"') >= 5
    assert "Skipped: no out-of-fold predictions" in page
    assert "Section failed" not in page
    assert {p.name for p in check_page(index)} == {"curves_fold0.png"}


def test_report_user_errors(tmp_path, experiment):
    cfg, layout, runs, folds = experiment
    with pytest.raises(UserError, match="not found; train first"):
        report.make_report(cfg, layout, runs=tmp_path / "elsewhere")
    with pytest.raises(UserError, match="threshold"):
        report.make_report(cfg, layout, runs=runs, threshold=1.5)
    bad = runs / cfg.name / "fold0" / "oof.csv"
    pd.read_csv(bad).drop(columns=["subdural"]).to_csv(bad, index=False)
    with pytest.raises(UserError, match="unknown report section"):
        report.make_report(cfg, layout, runs=runs, sections=["roc"])
    page = report.make_report(cfg, layout, runs=runs, sections=["summary", "series"]).read_text()
    assert "lacks columns" in page and "Section failed" not in page  # a broken file is named in the page
    # ... and the other folds still count
    summary = json.loads((runs / cfg.name / "report" / "summary.json").read_text())
    assert summary["images"] == int((folds["fold"] != 0).sum())
    assert "2 fold oof.csv file(s): fold1, fold2" in summary["oof_source"]


def test_compare_table(experiment, capsys):
    cfg, layout, runs, folds = experiment
    # a second experiment, worse, never reported: compare falls back to its fold logs
    fake_run(runs / "nested" / "worse", folds, seed=1, skill=1.0)
    # a started but unfinished one
    fake_run(runs / "started", folds[folds["fold"] == 0], best_pt=False)
    fake_stack(runs / cfg.name, folds)
    report.make_report(cfg, layout, runs=runs, sections=["summary"])
    table = report.compare(runs)
    out = capsys.readouterr().out
    assert set(table["experiment"]) == {"tiny", "nested/worse"}
    assert table["oof_wll"].is_monotonic_increasing  # best first
    row = table.set_index("experiment").loc["tiny"]
    summary = json.loads((runs / cfg.name / "report" / "summary.json").read_text())
    assert row["oof_wll"] == pytest.approx(summary["weighted_log_loss"])
    assert row["series_auc_any"] == pytest.approx(summary["series_auc_any"])
    assert row["folds_done"] == 3 and row["source"] == "report (OOF)"
    assert row["stacked_wll"] == pytest.approx(0.22)
    logs = [pd.read_csv(runs / cfg.name / f"fold{k}" / "log.csv") for k in range(3)]
    assert row["sec_per_epoch"] == pytest.approx(np.mean([lg["seconds"].mean() for lg in logs]))
    worse = table.set_index("experiment").loc["nested/worse"]
    assert worse["source"].startswith("fold files")
    # pooled from the folds' done.json: equal to the weighted log loss of all OOF rows together
    woof = pd.concat([pd.read_csv(runs / "nested" / "worse" / f"fold{k}" / "oof.csv") for k in range(3)])
    wjoined = ev.join_truth_pred(folds, woof)
    y = wjoined[list(LABELS)].to_numpy(float)
    p = wjoined[[ev.pred_col(label) for label in LABELS]].to_numpy(float)
    pooled = (-(y * np.log(p) + (1 - y) * np.log1p(-p)) * [2, 1, 1, 1, 1, 1]).sum(axis=1).mean() / 7
    assert worse["oof_wll"] == pytest.approx(pooled)
    wlogs = [pd.read_csv(runs / "nested" / "worse" / f"fold{k}" / "log.csv") for k in range(3)]
    sizes = folds.groupby("fold").size().to_numpy()
    assert worse["any"] == pytest.approx(np.average([lg["val_any"].min() for lg in wlogs], weights=sizes))
    assert np.isnan(worse["series_auc_any"])
    assert "started" in out and "not finished" in out
    assert (runs / "compare.csv").exists() and "tiny" in out


def test_compare_fits_120_columns_with_data_and_folds_done(experiment, capsys):
    """Each run names the data it trained on and its folds done of k; a stack-only experiment (the demo's
    `demo+embeddings`) is listed with its score; --wide shows every column."""
    cfg, layout, runs, folds = experiment
    for k in range(3):
        fold = runs / cfg.name / f"fold{k}"
        done = json.loads((fold / "done.json").read_text())
        (fold / "done.json").write_text(json.dumps({**done, "data": {"path": "/somewhere/synth", "images": "x"}}))
        (fold / "config.yaml").write_text("cv:\n  k: 5\n")
    long_name = "an-experiment-with-a-very-long-name-indeed-lr3e-4-size512"
    fake_run(runs / long_name, folds[folds["fold"] == 0], seed=2)
    fake_stack(runs / "demo+embeddings", folds)
    table = report.compare(runs)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    header = lines[0].split()
    assert header[:3] == ["experiment", "data", "folds"]
    row = next(line for line in lines if line.startswith("tiny "))
    assert "synth" in row and "3/5" in row
    assert any(line.startswith("demo+embeddings") for line in lines)
    assert set(table["experiment"]) == {"tiny", long_name, "demo+embeddings"}
    assert table.set_index("experiment").loc["demo+embeddings", "stacked_wll"] == pytest.approx(0.22)
    report.compare(runs, wide=True)
    wide = capsys.readouterr().out
    assert max(len(line) for line in wide.splitlines()) > 120 and "subarachnoid" in wide and long_name in wide


def test_compare_errors_and_empty(tmp_path, capsys):
    with pytest.raises(UserError, match="not found"):
        report.compare(tmp_path / "none")
    (tmp_path / "runs").mkdir()
    assert report.compare(tmp_path / "runs").empty
    assert "no finished experiment" in capsys.readouterr().out


# --- Grad-CAM ----------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """backbone: a fixed 'copy the input' conv + ReLU; head: global average pool + linear (class 0 likes bright)."""

    def __init__(self, as_list: bool = False) -> None:
        super().__init__()
        conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0  # channel 0 = the image
            conv.weight[1, 0, 1, 1] = -1.0  # channel 1 = its negative (ReLU keeps the dark parts)
        self.backbone = nn.Sequential(conv, nn.ReLU())
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
            self.head.bias.zero_()
        self.as_list = as_list

    def forward(self, x):
        f = self.backbone(x)
        if self.as_list:  # like smp encoders: one map per stage, the deepest last
            f = [x, f][-1]
        return self.head(f.mean(dim=(2, 3)))


def _square(size: int = 32, at: tuple[int, int] = (4, 20)) -> torch.Tensor:
    x = torch.full((1, 1, size, size), -0.2)
    y0, x0 = at
    x[..., y0 : y0 + 8, x0 : x0 + 8] = 1.0
    return x


def test_gradcam_points_at_the_evidence():
    model = TinyNet()
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen model still explains
    with GradCAM(model) as cam:
        maps, probs = cam(torch.cat([_square(at=(4, 20)), _square(at=(20, 2))]), 0)
        maps_dark, _ = cam(_square(at=(4, 20)), [1])
    assert maps.shape == (2, 32, 32) and probs.shape == (2, 2)
    assert 0.0 <= maps.min() and maps.max() == pytest.approx(1.0)
    for m, (y0, x0) in zip(maps, [(4, 20), (20, 2)]):
        mask = np.zeros(m.shape, bool)
        mask[y0 : y0 + 8, x0 : x0 + 8] = True
        assert m[mask].mean() > 0.8 and m[mask].mean() > 3 * m[~mask].mean()
        yy, xx = np.unravel_index(np.argmax(m), m.shape)
        assert y0 <= yy < y0 + 8 and x0 <= xx < x0 + 8
    # class 1 scores the dark background: its map is low on the square
    assert maps_dark[0, 4:12, 20:28].mean() < 0.1 < maps_dark[0, 24:, :16].mean()
    # hooks are gone after the with-block
    assert not model.backbone._forward_hooks
    model.eval()
    with GradCAM(model) as cam:
        cam(_square(), 0)
    assert not model.training  # the caller's mode is restored
    model.train()
    with GradCAM(model) as cam:
        cam(_square(), 0)
    assert model.training


def test_gradcam_on_list_outputs_and_errors():
    model = TinyNet(as_list=True)

    class ListBackbone(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return [x, self.inner(x)]

    wrapped = nn.Module()
    wrapped.backbone = ListBackbone(model.backbone)
    wrapped.head = model.head
    wrapped.forward = lambda x: wrapped.head(wrapped.backbone(x)[-1].mean(dim=(2, 3)))
    with GradCAM(wrapped) as cam:
        maps, _ = cam(_square(), 0)
    assert np.unravel_index(np.argmax(maps[0]), maps[0].shape)[0] < 12
    with pytest.raises(ValueError, match="backbone"):
        GradCAM(nn.Linear(2, 2))
    rgb = overlay(np.linspace(0, 1, 64 * 64).reshape(64, 64), maps[0])  # cam resized to the image
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8


def test_report_test_section(experiment):
    """With stage_2_test_labels.csv (the synthetic competition has it) first and second stage are scored on test."""
    cfg, layout, runs, _ = experiment
    meta = pd.read_csv(layout.work / "meta.csv")
    test = meta[meta["split"] == "test"][["image_id", "series_id"]].reset_index(drop=True)
    rng = np.random.default_rng(3)
    y = np.zeros((len(test), len(LABELS)), int)
    y[2:6, 0] = y[2:6, 5] = 1  # series ID_tser0: subdural on four slices
    long = [(f"{i}_{label}", int(y[r, k])) for r, i in enumerate(test["image_id"]) for k, label in enumerate(LABELS)]
    pd.DataFrame(long, columns=["ID", "Label"]).to_csv(layout.test_labels_csv, index=False)
    preds = {}
    for name, noise in (("predictions", 0.3), ("stack", 0.1)):
        p = np.clip(y * 0.7 + rng.random(y.shape) * noise, 0.01, 0.99)
        frame = pd.DataFrame(p, columns=list(LABELS))
        frame.insert(0, "image_id", test["image_id"])
        (runs / cfg.name / name).mkdir(parents=True, exist_ok=True)
        frame.to_csv(runs / cfg.name / name / "test.csv", index=False)
        preds[name] = frame
    index = report.make_report(cfg, layout, runs=runs, sections=["test"])
    page = index.read_text()
    assert "Series level on the test set, second stage" in page and "Section failed" not in page
    summary = json.loads((index.parent / "summary.json").read_text())
    first, stacked = summary["test"]
    truth = test.assign(**{label: y[:, k] for k, label in enumerate(LABELS)})
    for row, name in ((first, "predictions"), (stacked, "stack")):
        joined = ev.join_truth_pred(truth, preds[name])
        assert row["images"] == len(test)
        assert row["any"] == pytest.approx(ev.log_loss(joined["any"], joined["any_pred"]))
        assert row["series AUC (any)"] == pytest.approx(ev.series_table(joined).loc["any", "AUC"])
    assert stacked["weighted log loss"] < first["weighted log loss"]  # less noise, lower loss


@pytest.mark.slow
def test_gradcam_section_with_real_checkpoint_and_dataset(tmp_path):
    """The data layer's cache + SliceDataset and a checkpoint written the way training writes it (untrained
    tiny net, no ImageNet weights needed): both galleries render, from each image's own fold model."""
    from ich_kaggle.data import folds as folds_mod, preprocess, meta as meta_mod, synth
    from ich_kaggle.models import build_model
    from ich_kaggle.models.checkpoint import save_checkpoint

    data = synth.write_competition(tmp_path / "comp", seed=1, studies=6, slices=6, size=64)
    layout = Layout.of(data, tmp_path / "work")
    meta_mod.build_meta(layout, workers=1)
    folds = folds_mod.build_folds(layout, k=2, seed=0)
    preprocess.preprocess(layout, workers=1)
    cfg = config.load("tiny", ["cv.k=2", "cv.seed=0", "model.pretrained=false", "data.neighbors=1"])
    runs = tmp_path / "runs"
    torch.manual_seed(0)
    for fold in (0, 1):
        d = runs / cfg.name / f"fold{fold}"
        model = build_model(cfg.model, in_channels=cfg.data.in_channels)
        save_checkpoint(d / "best.pt", {"model": model.state_dict(), "config": cfg.to_dict()})
        config.dump(cfg, d / "config.yaml")
        val = folds[folds["fold"] == fold]
        rng = np.random.default_rng(fold)
        oof = pd.DataFrame(
            np.clip(val[list(LABELS)].to_numpy(float) * 0.6 + rng.random((len(val), 6)) * 0.4, 0.01, 0.99),
            columns=list(LABELS),
        )
        oof.insert(0, "image_id", val["image_id"].to_numpy())
        oof.to_csv(d / "oof.csv", index=False)
    index = report.make_report(cfg, layout, runs=runs, gradcam=3, sections=["gradcam"])
    page = index.read_text()
    assert "Section failed" not in page and "missing" not in page, page
    assert {p.name for p in check_page(index)} == {"gradcam_positives.png", "gradcam_errors.png"}
    img = cv2.imread(str(index.parent / "gradcam_positives.png"))
    assert img.shape[1] > 3 * img.shape[0] / 2  # three pairs side by side


def test_cli_report_and_compare(tmp_path, capsys):
    """`python -m ich_kaggle report/compare`: flags reach the report, errors are one line with exit code 2."""
    from ich_kaggle import cli

    cfg = config.load("tiny")
    runs = tmp_path / "runs"
    folds = fake_data(tmp_path / "unused")
    fake_run(runs / cfg.name, folds[folds["fold"] == 0])
    common = experiment_args("tiny", tmp_path / "nodata", tmp_path / "nowork", runs)
    assert cli.main(["report", *common, "--threshold", "0.3", "--gradcam", "0"]) == 0
    summary = json.loads((runs / cfg.name / "report" / "summary.json").read_text())
    assert summary["threshold"] == 0.3 and summary["folds_done"] == 1
    assert cli.main(["compare", "--runs", str(runs)]) == 0
    assert "tiny" in capsys.readouterr().out
    assert cli.main(["report", *common[:-1], str(tmp_path / "elsewhere")]) == 2
    assert cli.main(["report", *common, "--threshold", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_curves_with_a_label_without_positives(tmp_path):
    """A fold set with no epidural slice at all (common on small data): the panels say so instead of failing."""
    from ich_kaggle.report import plots

    folds = fake_data(tmp_path / "work", series=6)
    folds["epidural"] = 0
    rng = np.random.default_rng(0)
    pred = folds[["image_id"]].assign(**{label: rng.random(len(folds)) for label in LABELS})
    joined = ev.join_truth_pred(folds, pred)
    series = ev.series_frame(joined)
    for path in (
        plots.roc_grid(joined, series, tmp_path / "roc.png"),
        plots.pr_grid(joined, series, 0.5, tmp_path / "pr.png"),
        plots.f1_bars(ev.threshold_table(joined), 0.5, tmp_path / "f1.png"),
    ):
        img = cv2.imread(str(path))
        assert img is not None and img.std() > 10
    assert np.isnan(ev.threshold_table(joined).loc["epidural", "BEST_THR"])


# --- an ensemble's one page, readable figures, galleries -----------------------------------------------------


def test_ensemble_report_is_one_page_with_members_ensemble_stack_and_choice(tmp_path):
    """`make report CONFIG=demo`: one page for what was submitted, each member described as its folds recorded it."""
    data = tmp_path / "data"
    data.mkdir()
    layout = Layout.of(data, tmp_path / "work")
    folds = fake_data(layout.work)
    cfg = config.load("demo")
    runs = tmp_path / "runs"
    for seed, name in enumerate(("tiny", "tiny_bone")):
        fake_run(runs / name, folds, seed=seed, epochs=1)
        for k in range(3):  # the config each fold trained with: 1 epoch, not the shipped file's
            trained = config.load(name, ["cv.k=3", "train.epochs=1"])
            config.dump(trained, runs / name / f"fold{k}" / "config.yaml")
    ens = runs / cfg.name
    oof = pd.concat([pd.read_csv(runs / "tiny" / f"fold{k}" / "oof.csv") for k in range(3)])
    (ens / "predictions").mkdir(parents=True)
    oof.to_csv(ens / "predictions" / "oof.csv", index=False)
    (ens / "predictions" / "ensemble.json").write_text(
        json.dumps(
            {
                "members": [{"name": "tiny", "run": "tiny"}, {"name": "tiny_bone", "run": "tiny_bone"}],
                "combine": "logit",
                "weights": [0.5, 0.5],
                "oof_weighted_log_loss": {"tiny": 0.2, "tiny_bone": 0.25, "ensemble": 0.19},
            }
        )
    )
    fake_stack(ens, folds)
    (ens / "choice.json").write_text(
        json.dumps(
            {"stage": "stacked", "test": "x", "oof": "y", "oof_log_loss": {"first_stage": 0.19, "stacked": 0.17}}
        )
    )
    index = report.make_report(cfg, layout, runs=runs, sections=["summary", "choice", "series"])
    assert index == ens / "report" / "index.html"
    assert not (runs / "tiny" / "report").exists() and not (runs / "tiny_bone" / "report").exists()
    page = index.read_text().replace("&#x27;", "'")
    assert "Ensemble 'demo'" in page and "combined by the mean of logits" in page
    for name in ("tiny", "tiny_bone"):
        assert f"'{name}' as trained" in page
    assert "1 epoch(s)" in page and "2 epoch(s)" not in page  # as trained, not the shipped config (2 epochs)
    assert re.search(r"<td>tiny</td>\s*<td>[^<]+</td>\s*<td>64</td>\s*<td>1</td>\s*<td>3/3</td>", page)
    assert "Second stage (" in page and "make submit chose the second (stacked) stage" in page
    assert "first_stage 0.19000, stacked 0.17000" in page
    assert "AUC (95% CI)" in page and re.search(r"0\.\d{3} \[0\.\d{3}, [01]\.\d{3}\]", page)
    summary = json.loads((index.parent / "summary.json").read_text())
    assert summary["submitted"] == "stacked" and summary["members"] == {"tiny": 3, "tiny_bone": 3}
    lo, hi = summary["series_auc_any_ci"]
    assert lo <= summary["series_auc_any"] <= hi
    from ich_kaggle.report import intervals

    rng = np.random.default_rng(1)
    y, p = rng.random(60) < 0.3, np.round(rng.random(60), 1)  # ties: the bootstrap's fast AUC is the report's AUC
    assert intervals.rank_auc(y, p) == pytest.approx(ev.roc_auc(y, p))


def test_gradcam_captions_are_set_at_page_size():
    from ich_kaggle.report import plots

    image = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    examples = [
        plots.CamExample(
            image,
            (np.dstack([image] * 3) * 255).astype(np.uint8),
            f"ID_{i:09d}, fold 0\nany p 0.9{i}\nsubdural: truth 1, p 0.8{i}",
            "Grad-CAM, model p 0.91\nred raises the score",
        )
        for i in range(8)
    ]
    fig = plots.gallery_figure(examples, "Most confident true positives")
    sizes = plots.displayed_text_px(fig)
    assert len(sizes) >= 17 and min(sizes) >= plots.MIN_TEXT_PX  # 16 captions + the title, none shrunk below


def test_true_positive_gallery_holds_only_positives_above_the_threshold():
    rng = np.random.default_rng(0)
    n = 200
    truth = (rng.random(n) < 0.2).astype(int)
    p = np.where(truth == 1, rng.random(n) * 0.6, rng.random(n) * 0.9)  # many positives predicted low
    joined = pd.DataFrame(
        {
            "image_id": [f"ID_{i}" for i in range(n)],
            "any": truth,
            ev.pred_col("any"): p,
            **{label: 0 for label in SUBTYPES},
            **{ev.pred_col(label): 0.1 for label in SUBTYPES},
        }
    )
    chosen = report.true_positives(joined, 0.5, 8)
    assert len(chosen) and (chosen["any"] == 1).all() and (chosen[ev.pred_col("any")] >= 0.5).all()
    assert len(chosen) == min(8, int(((truth == 1) & (p >= 0.5)).sum()))
    assert report.true_positives(joined, 0.99, 8).empty  # no positive that sure: an empty gallery, not low ones
