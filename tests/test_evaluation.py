"""evaluation.py against small cases worked out by hand (and sklearn as a second opinion)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ich_kaggle.core.labels import LABELS
from ich_kaggle.report import evaluation as ev
from ich_kaggle.core.errors import UserError

Y = [1, 0, 1, 0, 0, 1]
P = [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]


def test_roc_auc_by_hand():
    # positives 0.9, 0.7, 0.1; negatives 0.8, 0.3, 0.2: pairs won = 3 + 2 + 0 = 5 of 9
    assert ev.roc_auc(Y, P) == pytest.approx(5 / 9)
    # a tie between a positive and a negative counts half
    assert ev.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert ev.roc_auc([1, 1, 0], [0.5, 0.9, 0.5]) == pytest.approx((1 + 0.5) / 2)
    assert math.isnan(ev.roc_auc([0, 0], [0.1, 0.2]))


def test_average_precision_by_hand():
    # ranks of positives 1, 3, 6 -> precisions 1, 2/3, 3/6, each recall step 1/3
    assert ev.average_precision(Y, P) == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert math.isnan(ev.average_precision([0, 0], [0.3, 0.4]))


def test_best_f1_by_hand():
    # thr 0.9: tp1 fp0 fn2 -> 2/4=.5; thr 0.7: tp2 fp1 fn1 -> 4/6=.667; thr 0.1: tp3 fp3 -> 6/9=.667 (first kept)
    thr, f1 = ev.best_f1(Y, P)
    assert thr == pytest.approx(0.7)
    assert f1 == pytest.approx(2 / 3)
    assert ev.best_f1([0, 0], [0.1, 0.2]) == (pytest.approx(float("nan"), nan_ok=True), 0.0)


def test_confusion_and_derived_by_hand():
    cm = ev.confusion(Y, P, threshold=0.5)
    assert (cm.tp, cm.fp, cm.tn, cm.fn) == (2, 1, 2, 1)
    assert cm.matrix().tolist() == [[2, 1], [1, 2]]
    assert cm.accuracy == pytest.approx(4 / 6)
    assert cm.precision == pytest.approx(2 / 3)
    assert cm.recall == pytest.approx(2 / 3)
    assert cm.f1 == pytest.approx(2 / 3)
    # threshold is inclusive: p >= thr is positive
    assert ev.confusion([1], [0.5], threshold=0.5).tp == 1
    # nothing predicted positive: precision 0, not a crash
    assert ev.confusion([1, 0], [0.1, 0.2], threshold=0.9).precision == 0.0


def test_log_loss_by_hand_and_clipping():
    assert ev.log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert np.isfinite(ev.log_loss([1], [0.0]))  # clipped, finite


def test_curves_endpoints():
    fpr, tpr = ev.roc_points(Y, P)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    recall, precision = ev.pr_points(Y, P)
    assert recall[-1] == 1 and precision[-1] == pytest.approx(0.5)
    # stops at the first full recall: the all-positive tail (precision = prevalence) is not drawn
    recall, precision = ev.pr_points([1, 1, 0, 0], [0.9, 0.8, 0.3, 0.2])
    assert recall.tolist() == [0, 0.5, 1] and precision.tolist() == [1, 1, 1]


def test_matches_sklearn_on_random_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) * 0.5 + y * 0.3, 2)  # rounded: many ties
    assert ev.roc_auc(y, p) == pytest.approx(metrics.roc_auc_score(y, p))
    assert ev.average_precision(y, p) == pytest.approx(metrics.average_precision_score(y, p))
    assert ev.log_loss(y, p) == pytest.approx(metrics.log_loss(y, np.clip(p, 1e-15, 1 - 1e-15)))
    prec, rec, thr = metrics.precision_recall_curve(y, p)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0)
    assert ev.best_f1(y, p)[1] == pytest.approx(f1.max())


def _slices() -> pd.DataFrame:
    """Three series, hand-labelled. Only `any` and `subdural` vary; the other labels are all 0 with p=0.1."""
    rows = [
        # series, any, subdural, p_any, p_subdural
        ("s1", 0, 0, 0.2, 0.1),
        ("s1", 1, 1, 0.7, 0.4),  # s1 positive; max p_any .7, max p_sub .4
        ("s1", 0, 0, 0.3, 0.2),
        ("s2", 0, 0, 0.6, 0.1),  # s2 negative; max p_any .6 (false positive at .5)
        ("s2", 0, 0, 0.1, 0.3),
        ("s3", 0, 0, 0.1, 0.05),  # s3 negative, low
        ("s3", 0, 0, 0.2, 0.05),
    ]
    frame = pd.DataFrame(rows, columns=["series_id", "any", "subdural", "any_pred", "subdural_pred"])
    frame["image_id"] = [f"ID_{i}" for i in range(len(frame))]
    for label in LABELS:
        if label not in frame:
            frame[label] = 0
            frame[ev.pred_col(label)] = 0.1
    return frame


def test_series_table_by_hand():
    table = ev.series_table(_slices(), threshold=0.5)
    assert list(table.index) == list(LABELS)
    row = table.loc["any"]
    # series max: s1 (y1, p.7) s2 (y0, p.6) s3 (y0, p.2): TP1 FP1 TN1 FN0
    assert (row.POS, row.NEG) == (1, 2)
    assert row.ACC == pytest.approx(2 / 3)
    assert row.PREC == pytest.approx(0.5)
    assert row.REC == pytest.approx(1.0)
    assert row.AUC == pytest.approx(1.0)
    assert row.LOG_LOSS == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.8)) / 3)
    sub = table.loc["subdural"]
    # s1 (y1, p.4) s2 (y0, p.3) s3 (y0, p.05): nothing >= .5 -> TP0 FN1 TN2 -> ACC 2/3, PREC 0, REC 0, AUC 1
    assert (sub.ACC, sub.PREC, sub.REC, sub.AUC) == (pytest.approx(2 / 3), 0.0, 0.0, 1.0)
    epi = table.loc["epidural"]
    assert epi.POS == 0 and epi.NEG == 3 and math.isnan(epi.AUC) and epi.ACC == 1.0
    shown = ev.format_series_table(table)
    assert shown.loc["any", "POS"] == "1 (33%)" and shown.loc["any", "NEG"] == "2 (67%)"
    assert shown.loc["epidural", "AUC"] == "-"


def test_series_frame_and_threshold_table():
    frame = _slices()
    series = ev.series_frame(frame)
    assert series.set_index("series_id")["slices"].to_dict() == {"s1": 3, "s2": 2, "s3": 2}
    table = ev.threshold_table(frame, threshold=0.5)
    assert table.loc["any", "POS"] == 1 and table.loc["any", "NEG"] == 6
    assert table.loc["any", "F1"] == pytest.approx(2 / 3)  # TP1 FP1 FN0
    assert table.loc["any", "BEST_THR"] == pytest.approx(0.7) and table.loc["any", "BEST_F1"] == pytest.approx(1.0)


def test_join_and_missing_columns():
    truth = pd.DataFrame(
        {"image_id": ["a", "b", "c"], "series_id": ["s", "s", "t"], **{label: [1, 0, 0] for label in LABELS}}
    )
    pred = pd.DataFrame({"image_id": ["b", "a"], **{label: [0.2, 0.9] for label in LABELS}})
    joined = ev.join_truth_pred(truth, pred)
    assert len(joined) == 2 and joined.set_index("image_id").loc["a", "any_pred"] == 0.9
    with pytest.raises(UserError, match="lacks columns"):
        ev.join_truth_pred(truth, pred.drop(columns=["any"]))
    with pytest.raises(UserError, match="series_id"):
        ev.series_table(joined.drop(columns=["series_id"]))
