"""Threshold and series-level metrics for the report (sklearn.metrics, numpy, pandas; no torch).

The competition scores slices with a weighted log loss; clinicians read whole CT series and want counts,
precision and recall at a decision threshold. This module gives both views from one wide frame:

- `roc_points` / `pr_points` / `roc_auc` / `average_precision` / `best_f1`: per-label ranking metrics on slices.
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
from sklearn import metrics as skm

from ..core import metrics
from ..core.labels import LABELS
from ..core.errors import UserError

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


# --- binary metrics on one label (sklearn.metrics; NaNs dropped, one class present answered with NaN) ---------------


def _binary(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_prob has {p.size}")
    keep = ~(np.isnan(y) | np.isnan(p))
    return (y[keep] > 0.5).astype(np.int64), p[keep]


def _both_classes(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < y.size


def roc_points(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0) to (1, 1), one point per distinct score."""
    y, p = _binary(y_true, y_prob)
    if not _both_classes(y):  # no curve (roc_auc is NaN): callers check it first
        return np.array([0.0, np.nan]), np.array([0.0, np.nan])
    fpr, tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    return fpr, tpr


def pr_points(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision), starting at recall 0 with precision 1 and stopping where recall first reaches 1
    (lower thresholds only add false positives; drawing them is a misleading vertical drop)."""
    y, p = _binary(y_true, y_prob)
    if not y.sum():
        return np.array([0.0]), np.array([1.0])
    precision, recall, _ = skm.precision_recall_curve(y, p)
    precision, recall = precision[::-1], recall[::-1]  # sklearn ends at (recall 0, precision 1): start there
    stop = int(np.argmax(recall >= 1.0)) + 1
    return recall[:stop], precision[:stop]


def roc_auc(y_true, y_prob) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    y, p = _binary(y_true, y_prob)
    return float(skm.roc_auc_score(y, p)) if _both_classes(y) else float("nan")


def average_precision(y_true, y_prob) -> float:
    """Step-wise area under the precision-recall curve: sum of (R_n - R_{n-1}) * P_n; NaN without positives."""
    y, p = _binary(y_true, y_prob)
    return float(skm.average_precision_score(y, p)) if y.sum() else float("nan")


def best_f1(y_true, y_prob) -> tuple[float, float]:
    """(threshold, F1) maximising F1 over every distinct score (the highest threshold on a tie); (NaN, 0) without
    positives."""
    y, p = _binary(y_true, y_prob)
    if not y.sum():
        return float("nan"), 0.0
    precision, recall, thresholds = skm.precision_recall_curve(y, p)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    i = len(f1) - 1 - int(np.argmax(f1[::-1]))  # thresholds rise: the last maximum is the highest threshold
    return float(thresholds[i]), float(f1[i])


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
    tn, fp, fn, tp = skm.confusion_matrix(y, (p >= threshold).astype(np.int64), labels=[0, 1]).ravel()
    return Confusion(tp=int(tp), fp=int(fp), tn=int(tn), fn=int(fn))


def log_loss(y_true, y_prob) -> float:
    """Mean binary cross-entropy, clipped as the competition metric clips (`core.metrics.bce`)."""
    y, p = _binary(y_true, y_prob)
    return float(metrics.bce(y, p).mean()) if y.size else float("nan")


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
        rows.append(
            {
                "label": label,
                "POS": cm.tp + cm.fn,
                "NEG": cm.tn + cm.fp,
                "AUC": roc_auc(y, p),
                "AP": average_precision(y, p),
                "LOG_LOSS": log_loss(y, p),
                "PREC": cm.precision,
                "REC": cm.recall,
                "F1": cm.f1,
                "BEST_THR": thr,
                "BEST_F1": f1,
            }
        )
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
        rows.append(
            {
                "Hemorrhage subtype": label,
                "POS": cm.tp + cm.fn,
                "NEG": cm.tn + cm.fp,
                "POS_FRAC": (cm.tp + cm.fn) / n if n else float("nan"),
                "ACC": cm.accuracy,
                "PREC": cm.precision,
                "REC": cm.recall,
                "AUC": roc_auc(y, p),
                "LOG_LOSS": log_loss(y, p),
            }
        )
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
