"""The competition metric: weighted multi-label log loss (`any` weight 2, each subtype 1).

numpy/pandas only (never torch), so scoring runs fast anywhere, a Kaggle kernel included. The weighted loss equals
sklearn's `log_loss` on the long `ID,Label` file with per-row sample weights; predictions are clipped to
[1e-15, 1 - 1e-15] as the Kaggle scorer (old sklearn) did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .labels import LABEL_WEIGHTS, LABELS
from .errors import UserError

EPS = 1e-15
_WEIGHTS = np.asarray(LABEL_WEIGHTS, dtype=np.float64)


def _check(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.ndim == 1:
        y_true = y_true.reshape(1, -1)
    if y_pred.ndim == 1:
        y_pred = y_pred.reshape(1, -1)
    if y_true.shape != y_pred.shape or y_true.shape[1:] != (len(LABELS),):
        raise ValueError(f"expected two (N, {len(LABELS)}) arrays, got {y_true.shape} and {y_pred.shape}")
    if len(y_true) == 0:
        raise ValueError("cannot score zero images")
    if not np.isfinite(y_pred).all():
        raise ValueError("predictions contain NaN or infinity")
    return y_true, y_pred


def _bce(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Element-wise binary cross entropy with Kaggle's clipping (soft targets allowed)."""
    p = np.clip(y_pred, EPS, 1.0 - EPS)
    return -(y_true * np.log(p) + (1.0 - y_true) * np.log1p(-p))


def per_label_log_loss(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Mean log loss of each label column, in `LABELS` order."""
    y_true, y_pred = _check(y_true, y_pred)
    losses = _bce(y_true, y_pred).mean(axis=0)
    return {label: float(v) for label, v in zip(LABELS, losses)}


def weighted_log_loss(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The competition score on (N, 6) arrays: sum of weighted element losses over the sum of weights."""
    y_true, y_pred = _check(y_true, y_pred)
    losses = _bce(y_true, y_pred)
    return float((losses * _WEIGHTS).sum() / (_WEIGHTS.sum() * len(losses)))


def split_ids(ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """`ID_<image>_<subtype>` -> (image ids, subtypes). Without pyarrow, pandas' .str ops loop in Python anyway;
    one rpartition comprehension is 4x faster than `.str.rsplit(expand=True)` (0.2 s for 727k rows)."""
    parts = [str(x).rpartition("_") for x in ids.tolist()]
    images = np.array([p[0] for p in parts], dtype=object)
    subtypes = np.array([p[2] for p in parts], dtype=object)
    return images, subtypes


def long_to_wide(df: pd.DataFrame, source: str = "labels", value_dtype: str = "float64") -> pd.DataFrame:
    """`ID,Label` rows (`ID_<image>_<subtype>`) -> one row per image: `image_id` + LABELS, vectorised.

    Duplicate IDs (stage_2_train.csv has some) keep their first value; an image lacking a subtype row is an error.
    """
    if list(df.columns[:2]) != ["ID", "Label"]:
        raise UserError(f"{source}: expected the header 'ID,Label', got {','.join(map(str, df.columns))}; "
                        f"give a file in the stage_2_train.csv form")
    df = df.drop_duplicates("ID", keep="first")
    images, subtypes = split_ids(df["ID"])
    bad = ~np.isin(subtypes, LABELS)
    if bad.any():
        raise UserError(f"{source}: {int(bad.sum())} rows are not ID_<image>_<subtype> with a known subtype, e.g. "
                        f"'{df['ID'].iloc[int(np.argmax(bad))]}'; subtypes are {', '.join(LABELS)}")
    values = pd.to_numeric(df["Label"], errors="coerce")
    if values.isna().any():
        first = int(np.argmax(values.isna().to_numpy()))
        raise UserError(f"{source}: {int(values.isna().sum())} labels are not numbers, e.g. row ID {df['ID'].iloc[first]}; fix the file")
    long = pd.DataFrame({"image_id": images, "label": subtypes, "value": values.to_numpy()})
    wide = long.pivot(index="image_id", columns="label", values="value")
    missing = wide.isna().any(axis=1)
    if missing.any():
        raise UserError(f"{source}: {int(missing.sum())} images lack some of the six subtype rows, e.g. {missing.index[missing.to_numpy()][0]}; "
                        f"every image needs one row per subtype")
    wide = wide.reindex(columns=list(LABELS)).astype(value_dtype)
    wide = wide.reset_index()
    wide.columns.name = None
    return wide


def read_long_or_wide(path: str | Path) -> pd.DataFrame:
    """Read labels or predictions as a wide frame, whether the CSV is `ID,Label` or `image_id` + LABELS."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found; give an existing CSV")
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV ({str(e).splitlines()[0]}); fix or regenerate the file") from None
    cols = [str(c) for c in df.columns]
    if cols[:2] == ["ID", "Label"]:
        return long_to_wide(df, source=str(path))
    if "image_id" in cols and all(label in cols for label in LABELS):
        return df[["image_id", *LABELS]].drop_duplicates("image_id").reset_index(drop=True)
    raise UserError(f"{path}: expected 'ID,Label' rows (stage_2_train.csv form) or columns image_id,{','.join(LABELS)}")


def score_frames(truth_df: pd.DataFrame, pred_df: pd.DataFrame) -> dict:
    """Score wide predictions against wide truth, joined on image_id; every truth image must be predicted."""
    truth = truth_df[["image_id", *LABELS]].drop_duplicates("image_id")
    pred = pred_df[["image_id", *LABELS]].drop_duplicates("image_id")
    merged = truth.merge(pred, on="image_id", how="left", suffixes=("_t", "_p"))
    pred_cols = [f"{label}_p" for label in LABELS]
    missing = merged[pred_cols].isna().any(axis=1).to_numpy()
    if missing.any():
        raise UserError(f"the submission lacks predictions for {int(missing.sum())} of {len(merged)} scored images "
                        f"(e.g. {merged['image_id'].iloc[int(np.argmax(missing))]}); predict every image of the truth file")
    y_true = merged[[f"{label}_t" for label in LABELS]].to_numpy(np.float64)
    y_pred = merged[pred_cols].to_numpy(np.float64)
    bad = ~np.isfinite(y_pred).all(axis=1)
    if bad.any():
        raise UserError(f"the submission has infinite predictions for {int(bad.sum())} images "
                        f"(e.g. {merged['image_id'].iloc[int(np.argmax(bad))]}); probabilities must lie in [0, 1]")
    return {"weighted_log_loss": weighted_log_loss(y_true, y_pred), "per_label": per_label_log_loss(y_true, y_pred)}


def read_truth(path: str | Path) -> pd.DataFrame:
    """Labels as a wide frame: the stage_2_train.csv form goes through the data layer's strict 0/1 parser."""
    path = Path(path)
    try:
        columns = pd.read_csv(path, nrows=0).columns.tolist()
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        columns = []  # read_long_or_wide names the problem
    if columns[:2] == ["ID", "Label"]:
        from .labels import read_labels  # pandas/numpy only

        return read_labels(path)
    return read_long_or_wide(path)


def score_files(truth_csv: str | Path, sub_csv: str | Path) -> dict:
    """Score a submission file (`ID,Label` or wide) against a labels file (stage_2_train.csv form or wide)."""
    return score_frames(read_truth(truth_csv), read_long_or_wide(sub_csv))


def prior_log_loss(train_wide: pd.DataFrame, truth_wide: pd.DataFrame) -> float:
    """Score of predicting the training label means for every image: the floor any model must beat."""
    prior = train_wide[list(LABELS)].to_numpy(np.float64).mean(axis=0)
    y = truth_wide[list(LABELS)].to_numpy(np.float64)
    return weighted_log_loss(y, np.broadcast_to(prior, y.shape))
