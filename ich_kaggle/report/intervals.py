"""Uncertainty and calibration for the report: bootstrap intervals where samples are few (a few dozen CT series
make an AUC of 0.9 anything from 0.8 to 1.0), and reliability bins (are the probabilities the frequencies?).

Beside `evaluation` (the point metrics), which these functions call and never change.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from ..core.labels import LABELS
from . import evaluation as ev

N_BOOT = 1000
FEW = 2000  # below this many samples a point estimate is shown with its 95 % interval


def rank_auc(y_true, y_prob) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half, as `evaluation.roc_auc`): one sort, so a thousand
    bootstrap resamples of a series table take milliseconds; NaN when only one class is present."""
    y, p = np.asarray(y_true, float) > 0.5, np.asarray(y_prob, float)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    values, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    below = np.cumsum(counts) - counts
    ranks = (below + (counts + 1) / 2)[inverse]  # average rank of tied scores
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_ci(
    y_true, y_prob, metric: Callable = rank_auc, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric` over resampled (truth, probability) pairs; resamples with a single
    class (no AUC) are left out; (NaN, NaN) when the metric is undefined on the data itself."""
    y, p = np.asarray(y_true, float), np.asarray(y_prob, float)
    if len(y) == 0 or not np.isfinite(metric(y, p)):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        v = metric(y[idx], p[idx])
        if np.isfinite(v):
            values.append(v)
    if len(values) < n_boot // 10:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def series_auc_intervals(series: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per label: series-level AUC with its bootstrap 95 % interval (rows: LABELS; columns AUC, AUC_LO, AUC_HI, n)."""
    rows = []
    for label in LABELS:
        y, p = series[label].to_numpy(float), series[ev.pred_col(label)].to_numpy(float)
        lo, hi = bootstrap_ci(y, p, rank_auc, n_boot, seed)
        rows.append(
            {
                "label": label,
                "AUC": ev.roc_auc(y, p),
                "AUC_LO": lo,
                "AUC_HI": hi,
                "n": len(y),
                "positives": int(y.sum()),
            }
        )
    return pd.DataFrame(rows).set_index("label")


def with_intervals(formatted: pd.DataFrame, intervals: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """A formatted series table whose AUC column reads 'auc [lo, hi]' (the 95 % bootstrap interval)."""
    out = formatted.copy()
    out["AUC (95% CI)"] = [
        "-"
        if pd.isna(r.AUC)
        else (
            f"{r.AUC:.{digits}f}"
            if pd.isna(r.AUC_LO)
            else f"{r.AUC:.{digits}f} [{r.AUC_LO:.{digits}f}, {r.AUC_HI:.{digits}f}]"
        )
        for r in intervals.loc[out.index].itertuples()
    ]
    return out.drop(columns=["AUC"])


def calibration_bins(y_true, y_prob, bins: int = 10) -> pd.DataFrame:
    """Reliability diagram data: per probability bin (equal width), mean predicted probability, observed frequency
    and count; empty bins are dropped."""
    y, p = np.asarray(y_true, float), np.clip(np.asarray(y_prob, float), 0.0, 1.0)
    which = np.minimum((p * bins).astype(int), bins - 1)
    frame = pd.DataFrame({"bin": which, "p": p, "y": y})
    out = frame.groupby("bin").agg(predicted=("p", "mean"), observed=("y", "mean"), n=("y", "size")).reset_index()
    return out


def expected_calibration_error(y_true, y_prob, bins: int = 10) -> float:
    """Count-weighted mean |observed - predicted| over the bins (0: perfectly calibrated)."""
    table = calibration_bins(y_true, y_prob, bins)
    if table["n"].sum() == 0:
        return float("nan")
    return float(np.average((table["observed"] - table["predicted"]).abs(), weights=table["n"]))
