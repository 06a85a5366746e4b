"""`make demo`: the whole pipeline, stage by stage, on the synthetic mini-competition (or any Kaggle-layout folder).

synth -> meta -> folds -> cache -> train every fold -> predict with TTA -> stack -> submit -> score.
Ends with three lines (prior / first stage / stacked log loss), scored on the test labels when the data folder has
`stage_2_test_labels.csv`, otherwise on the out-of-fold predictions.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from .core.labels import LABELS
from .core import config
from .core.layout import Layout, Run, work_name

SYNTH_DIR = Path("data/synth")


def _prior_frame(ids: pd.Series, prior: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(np.repeat(prior[None, :], len(ids), axis=0), columns=list(LABELS))
    frame.insert(0, "image_id", ids.to_numpy())
    return frame


def scores(layout: Layout, run: Run) -> dict[str, float]:
    """Prior-only, first-stage and stacked weighted log loss, on test labels if present else OOF."""
    from .core import metrics
    from .core.labels import read_labels

    train_labels = read_labels(layout.train_csv)
    prior = train_labels[list(LABELS)].to_numpy(float).mean(axis=0)
    if layout.test_labels_csv.exists():
        truth, first, stacked = read_labels(layout.test_labels_csv), run.predictions.test, run.stack.test
    else:
        truth, first, stacked = train_labels, run.predictions.oof, run.stack.oof
    first_df = pd.read_csv(first)
    truth = truth[truth["image_id"].isin(first_df["image_id"])]
    out = {"prior_log_loss": metrics.score_frames(truth, _prior_frame(truth["image_id"], prior))["weighted_log_loss"],
           "first_stage_log_loss": metrics.score_frames(truth, first_df)["weighted_log_loss"]}
    out["stacked_log_loss"] = metrics.score_frames(truth, pd.read_csv(stacked))["weighted_log_loss"]
    return out


def run(data: str | None = None, config_name: str = "tiny", runs: str | None = None, work: str | None = None,
        overrides: list[str] | None = None) -> dict[str, float]:
    from .predict import stage as predict
    from .stack import stage as stack
    from .submit import stage as submission
    from . import train
    from .data import folds, preprocess, synth

    start = time.time()
    cfg = config.load(config_name, overrides)
    if data is None:
        data_dir = SYNTH_DIR
        if not (data_dir / "stage_2_train.csv").exists():
            print(f"[demo] writing the synthetic mini-competition to {data_dir}")
            synth.write_competition(data_dir, seed=0)
    else:
        data_dir = Path(data)
    layout = Layout.of(data_dir, work)
    layout.require_data()
    # one runs folder per data folder: folds trained on one competition must never be reused on another
    runs = runs or str(Path("runs/demo") / work_name(layout.data))

    print(f"[demo] data {layout.data}  work {layout.work}  config {cfg.name}  runs {runs}")
    folds.fold_table(layout, cfg.cv)
    preprocess.ensure(layout)
    for fold in folds.selected_folds(cfg.cv):
        print(f"[demo] training fold {fold} of {cfg.cv.k}")
        train.train_fold(cfg, layout, int(fold), runs=runs)
    predict.predict(cfg, layout, runs=runs)
    stack.stack(cfg, layout, runs=runs)
    out_file = submission.submit(cfg, layout, runs=runs)

    result = scores(layout, Run.of(runs, cfg.name))
    where = "test labels" if layout.test_labels_csv.exists() else "out-of-fold predictions"
    print(f"[demo] submission {out_file}; scored on the {where}; wall time {time.time() - start:.0f} s")
    for key, value in result.items():
        print(f"{key}: {value:.5f}")
    return result
