"""Quality figures behind two defaults, measured on the demo's synthetic competition (CPU, `tiny`, 3 folds):
which TTA views to average, and whether to average the weights (`train.ema`). Not speed: each figure is a
weighted log loss, on the first-stage OOF predictions and on the synthetic test labels.

The member is trained with `augment.transpose=0.5` so that every registered view is one it saw in training; once
with the raw weights and once with `train.ema`. Each trained member is then predicted with every view set; the
runs live in a temporary folder. About 5-8 minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

from ..core import config
from ..core.layout import Layout, Run

TRAIN = ["cv.k=3", "train.max_images_per_epoch=400", "augment.transpose=0.5", "data.num_workers=0"]
VIEWS = {  # name -> tta.transforms
    "none": ["identity"],
    "hflip": ["identity", "hflip"],
    "flips_transposes": ["identity", "hflip", "transpose", "hflip_transpose"],
    "flips_shifts": ["identity", "hflip", "shift", "shift_back", "scale"],
    "all": ["identity", "hflip", "transpose", "hflip_transpose", "shift", "shift_back", "scale"],
}
EMA = 0.99


def _loss(path: Path, truth_csv: Path) -> float:
    import pandas as pd

    from ..core import metrics
    from ..core.labels import read_labels

    pred = pd.read_csv(path)
    truth = read_labels(truth_csv)
    return metrics.score_frames(truth[truth["image_id"].isin(pred["image_id"])], pred)["weighted_log_loss"]


def bench_choices(_mini: Path | None) -> None:
    from .. import train
    from ..data import folds, preprocess, synth
    from ..predict import stage as predict

    with tempfile.TemporaryDirectory() as tmp:
        data = synth.write_competition(Path(tmp) / "comp", **synth.DEMO)
        layout = Layout.of(data, Path(tmp) / "work")
        for averaging, extra in (("raw", []), ("ema", [f"train.ema={EMA}"])):
            runs = Path(tmp) / f"runs_{averaging}"
            cfg = config.load("tiny", [*TRAIN, *extra])
            with contextlib.redirect_stdout(io.StringIO()):
                folds.fold_table(layout, cfg.cv)
                preprocess.ensure(layout)
                for fold in config.selected_folds(cfg.cv):
                    train.train_fold(cfg, layout, fold, runs=runs)
            for name, views in VIEWS.items():
                run = Run.of(runs, cfg.name)
                viewed = config.load("tiny", [*TRAIN, *extra, f"tta.transforms=[{','.join(views)}]"])
                with contextlib.redirect_stdout(io.StringIO()):
                    predict.predict(viewed, layout, runs=runs)
                oof = _loss(run.predictions.oof, layout.train_csv)
                test = _loss(run.predictions.test, layout.test_labels_csv)
                print(f"choice_{averaging}_tta_{name}_oof_log_loss: {oof:.5f}")
                print(f"choice_{averaging}_tta_{name}_test_log_loss: {test:.5f}")
