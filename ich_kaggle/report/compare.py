"""`make compare`: one table of every experiment under runs/, best out-of-fold loss first."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.labels import LABELS
from ..core.errors import UserError, fix
from ..core.io import write_csv
from ..core.layout import Run
from .runs import SUMMARY, fold_dirs, fold_done, read_done, read_logs

log = logging.getLogger(__name__)


def find_experiments(runs: Path, depth: int = 3) -> list[Path]:
    """Folders holding fold*/ or predictions/ (runs/<name>, also nested such as runs/demo/<name>)."""
    found = []
    if not runs.is_dir() or depth < 0:
        return found
    for d in sorted(p for p in runs.iterdir() if p.is_dir()):
        if fold_dirs(d) or Run(d).predictions.dir.is_dir():
            found.append(d)
        elif d != Run(d.parent).report:
            found.extend(find_experiments(d, depth - 1))
    return found


def experiment_row(run: Path, name: str) -> dict:
    """One line of `compare`: from report/summary.json when it exists, else the finished folds' own files
    (done.json's OOF loss and log.csv's best epoch per label), pooled over folds by validation size."""
    info_path = Run(run).predictions.ensemble
    if not fold_dirs(run) and info_path.exists():
        return _ensemble_row(run, name, info_path)
    folds = fold_dirs(run)
    logs = read_logs(run)
    done = {fold: d for fold, d in folds.items() if fold_done(d)}
    row: dict = {"experiment": name, "folds_done": len(done), "folds_started": len(folds)}
    secs = [lg["seconds"].mean() for lg in logs.values() if "seconds" in lg]
    row["sec_per_epoch"] = float(np.mean(secs)) if secs else np.nan
    summary_path = Run(run).report / SUMMARY
    summary = {}
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError:
            log.warning("%s unreadable; using the fold logs", summary_path)
    if summary.get("weighted_log_loss") is not None:
        row["source"] = "report (OOF)"
        row["oof_wll"] = summary["weighted_log_loss"]
        for label in LABELS:
            row[label] = summary.get("per_label", {}).get(label, np.nan)
        row["series_auc_any"] = summary.get("series_auc_any", np.nan)
    else:
        # the metric is a mean over images, so weighting each fold by its validation size pools it exactly
        values: dict[str, list[tuple[float, float]]] = {key: [] for key in ("oof_wll", *LABELS)}
        for fold, d in done.items():
            info, lg = read_done(d), logs.get(fold)
            weight = float(info.get("n_val", 1))
            best = None
            if lg is not None and "val_weighted_log_loss" in lg and lg["val_weighted_log_loss"].notna().any():
                best = lg.loc[lg["val_weighted_log_loss"].idxmin()]
            total = info.get("oof_weighted_log_loss", None if best is None else best["val_weighted_log_loss"])
            if total is not None:
                values["oof_wll"].append((float(total), weight))
            for label in LABELS:
                if best is not None and f"val_{label}" in best:
                    values[label].append((float(best[f"val_{label}"]), weight))
        for key, pairs in values.items():
            row[key] = float(np.average([v for v, _ in pairs], weights=[w for _, w in pairs])) if pairs else np.nan
        row["source"] = "fold files (done.json, log.csv)" if values["oof_wll"] else "-"
        row["series_auc_any"] = np.nan
    row["stacked_wll"] = _stacked_loss(run)
    return row


def _ensemble_row(run: Path, name: str, info_path: Path) -> dict:
    """An ensemble (predictions/ensemble.json, no folds of its own): its combined OOF loss and its stack's."""
    try:
        info = json.loads(info_path.read_text())
    except ValueError:
        log.warning("%s unreadable", info_path)
        info = {}
    members = [m.get("name", "?") for m in info.get("members", [])]
    row: dict = {"experiment": name, "folds_done": len(members), "folds_started": len(members),
                 "oof_wll": (info.get("oof_weighted_log_loss") or {}).get("ensemble", np.nan),
                 **{label: np.nan for label in LABELS}, "series_auc_any": np.nan, "sec_per_epoch": np.nan,
                 "source": f"ensemble of {', '.join(members)} ({info.get('combine', '?')})"}
    if row["oof_wll"] is None:
        row["oof_wll"] = np.nan
    row["stacked_wll"] = _stacked_loss(run)
    return row


def _stacked_loss(run: Path) -> float:
    stack_metrics = Run(run).stack.metrics
    out = np.nan
    if stack_metrics.exists():
        try:
            sm = pd.read_csv(stack_metrics)
            key = sm.columns[0]
            hit = sm[sm[key].astype(str).str.startswith("stack")]
            if len(hit) and "weighted_log_loss" in sm:
                out = float(hit["weighted_log_loss"].iloc[0])
        except Exception as e:
            log.warning("%s unreadable (%s)", stack_metrics, e)
    return out


def compare(runs: str | Path = "runs") -> pd.DataFrame:
    """Print (and write runs/compare.csv) one table of every experiment with at least one finished fold."""
    runs = Path(runs)
    if not runs.is_dir():
        raise UserError(f"runs folder {runs} not found; train something first "
                        f"or pass {fix('--runs <folder>', 'RUNS=<folder>')}")
    rows, unfinished = [], []
    for run in find_experiments(runs):
        name = run.relative_to(runs).as_posix()
        row = experiment_row(run, name)
        if row["folds_done"]:
            rows.append(row)
        else:
            unfinished.append(name)
    columns = ["experiment", "folds_done", "folds_started", "oof_wll", *LABELS, "series_auc_any", "stacked_wll",
               "sec_per_epoch", "source"]
    table = pd.DataFrame(rows, columns=columns)
    if len(table):
        table = table.sort_values("oof_wll", na_position="last").reset_index(drop=True)
        try:
            write_csv(table, runs / "compare.csv")
            where = f"written to {runs / 'compare.csv'}"
        except PermissionError:  # a read-only runs folder: the table is printed all the same
            where = f"{runs} is read-only: not written to compare.csv"
        with pd.option_context("display.width", 250, "display.max_columns", 50, "display.float_format", "{:.4f}".format):
            log.info(table.to_string(index=False))
        log.info(f"({where}; for an ensemble folds_done counts its members; oof_wll is the out-of-fold weighted log "
                 f"loss, lower is better;"
              f" make report CONFIG=<name> fills series_auc_any and the pooled OOF metric)")
    else:
        log.info(f"no finished experiment under {runs} (a fold counts once its training finished: done.json)")
    if unfinished:
        log.info(f"not finished yet (no fold with done.json; a best.pt alone is a fold still training or stopped): "
              f"{', '.join(unfinished)}")
    return table
