"""Submission writer, validator and `submit`: wide predictions -> `ID,Label` rows in the sample submission's order.

numpy/pandas only, so the Kaggle kernel can use it without torch. Probabilities are clipped to [1e-6, 1 - 1e-6]:
one confident mistake then costs at most ~13.8 nats instead of ~34.5.
"""

from __future__ import annotations

import logging
import gzip
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.layout import Run
from ..core.labels import LABELS
from ..core.errors import UserError
from ..core.io import atomic_path
from ..core.metrics import read_long_or_wide, read_truth, score_frames, split_ids
from .choose import choose_stage  # the stage choice by OOF lives in its own module

log = logging.getLogger(__name__)

CLIP = 1e-6
_NA_STRINGS = {"", "nan", "NaN", "NAN", "NA", "N/A", "null", "NULL", "None", "none", "<NA>"}
_LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}


def _read_sample(sample_csv: str | Path) -> pd.DataFrame:
    path = Path(sample_csv)
    if not path.exists():
        raise UserError(
            f"sample submission {path} not found; it is stage_2_sample_submission.csv of the competition download"
        )
    try:
        sample = pd.read_csv(path, dtype={"ID": str}, usecols=["ID"])
    except (ValueError, pd.errors.EmptyDataError) as e:
        raise UserError(f"{path}: not a sample submission with an 'ID' column ({str(e).splitlines()[0]})") from None
    return sample


def _to_long(pred_wide: pd.DataFrame, sample: pd.DataFrame, source: str) -> pd.DataFrame:
    """Values of the wide frame at every sample row, in the sample's row order."""
    missing_cols = [c for c in ("image_id", *LABELS) if c not in pred_wide.columns]
    if missing_cols:
        raise UserError(f"{source}: predictions lack columns {missing_cols}; expected image_id,{','.join(LABELS)}")
    pred = pred_wide.drop_duplicates("image_id")
    values = pred[list(LABELS)].to_numpy(np.float64)
    if not np.isfinite(values).all():
        bad = pred["image_id"].to_numpy()[~np.isfinite(values).all(axis=1)]
        raise UserError(
            f"{source}: {len(bad)} images have NaN/infinite predictions (e.g. {bad[0]}); fix the predictions"
        )
    image_ids, subtypes = split_ids(sample["ID"])
    row = pd.Index(pred["image_id"].astype(str)).get_indexer(image_ids)
    col = pd.Series(subtypes).map(_LABEL_INDEX).to_numpy()
    if np.isnan(col.astype(np.float64)).any():
        raise UserError(
            f"{source}: the sample submission has IDs without a known subtype suffix, e.g. "
            f"{sample['ID'].iloc[int(np.argmax(np.isnan(col.astype(np.float64))))]}"
        )
    if (row < 0).any():
        lacking = pd.unique(image_ids[row < 0])
        raise UserError(
            f"{source}: no prediction for {len(lacking)} images of the sample submission (e.g. {lacking[0]}); "
            f"predict them or fill them (submit() uses the training prior)"
        )
    probs = np.clip(values[row, col.astype(np.int64)], CLIP, 1.0 - CLIP)
    return pd.DataFrame({"ID": sample["ID"].to_numpy(), "Label": probs})


def _format_csv(long: pd.DataFrame) -> bytes:
    """Fast CSV text (an f-string per row beats np.char and to_csv); 6 decimals suit probabilities in
    [1e-6, 1 - 1e-6]."""
    rows = [f"{i},{p:.6f}" for i, p in zip(long["ID"].tolist(), long["Label"].tolist())]
    return ("ID,Label\n" + "\n".join(rows) + "\n").encode()


def write_submission(pred_wide: pd.DataFrame, sample_csv: str | Path, out_path: str | Path) -> Path:
    """Write `out_path` (.csv) and `out_path`.gz atomically: six rows per sample image, sample row order."""
    out_path = Path(out_path)
    if out_path.suffix == ".gz":
        out_path = out_path.with_suffix("")
    sample = _read_sample(sample_csv)
    long = _to_long(pred_wide, sample, source=str(out_path))
    data = _format_csv(long)
    import io  # validated in memory, then written: a bad submission never replaces a good one

    raw = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    problems = validate(sample, raw)
    if problems:
        raise UserError(
            f"{out_path}: not written, it would fail validation: {problems[0]} "
            f"({len(problems)} problem(s)); check {sample_csv}"
        )
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        return _write_both(out_path, data)
    except OSError as e:
        from ..core.io import cannot_write

        raise cannot_write(out_path, e) from None


def _write_both(out_path: Path, data: bytes) -> Path:
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(data)
    gz_path = out_path.with_name(out_path.name + ".gz")
    with atomic_path(gz_path) as tmp:
        tmp.write_bytes(gzip.compress(data, compresslevel=3, mtime=0))  # level 3: 3x faster than 6, 6 % larger
    return out_path


def _example(values, n: int = 3) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:n])
    return shown + (", ..." if len(values) > n else "")


def validate(sample_df: pd.DataFrame, sub_df: pd.DataFrame) -> list[str]:
    """Every problem of a submission, one line each; [] means valid. `sub_df` should be read with dtype=str."""
    problems: list[str] = []
    if len(sub_df.columns) == 0 and len(sub_df) == 0:
        return ["empty file: no header and no rows; expected 'ID,Label' then six rows per test image"]
    cols = [str(c) for c in sub_df.columns]
    if cols != ["ID", "Label"]:
        problems.append(f"bad header {','.join(cols)!r}: expected exactly 'ID,Label'")
        if "ID" not in cols or "Label" not in cols:
            if len(cols) >= 2:  # fall back on position so that the rows are still checked
                sub_df = sub_df.iloc[:, :2].set_axis(["ID", "Label"], axis=1)
            else:
                return problems
        else:
            sub_df = sub_df[["ID", "Label"]]
    if len(sub_df) == 0:
        problems.append(f"no rows: expected {len(sample_df)} rows (six per test image)")
        return problems
    ids = sub_df["ID"].astype(str)
    sample_ids = sample_df["ID"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        problems.append(f"{len(dup)} duplicate IDs: {_example(pd.unique(dup))}")
    sample_set = pd.Index(pd.unique(sample_ids))
    sub_set = pd.Index(pd.unique(ids))
    missing = sample_set.difference(sub_set, sort=False)
    if len(missing):
        problems.append(f"{len(missing)} IDs of the sample submission are missing: {_example(missing)}")
    extra = sub_set.difference(sample_set, sort=False)
    if len(extra):
        problems.append(f"{len(extra)} IDs are not in the sample submission: {_example(extra)}")
    raw = sub_df["Label"]
    text = raw.astype(str).str.strip() if raw.dtype == object or pd.api.types.is_string_dtype(raw) else raw.astype(str)
    values = pd.to_numeric(raw, errors="coerce")
    is_na_text = raw.isna() | text.isin(_NA_STRINGS)
    nan_mask = values.isna() & is_na_text
    nonnum_mask = values.isna() & ~is_na_text
    if nan_mask.any():
        problems.append(f"{int(nan_mask.sum())} labels are NaN/empty: {_example(ids[nan_mask])}")
    if nonnum_mask.any():
        problems.append(
            f"{int(nonnum_mask.sum())} labels are not numbers: "
            f"{_example(f'{i}={v!r}' for i, v in zip(ids[nonnum_mask], raw[nonnum_mask]))}"
        )
    finite = values.notna()
    out = finite & ((values < 0) | (values > 1) | ~np.isfinite(values.fillna(0.5)))
    if out.any():
        problems.append(
            f"{int(out.sum())} labels are outside [0, 1]: {_example(f'{i}={v}' for i, v in zip(ids[out], values[out]))}"
        )
    return problems


def validate_file(sample: str | Path, sub: str | Path) -> list[str]:
    """Validate a submission file (.csv or .csv.gz) against the sample submission; each line names the file."""
    sample_df = _read_sample(sample)
    path = Path(sub)
    if not path.exists():
        return [f"{path}: file not found"]
    if path.stat().st_size == 0:
        return [f"{path}: empty file; expected 'ID,Label' then six rows per test image"]
    try:
        # header=None: a row with more fields than the first line is a ParserError instead of silently becoming an index
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, header=None)
        sub_df = raw.iloc[1:].set_axis([str(c) for c in raw.iloc[0]], axis=1).reset_index(drop=True)
    except pd.errors.EmptyDataError:
        return [f"{path}: empty file; expected 'ID,Label' then six rows per test image"]
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as e:
        return [f"{path}: not a readable CSV ({str(e).strip().splitlines()[-1]}); expected two columns ID,Label"]
    return [f"{path}: {p}" for p in validate(sample_df, sub_df)]


# ---------------------------------------------------------------------------------------------------- submit


def _train_labels(layout) -> pd.DataFrame | None:
    """Training labels (wide), or None where the data folder has none (e.g. a kernel given only the test set)."""
    path = Path(layout.train_csv)
    return read_truth(path) if path.exists() else None


def check_sample(sample_csv: Path, pred: pd.DataFrame, unreadable: set[str] = frozenset()) -> pd.DataFrame:
    """The sample submission, when it is one this experiment can fill: no duplicate ID, at least one row, and at
    least 99 % of its images predicted or known unreadable (fewer: the sample of another test set, all prior)."""
    sample = _read_sample(sample_csv)
    if not len(sample):
        raise UserError(f"{sample_csv}: header only, no rows; use the competition's stage_2_sample_submission.csv")
    dup = sample["ID"][sample["ID"].duplicated()]
    if len(dup):
        raise UserError(
            f"{sample_csv}: {len(dup)} duplicate IDs (e.g. {dup.iloc[0]}); use the competition's "
            f"stage_2_sample_submission.csv"
        )
    images = pd.unique(split_ids(sample["ID"])[0])
    known = pd.Index(images).isin(pd.Index(pred["image_id"].astype(str)).union(pd.Index(sorted(unreadable)))).mean()
    if known < 0.99:
        raise UserError(
            f"{sample_csv}: only {known:.0%} of its {len(images)} images were predicted (the sample of "
            f"another test set?); use the sample of the data predicted, or rerun `make predict`"
        )
    return sample


def submit(
    cfg, layout, runs: str | Path = "runs", out_dir: str | Path = "submissions", members: list | None = None
) -> Path:
    """Best predictions of an experiment -> validated `<out_dir>/<cfg.name>.csv` (+ .gz); `kaggle-submit` uploads it.

    Sample images without a prediction (unreadable DICOMs) get the training prior: the label means of
    `layout.train_csv`, the best constant guess, so one bad file costs little and never blocks a submission.
    """
    from ..data import trained

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file, not a folder; pass a folder (default: submissions)")
    run = Run.of(runs, cfg.name)
    for member in [cfg] if not cfg.is_ensemble else members or []:  # the folds still the ones the config trains
        trained.check(member, layout, runs, via=cfg.name)
    pred_path, oof_path = choose_stage(cfg, layout, run)
    pred = read_long_or_wide(pred_path)
    unreadable_csv = run.predictions.unreadable
    unreadable = set(pd.read_csv(unreadable_csv, dtype=str).iloc[:, 0]) if unreadable_csv.exists() else set()
    sample = check_sample(layout.sample_csv, pred, unreadable)
    train = _train_labels(layout)
    prior = train[list(LABELS)].to_numpy(np.float64).mean(axis=0) if train is not None else None

    sample_images = pd.unique(split_ids(sample["ID"])[0])
    lacking = pd.Index(sample_images).difference(pd.Index(pred["image_id"].astype(str)), sort=False)
    if len(lacking) and prior is None:
        raise UserError(
            f"{len(lacking)} test images have no prediction (e.g. {lacking[0]}) and {layout.train_csv} is missing, "
            f"so there is no training prior to fill them with; add stage_2_train.csv to the data folder"
        )
    if len(lacking):
        note = ""
        if unreadable_csv.exists():
            note = f" ({sum(i in unreadable for i in lacking)} listed in {unreadable_csv})"
        log.info(
            f"{len(lacking)} of {len(sample_images)} test images have no prediction{note}; "
            f"they get the training prior {np.round(prior, 4).tolist()}:"
        )
        log.info("  " + _example(lacking, n=20))
        fill = pd.DataFrame(np.broadcast_to(prior, (len(lacking), len(LABELS))), columns=list(LABELS))
        fill.insert(0, "image_id", np.asarray(lacking, dtype=object))
        pred = pd.concat([pred, fill], ignore_index=True)

    out = write_submission(pred, layout.sample_csv, out_dir / f"{cfg.name}.csv")
    log.info(f"wrote {out} and {out}.gz from {pred_path} ({len(sample)} rows, valid)")

    _print_oof_score(run, oof_path, train)
    return out


def _print_oof_score(run: Run, oof_path: Path, train: pd.DataFrame | None) -> None:
    """The expected leaderboard score: OOF predictions of the same stage as the test predictions, against the labels."""
    if not oof_path.exists() or train is None:
        log.info(f"no OOF predictions or training labels for {run.dir}: no expected score")
        return
    oof = read_long_or_wide(oof_path)
    oof = oof[np.isfinite(oof[list(LABELS)].to_numpy(np.float64)).all(axis=1)]
    truth = train[train["image_id"].isin(oof["image_id"])]
    if not len(truth):
        log.info(f"{oof_path} shares no image with {run.dir}'s training labels: no expected score")
        return
    result = score_frames(truth, oof)
    log.info(
        f"expected score (OOF weighted_log_loss of {oof_path}, {len(truth)} images): {result['weighted_log_loss']:.5f}"
    )
