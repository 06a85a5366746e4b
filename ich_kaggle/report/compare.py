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
    """Folders holding fold*/, predictions/ or a second stage's scores (runs/<name>, also nested such as
    runs/old/<name>; a stack-only experiment such as the demo's `demo+embeddings` included)."""
    found = []
    if not runs.is_dir() or depth < 0:
        return found
    for d in sorted(p for p in runs.iterdir() if p.is_dir()):
        if fold_dirs(d) or Run(d).predictions.dir.is_dir() or Run(d).stack.metrics.is_file():
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
    if not fold_dirs(run) and not Run(run).predictions.dir.is_dir():
        return _stack_row(run, name)
    folds = fold_dirs(run)
    logs = read_logs(run)
    done = {fold: d for fold, d in folds.items() if fold_done(d)}
    row: dict = {
        "experiment": name,
        "folds_done": len(done),
        "folds_started": len(folds),
        "k": _fold_count(folds),
        "data": _data_of(done),
    }
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
    member_done = {}
    for m in info.get("members", []):
        mdir = run.parent / str(m.get("run", m.get("name", "?")))
        member_done.update({(mdir, k): d for k, d in fold_dirs(mdir).items() if fold_done(d)})
    row: dict = {
        "experiment": name,
        "folds_done": len(members),
        "folds_started": len(members),
        "k": np.nan,
        "data": _data_of(member_done),
        "oof_wll": (info.get("oof_weighted_log_loss") or {}).get("ensemble", np.nan),
        **{label: np.nan for label in LABELS},
        "series_auc_any": np.nan,
        "sec_per_epoch": np.nan,
        "source": f"ensemble of {', '.join(members)} ({info.get('combine', '?')})",
    }
    if row["oof_wll"] is None:
        row["oof_wll"] = np.nan
    summary = _summary(run)  # `make report` on the ensemble: its series-level AUC and 'any' loss
    row["series_auc_any"] = summary.get("series_auc_any", np.nan)
    row["any"] = (summary.get("per_label") or {}).get("any", np.nan)
    row["stacked_wll"] = _stacked_loss(run)
    return row


def _summary(run: Path) -> dict:
    try:
        return json.loads((Run(run).report / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}


def _stack_row(run: Path, name: str) -> dict:
    """A second stage of its own (stack/ only, e.g. the demo's embedding-level `demo+embeddings`): its score."""
    from ..core import manifest

    found = manifest.read(Run(run).stack.test) or {}
    meta = ((found.get("inputs") or {}).get("meta") or {}).get("path")
    return {
        "experiment": name,
        "folds_done": 0,
        "folds_started": 0,
        "k": np.nan,
        "data": _strip_hash(Path(meta).parent.name) if meta else "?",
        "oof_wll": np.nan,
        **{label: np.nan for label in LABELS},
        "series_auc_any": np.nan,
        "sec_per_epoch": np.nan,
        "source": "second stage only (stack/metrics.csv)",
        "stacked_wll": _stacked_loss(run),
    }


def _strip_hash(work_name: str) -> str:
    """synth-1a2b3c4d (a work folder) -> synth (its data folder's name)."""
    head, _, tail = work_name.rpartition("-")
    return head if head and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail) else work_name


def _data_of(done: dict) -> str:
    """The data folder(s) the finished folds recorded (their names; '?' for folds trained before the record)."""
    names = sorted({Path(p).name for p in (read_done(d).get("data", {}).get("path") for d in done.values()) if p})
    return ", ".join(names) if names else "?"


def _fold_count(folds: dict) -> float:
    """k of the run's folds, from the config each fold recorded."""
    import yaml

    for d in folds.values():
        try:
            return int((yaml.safe_load(d.config.read_text()) or {}).get("cv", {}).get("k"))
        except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
            continue
    return np.nan


WIDTH = 120  # the terminal compare fits (--wide: every column)
NARROW = ["experiment", "data", "folds", "oof_wll", "stacked_wll", "series_auc_any", "any", "sec_per_epoch"]


def _text_table(table: pd.DataFrame, wide: bool) -> str:
    """The printed table: a 120-column summary (names shortened with '~'), or every column with `wide`."""
    shown = table.copy()
    shown["folds"] = [
        ("-" if not r.folds_started else f"{r.folds_done}/{'?' if pd.isna(r.k) else int(r.k)}")
        if r.source is None or not str(r.source).startswith("ensemble")
        else f"{r.folds_done} mem"
        for r in shown.itertuples()
    ]
    if wide:
        cols = [
            "experiment",
            "data",
            "folds",
            "oof_wll",
            *LABELS,
            "series_auc_any",
            "stacked_wll",
            "sec_per_epoch",
            "source",
        ]
        with pd.option_context(
            "display.width", 1000, "display.max_columns", 50, "display.float_format", "{:.4f}".format
        ):
            return shown[cols].to_string(index=False)
    shown = shown[NARROW].rename(
        columns={"stacked_wll": "stacked", "series_auc_any": "auc_any", "any": "any_ll", "sec_per_epoch": "s/epoch"}
    )
    for col, limit in (("experiment", 34), ("data", 22)):
        shown[col] = [v if len(str(v)) <= limit else str(v)[: limit - 1] + "~" for v in shown[col].astype(str)]
    pads = {col: max([len(col), *map(len, shown[col])]) for col in ("experiment", "data")}
    with pd.option_context("display.width", WIDTH, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        return shown.to_string(
            index=False,
            na_rep="-",
            justify="left",
            formatters={col: (lambda v, n=n: f"{v:<{n}}") for col, n in pads.items()},
        )


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


def compare(runs: str | Path = "runs", wide: bool = False) -> pd.DataFrame:
    """Print (and write runs/compare.csv) one table of every experiment with a score (a finished fold or a second
    stage's): 120 columns wide (`wide`: every column)."""
    runs = Path(runs)
    if not runs.is_dir():
        raise UserError(
            f"runs folder {runs} not found; train something first or pass {fix('--runs <folder>', 'RUNS=<folder>')}"
        )
    rows, unfinished = [], []
    for run in find_experiments(runs):
        name = run.relative_to(runs).as_posix()
        row = experiment_row(run, name)
        if row["folds_done"] or np.isfinite(row.get("stacked_wll", np.nan)):
            rows.append(row)
        else:
            unfinished.append(name)
    columns = [
        "experiment",
        "data",
        "folds_done",
        "folds_started",
        "k",
        "oof_wll",
        *LABELS,
        "series_auc_any",
        "stacked_wll",
        "sec_per_epoch",
        "source",
    ]
    table = pd.DataFrame(rows, columns=columns)
    if len(table):
        best = table[["oof_wll", "stacked_wll"]].min(axis=1)
        table = table.assign(_best=best).sort_values("_best", na_position="last").drop(columns="_best")
        table = table.reset_index(drop=True)
        try:
            write_csv(table, runs / "compare.csv")
            where = f"compare.csv in {runs if len(str(runs)) < 30 else 'the runs folder'}"
        except PermissionError:  # a read-only runs folder: the table is printed all the same
            where = "no compare.csv (read-only runs folder)"
        log.info(_text_table(table, wide))
        log.info(
            f"(every column: {where}, or --wide; losses: out-of-fold weighted log loss, lower is better)\n"
            f"(folds: done/k, 'mem': an ensemble's members; `make report CONFIG=<name>` fills auc_any)"
        )
    else:
        log.info(f"no finished experiment under {runs} (a fold counts once its training finished: done.json)")
    if unfinished:
        log.info(
            f"not finished yet (no fold with done.json; a best.pt alone is a fold still training or stopped): "
            f"{', '.join(unfinished)}"
        )
    return table
