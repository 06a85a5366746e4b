"""Reading what the stages wrote into runs/<name>/ (fold logs, OOF files, done.json, the trained split) and the
labels/meta tables; shared by the report and `compare`. Broken files are skipped with a warning, never fatal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..core import metrics
from ..core.labels import LABEL_WEIGHTS, LABELS
from . import evaluation as ev
from ..core.config import Config
from ..core.errors import UserError
from ..core.layout import FoldRun, Layout, Run

log = logging.getLogger(__name__)

SUMMARY = "summary.json"  # in runs/<config>/report/


def fold_dirs(run: Path) -> dict[int, FoldRun]:
    """fold<k>/ folders of a run, by fold number."""
    return Run(run).folds()


def fold_done(d: FoldRun) -> bool:
    """A fold is finished once training wrote done.json."""
    return d.done.exists()


def read_done(d: FoldRun) -> dict:
    try:
        return json.loads(d.done.read_text()) if d.done.exists() else {}
    except ValueError:
        log.warning("%s unreadable; ignored", d.done)
        return {}


def read_logs(run: Path) -> dict[int, pd.DataFrame]:
    """Each fold's log.csv (unreadable or empty ones are reported and skipped)."""
    logs = {}
    for fold, d in fold_dirs(run).items():
        path = d.log_csv
        if not path.exists():
            continue
        try:
            frame = pd.read_csv(path)
        except Exception as e:
            log.warning("%s unreadable (%s); skipped", path, e)
            continue
        if len(frame) and "epoch" in frame:
            logs[fold] = frame
    return logs


def _read_pred(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    missing = [c for c in ("image_id", *LABELS) if c not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks columns {missing}; expected image_id + {', '.join(LABELS)} probabilities")
    return frame


def read_oof(run: Path, problems: list[str] | None = None) -> tuple[pd.DataFrame | None, str]:
    """(OOF predictions, where they came from): predictions/oof.csv (TTA) if present, else every fold's oof.csv.

    A broken fold file is skipped (and described in `problems`), so one bad fold leaves the others usable."""
    path = Run(run).predictions.oof
    if path.exists():
        return _read_pred(path), str(path)
    parts = [d.oof for d in fold_dirs(run).values() if d.oof.exists()]
    if not parts:
        return None, f"no {path} and no {run}/fold*/oof.csv"
    frames, used = [], []
    for part in parts:
        try:
            frames.append(_read_pred(part))
            used.append(part.parent.name)
        except (UserError, ValueError, OSError, pd.errors.ParserError) as e:
            (problems if problems is not None else []).append(f"{part} skipped: {e}")
    if not frames:
        return None, f"no readable {run}/fold*/oof.csv"
    frame = pd.concat(frames, ignore_index=True).drop_duplicates("image_id", keep="last")
    return frame, f"{len(used)} fold oof.csv file(s): " + ", ".join(used)


def trained_cv(run: Path) -> tuple[int, int] | None:
    """(cv.k, cv.seed) the folds were trained with, from the first fold's resolved config.yaml."""
    for d in fold_dirs(run).values():
        path = d.config
        if path.exists():
            try:
                cv = (yaml.safe_load(path.read_text()) or {}).get("cv", {})
                return int(cv["k"]), int(cv["seed"])
            except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError):
                log.warning("%s has no readable cv.k/cv.seed", path)
    return None


def read_labels(cfg: Config, layout: Layout, cv: tuple[int, int] | None = None) -> tuple[pd.DataFrame | None, str]:
    """The folds table (labels, series ids, fold of each image) via the data layer; the folds.csv as fallback."""
    k, seed = cv or (cfg.cv.k, cfg.cv.seed)
    try:
        from ..data.folds import load_folds

        return load_folds(layout, k=k, seed=seed), f"{layout.folds_csv} (k={k}, seed={seed})"
    except Exception as e:
        if layout.folds_csv.exists():
            return pd.read_csv(layout.folds_csv), f"{layout.folds_csv} (as written; rebuilding failed: {e})"
        return None, f"labels unavailable: {e}"


def read_meta(layout: Layout) -> tuple[pd.DataFrame | None, str]:
    if layout.meta_csv.exists():
        return pd.read_csv(layout.meta_csv), str(layout.meta_csv)
    try:
        from ..data.meta import load_meta

        return load_meta(layout), str(layout.meta_csv)
    except Exception as e:
        return None, f"no {layout.meta_csv} and it could not be built: {e}"


def weighted_bce(frame: pd.DataFrame) -> np.ndarray:
    """Per-image competition loss (any x2), to rank the worst errors."""
    y = frame[list(LABELS)].to_numpy(float)
    p = frame[[ev.pred_col(label) for label in LABELS]].to_numpy(float)
    w = np.asarray(LABEL_WEIGHTS)
    return (metrics.bce(y, p) * w).sum(axis=1) / w.sum()


def oof_scores(joined: pd.DataFrame) -> dict:
    """Competition metric on the joined OOF frame through `metrics` (the one scorer everybody uses)."""
    truth = joined[["image_id", *LABELS]]
    pred = joined[["image_id", *(ev.pred_col(label) for label in LABELS)]].rename(
        columns={ev.pred_col(label): label for label in LABELS}
    )
    return metrics.score_frames(truth, pred)
