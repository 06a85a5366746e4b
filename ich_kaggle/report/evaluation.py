"""Threshold and series-level metrics for the report (numpy/pandas only, no torch, no sklearn).

The competition scores slices with a weighted log loss; clinicians read whole CT series and want counts,
precision and recall at a decision threshold. This module gives both views from one wide frame:

- `curves` / `roc_auc` / `average_precision` / `best_f1`: per-label ranking metrics on slices.
- `threshold_table`: per label POS/NEG, AUC, AP, F1 at a fixed threshold and at the best-F1 threshold.
- `series_table`: the series-level table of Danilov, Kotik et al. (POS, NEG, ACC, PREC, REC, AUC, LOG_LOSS),
  where a series is positive when any slice is and its probability is the max over its slices.

Frames follow one convention: truth in the six `LABELS` columns, probabilities in `<label>_pred` columns
(`join_truth_pred` builds that from the toolkit's wide CSVs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core.labels import LABELS
from ..core.errors import UserError

EPS = 1e-15  # probability clip for log loss (the usual sklearn/Kaggle convention)
PRED_SUFFIX = "_pred"


def pred_col(label: str) -> str:
    return f"{label}{PRED_SUFFIX}"


def join_truth_pred(truth: pd.DataFrame, pred: pd.DataFrame, keep: tuple[str, ...] = ("series_id",)) -> pd.DataFrame:
    """Inner-join truth (image_id + LABELS [+ series_id...]) and predictions (image_id + LABELS) on image_id."""
    for name, frame in (("truth", truth), ("predictions", pred)):
        missing = [c for c in ("image_id", *LABELS) if c not in frame.columns]
        if missing:
            raise UserError(f"{name} frame lacks columns {missing}; expected image_id + {', '.join(LABELS)}")
    extra = [c for c in keep if c in truth.columns]
    left = truth[["image_id", *extra, *LABELS]]
    right = pred[["image_id", *LABELS]].rename(columns={label: pred_col(label) for label in LABELS})
    return left.merge(right, on="image_id", how="inner")


# --- binary metrics on one label ---------------------------------------------------------------------------


@dataclass
class Curves:
    """Every operating point of a scorer, highest threshold first (a point predicts positive when p >= threshold)."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    positives: int
    negatives: int

    @property
    def tpr(self) -> np.ndarray:
        return self.tp / self.positives if self.positives else np.full(len(self.tp), np.nan)

    @property
    def fpr(self) -> np.ndarray:
        return self.fp / self.negatives if self.negatives else np.full(len(self.fp), np.nan)

    @property
    def precision(self) -> np.ndarray:
        return self.tp / np.maximum(self.tp + self.fp, 1)

    @property
    def recall(self) -> np.ndarray:
        return self.tpr

    @property
    def f1(self) -> np.ndarray:
        fn = self.positives - self.tp
        denom = 2 * self.tp + self.fp + fn
        return np.where(denom > 0, 2 * self.tp / np.maximum(denom, 1), 0.0)


def _binary(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_prob has {p.size}")
    keep = ~(np.isnan(y) | np.isnan(p))
    return (y[keep] > 0.5).astype(np.int64), p[keep]


def curves(y_true, y_prob) -> Curves:
    """Cumulative TP/FP at every distinct score, so ties move together (as a threshold would)."""
    y, p = _binary(y_true, y_prob)
    order = np.argsort(-p, kind="mergesort")
    y, p = y[order], p[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(p)), y.size - 1] if y.size else np.array([], dtype=np.int64)
    tp = np.cumsum(y)[last_of_run]
    fp = (np.arange(1, y.size + 1) - np.cumsum(y))[last_of_run]
    return Curves(thresholds=p[last_of_run], tp=tp.astype(np.int64), fp=fp.astype(np.int64),
                  positives=int(y.sum()), negatives=int(y.size - y.sum()))


def roc_points(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0) to (1, 1)."""
    c = curves(y_true, y_prob)
    return np.r_[0.0, c.fpr], np.r_[0.0, c.tpr]


def pr_points(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision), starting at recall 0 with precision 1 and stopping where recall first reaches 1
    (lower thresholds only add false positives; drawing them is a misleading vertical drop)."""
    c = curves(y_true, y_prob)
    stop = int(np.argmax(c.tp >= c.positives)) + 1 if c.positives and c.tp.size else c.tp.size
    return np.r_[0.0, c.recall[:stop]], np.r_[1.0, c.precision[:stop]]


def roc_auc(y_true, y_prob) -> float:
    """Area under the ROC curve (trapezoids, ties count half); NaN when only one class is present."""
    c = curves(y_true, y_prob)
    if c.positives == 0 or c.negatives == 0:
        return float("nan")
    fpr, tpr = np.r_[0.0, c.fpr], np.r_[0.0, c.tpr]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(y_true, y_prob) -> float:
    """Step-wise area under the precision-recall curve: sum of (R_n - R_{n-1}) * P_n; NaN without positives."""
    c = curves(y_true, y_prob)
    if c.positives == 0:
        return float("nan")
    recall = np.r_[0.0, c.recall]
    return float(np.sum(np.diff(recall) * c.precision))


def best_f1(y_true, y_prob) -> tuple[float, float]:
    """(threshold, F1) maximising F1 over every distinct score; (NaN, 0) without positives."""
    c = curves(y_true, y_prob)
    if c.positives == 0 or c.thresholds.size == 0:
        return float("nan"), 0.0
    i = int(np.argmax(c.f1))
    return float(c.thresholds[i]), float(c.f1[i])


@dataclass
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def accuracy(self) -> float:
        n = self.tp + self.fp + self.tn + self.fn
        return (self.tp + self.tn) / n if n else float("nan")

    @property
    def precision(self) -> float:
        """0 when nothing is predicted positive (nothing found is no precision)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else float("nan")

    @property
    def f1(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 0.0

    def matrix(self) -> np.ndarray:
        """[[TN, FP], [FN, TP]]: rows truth (neg, pos), columns prediction (neg, pos)."""
        return np.array([[self.tn, self.fp], [self.fn, self.tp]], dtype=np.int64)


def confusion(y_true, y_prob, threshold: float = 0.5) -> Confusion:
    """Counts at `p >= threshold` predicted positive."""
    y, p = _binary(y_true, y_prob)
    hat = p >= threshold
    pos = y == 1
    return Confusion(tp=int(np.sum(hat & pos)), fp=int(np.sum(hat & ~pos)),
                     tn=int(np.sum(~hat & ~pos)), fn=int(np.sum(~hat & pos)))


def log_loss(y_true, y_prob) -> float:
    """Mean binary cross-entropy with probabilities clipped to [EPS, 1 - EPS]."""
    y, p = _binary(y_true, y_prob)
    if y.size == 0:
        return float("nan")
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


# --- tables over the six labels ----------------------------------------------------------------------------


def _check(frame: pd.DataFrame, need_series: bool = False) -> None:
    cols = [*LABELS, *(pred_col(label) for label in LABELS)] + (["series_id"] if need_series else [])
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise UserError(f"evaluation frame lacks columns {missing}; build it with evaluation.join_truth_pred")


def threshold_table(frame: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Per label: POS, NEG, AUC, AP, LOG_LOSS, PREC/REC/F1 at `threshold`, and the best-F1 threshold and its F1."""
    _check(frame)
    rows = []
    for label in LABELS:
        y, p = frame[label].to_numpy(), frame[pred_col(label)].to_numpy()
        cm = confusion(y, p, threshold)
        thr, f1 = best_f1(y, p)
        rows.append({
            "label": label, "POS": cm.tp + cm.fn, "NEG": cm.tn + cm.fp,
            "AUC": roc_auc(y, p), "AP": average_precision(y, p), "LOG_LOSS": log_loss(y, p),
            "PREC": cm.precision, "REC": cm.recall, "F1": cm.f1,
            "BEST_THR": thr, "BEST_F1": f1,
        })
    return pd.DataFrame(rows).set_index("label")


def series_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per CT series: truth = any slice positive, probability = max over slices (Danilov/Kotik)."""
    _check(frame, need_series=True)
    cols = [*LABELS, *(pred_col(label) for label in LABELS)]
    out = frame.groupby("series_id", sort=True)[cols].max()
    out["slices"] = frame.groupby("series_id", sort=True).size()
    return out.reset_index()


def series_table(frame: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Series-level clinical table: per label POS, NEG, POS_FRAC, ACC, PREC, REC, AUC, LOG_LOSS over CT series.

    `frame` holds slices: series_id, truth LABELS and `<label>_pred` probabilities. A series is positive for a label
    when any of its slices is, its probability is the max over its slices, and it is predicted positive when that
    probability is >= `threshold`. Rows follow `LABELS` (`any` first), indexed by "Hemorrhage subtype".
    """
    series = series_frame(frame)
    rows = []
    for label in LABELS:
        y, p = series[label].to_numpy(), series[pred_col(label)].to_numpy()
        cm = confusion(y, p, threshold)
        n = cm.tp + cm.fp + cm.tn + cm.fn
        rows.append({
            "Hemorrhage subtype": label, "POS": cm.tp + cm.fn, "NEG": cm.tn + cm.fp,
            "POS_FRAC": (cm.tp + cm.fn) / n if n else float("nan"),
            "ACC": cm.accuracy, "PREC": cm.precision, "REC": cm.recall,
            "AUC": roc_auc(y, p), "LOG_LOSS": log_loss(y, p),
        })
    return pd.DataFrame(rows).set_index("Hemorrhage subtype")


def format_series_table(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The paper's presentation: POS/NEG as 'count (percent)', metrics rounded."""
    out = pd.DataFrame(index=table.index)
    n = table["POS"] + table["NEG"]
    out["POS"] = [f"{int(c)} ({c / t:.0%})" if t else "0" for c, t in zip(table["POS"], n)]
    out["NEG"] = [f"{int(c)} ({c / t:.0%})" if t else "0" for c, t in zip(table["NEG"], n)]
    for col in ("ACC", "PREC", "REC", "AUC", "LOG_LOSS"):
        out[col] = [("-" if pd.isna(v) else f"{v:.{digits}f}") for v in table[col]]
    return out
