"""`make report` and `make compare`: what a person looks at after a run.

`make_report` writes runs/<name>/report/: PNG figures, `index.html` (relative links), `series_table.csv`,
`thresholds.csv` and `summary.json` (read by `compare`). Each section reads the files the stages wrote
(fold*/log.csv, predictions/oof.csv or fold*/oof.csv, fold*/best.pt, stack/metrics.csv, meta.csv, folds.csv); a
section whose inputs are missing or broken becomes a note in the page, never a crash of the whole report.
The readers live in `report.runs`, the figures in `report.plots`, `compare` in `report.compare`.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..core import metrics
from ..core.labels import LABELS
from . import evaluation as ev
from ..core.config import Config
from ..core.errors import UserError, fix
from ..core.io import atomic_open, cannot_write, write_csv
from ..core.layout import Layout, Run
from . import plots
from .compare import compare, experiment_row, find_experiments
from .html import Page, Section
from .runs import (
    SUMMARY,
    _read_pred,
    fold_dirs,
    fold_done,
    oof_scores,
    read_labels,
    read_logs,
    read_meta,
    read_oof,
    trained_cv,
    weighted_bce,
)

log = logging.getLogger(__name__)

__all__ = ["make_report", "compare", "experiment_row", "find_experiments", "true_positives", "SECTIONS"]


# --- the report --------------------------------------------------------------------------------------------


@dataclass
class Context:
    cfg: Config
    layout: Layout
    run: Path
    out: Path
    threshold: float
    n_cam: int
    logs: dict[int, pd.DataFrame] = field(default_factory=dict)
    labels: pd.DataFrame | None = None
    joined: pd.DataFrame | None = None  # OOF slices: image_id, series_id, fold, truth LABELS, <label>_pred
    series: pd.DataFrame | None = None
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    members: list[tuple[str, Path]] = field(default_factory=list)  # (name, run folder): itself, or an ensemble's
    trained: dict[str, Config | None] = field(default_factory=dict)  # per member: the config its folds recorded

    @property
    def is_ensemble(self) -> bool:
        return self.cfg.is_ensemble

    def member_logs(self, name: str, run: Path) -> dict[int, pd.DataFrame]:
        return self.logs if run == self.run else read_logs(run)

    @property
    def cam_run(self) -> Path:
        """Whose fold models Grad-CAM explains: the run's own, or an ensemble's first member's."""
        return self.members[0][1] if self.members else self.run


def describe_trained(name: str, cfg: Config | None, run: Path) -> str:
    """One sentence from the config the folds recorded (what was trained, not the config file as it is now)."""
    if cfg is None:
        return f"'{name}': no fold config.yaml under {run} (nothing trained yet)."
    return (
        f"'{name}' as trained ({run.name}/fold*/config.yaml): backbone {cfg.model.backbone}, image "
        f"{cfg.data.image_size}px, windows {', '.join(cfg.data.windows)}, neighbours {cfg.data.neighbors}, "
        f"{cfg.train.epochs} epoch(s), batch {cfg.train.batch_size}, lr {cfg.train.lr:g}, {cfg.cv.k} folds "
        f'(its config\'s description: "{cfg.description or "-"}").'
    )


def provenance_row(run: Path) -> dict:
    """Data folder, code version and key packages the run's finished folds recorded (done.json)."""
    from ..core.provenance import recorded

    done = [recorded(d.done) for d in fold_dirs(run).values() if fold_done(d)]
    done = [d for d in done if "data" in d or "code" in d]
    if not done:
        return {"data": "-", "code": "-", "packages": "-"}
    first = done[0]
    code = first.get("code")
    commits = {(d.get("code") or {}).get("commit") for d in done}
    code_text = (
        "not in git"
        if code is None
        else f"{str(code.get('commit'))[:10]}{' (dirty)' if code.get('dirty') else ''}"
        + (" (folds differ)" if len(commits) > 1 else "")
    )
    packages = ", ".join(f"{k} {v}" for k, v in (first.get("packages") or {}).items() if v)
    return {"data": (first.get("data") or {}).get("path", "-"), "code": code_text, "packages": packages or "-"}


def _fold_rows(ctx: Context, member: str, run: Path, logs: dict[int, pd.DataFrame]) -> list[dict]:
    rows = []
    for fold, d in fold_dirs(run).items():
        lg = logs.get(fold)
        row = {
            "fold": fold,
            "finished": fold_done(d),
            "best.pt": d.best.exists(),
            "epochs logged": 0 if lg is None else len(lg),
        }
        if ctx.is_ensemble:
            row = {"member": member, **row}
        if lg is not None:
            if "val_weighted_log_loss" in lg and lg["val_weighted_log_loss"].notna().any():
                best = lg.loc[lg["val_weighted_log_loss"].idxmin()]
                row["best epoch"] = int(best["epoch"])
                row["best val weighted log loss"] = float(best["val_weighted_log_loss"])
            if "seconds" in lg:
                row["seconds / epoch"] = float(lg["seconds"].mean())
            if "train_images_per_s" in lg:
                row["train images / s"] = float(lg["train_images_per_s"].mean())
        rows.append(row)
    return rows


def _summary_section(ctx: Context, sec: Section) -> None:
    cfg = ctx.cfg
    if ctx.is_ensemble:
        info = _ensemble_info(ctx.run)
        weights = info.get("weights") or []
        sec.text(
            f"Ensemble '{cfg.name}': {cfg.description or 'no description'}. Members "
            f"{', '.join(name for name, _ in ctx.members)}, combined by "
            f"{'the mean of logits' if cfg.ensemble.combine == 'logit' else 'the mean of probabilities'}"
            + (f" (weights {', '.join(f'{w:.2f}' for w in weights)})" if weights else "")
            + "; the second stage stacks every member's predictions."
        )
        scores = info.get("oof_weighted_log_loss") or {}
        rows = []
        for name, run in ctx.members:
            trained = ctx.trained.get(name)
            done = sum(1 for d in fold_dirs(run).values() if fold_done(d))
            rows.append(
                {
                    "member": name,
                    "backbone": "-" if trained is None else trained.model.backbone,
                    "image px": "-" if trained is None else str(trained.data.image_size),
                    "epochs": "-" if trained is None else str(trained.train.epochs),
                    "folds done": f"{done}/{'?' if trained is None else trained.cv.k}",
                    "OOF weighted log loss": scores.get(name, float("nan")),
                }
            )
        rows.append(
            {
                "member": "ensemble",
                "backbone": f"combine={cfg.ensemble.combine}",
                "image px": "",
                "epochs": "",
                "folds done": "",
                "OOF weighted log loss": scores.get("ensemble", float("nan")),
            }
        )
        sec.table(pd.DataFrame(rows), "Members (from each member's recorded fold config) and the ensemble", index=False)
        for name, run in ctx.members:
            sec.text(describe_trained(name, ctx.trained.get(name), run))
    else:
        sec.text(describe_trained(cfg.name, ctx.trained.get(cfg.name), ctx.run))
    sec.table(
        pd.DataFrame([{"run": name, **provenance_row(run)} for name, run in ctx.members]),
        "What made the folds (done.json): data folder, code version, key packages",
        index=False,
    )
    rows = [row for name, run in ctx.members for row in _fold_rows(ctx, name, run, ctx.member_logs(name, run))]
    if rows:
        sec.table(pd.DataFrame(rows), "Folds", index=False)
    else:
        sec.note(f"No fold folders under {ctx.run}; train first (make train CONFIG={cfg.name}).")
    if ctx.summary.get("weighted_log_loss") is not None:
        table = pd.DataFrame([{"weighted log loss": ctx.summary["weighted_log_loss"], **ctx.summary["per_label"]}])
        sec.table(
            table,
            f"Out-of-fold competition metric on {len(ctx.joined)} images ({ctx.summary['oof_source']})",
            index=False,
        )
    stack_metrics = Run(ctx.run).stack.metrics
    if stack_metrics.exists():
        metrics_frame = pd.read_csv(stack_metrics)
        sec.table(metrics_frame, f"Second stage ({stack_metrics})", index=False)
        design = stack_design(Run(ctx.run).stack.test)
        if design:
            sec.note(design)
        sec.image(plots.stage_bars(metrics_frame, ctx.out / "stages.png"), ctx.out, "first vs second stage")
    else:
        sec.note(f"No {stack_metrics}: run make stack CONFIG={cfg.name} for the sequence model's comparison.")
    for note in ctx.notes:
        sec.note(note)


def _ensemble_info(run: Path) -> dict:
    try:
        return json.loads(Run(run).predictions.ensemble.read_text())
    except (OSError, ValueError):
        return {}


def _choice_section(ctx: Context, sec: Section) -> None:
    """What `make submit` sent: the stage it chose by OOF (read from its choice.json, not recomputed) and both
    scores, beside the second stage's own table."""
    path = Run(ctx.run).choice
    try:
        choice = json.loads(path.read_text())
    except (OSError, ValueError):
        sec.note(f"No {path}: nothing submitted yet (make submit CONFIG={ctx.cfg.name} chooses by OOF and writes it).")
        return
    stage = choice.get("stage", "?")
    losses = choice.get("oof_log_loss") or {}
    ctx.summary["submitted"] = stage
    sec.text(
        f"make submit chose the {'second (stacked)' if stage == 'stacked' else 'first'} stage"
        + (
            " by its out-of-fold weighted log loss: " + ", ".join(f"{k} {v:.5f}" for k, v in losses.items())
            if losses
            else " (no OOF score to choose by)"
        )
        + f". Submitted predictions: {choice.get('test')}."
    )
    if losses:
        rows = [
            {"stage": k, "OOF weighted log loss": v, "submitted": "yes" if k == stage else ""}
            for k, v in losses.items()
        ]
        sec.table(pd.DataFrame(rows), f"The choice by OOF ({path})", index=False)
    stack_metrics = Run(ctx.run).stack.metrics
    if stack_metrics.exists():
        frame = pd.read_csv(stack_metrics)
        if {"stage", "weighted_log_loss"} <= set(frame.columns):
            prior = ctx.summary.get("prior_weighted_log_loss")
            worse = [str(r.stage) for r in frame.itertuples() if prior is not None and r.weighted_log_loss >= prior]
            if worse:
                sec.note(f"Worse than the constant label prior ({prior:.5f}) out of fold: {', '.join(worse)}.")


def stack_design(stacked_test: Path) -> str | None:
    """One line from the stack's manifest: its model, whether and how it used embeddings, the folds it was fitted on."""
    from ..core import manifest

    made = manifest.read(stacked_test)
    if not made:
        return None
    s = made.get("settings", {})
    cv = s.get("cv", {})
    emb = (
        f"embeddings: {s.get('embedding_space', 'mixture')} ({s.get('embedding_dim')} components per model)"
        if s.get("use_embeddings")
        else "embeddings: no"
    )
    folds = f"cv.split={cv.get('split')}, folds {cv.get('folds')}" if cv else "folds: not recorded (older stack)"
    return f"Second stage: {s.get('model')}, {emb}; fitted on the first stage's folds ({folds})."


def _curves_section(ctx: Context, sec: Section) -> None:
    drawn = 0
    for name, run in ctx.members:
        for fold, lg in ctx.member_logs(name, run).items():
            stem = f"curves_{name}_fold{fold}" if ctx.is_ensemble else f"curves_fold{fold}"
            path = plots.training_curves(lg, fold, ctx.out / f"{stem}.png")
            sec.image(path, ctx.out, f"training curves {name} fold {fold}")
            drawn += 1
    if not drawn:
        sec.note(f"No {ctx.run}/fold*/log.csv: nothing trained yet.")
        return
    curve_csv = Run(ctx.run).stack.curve
    if curve_csv.exists():
        curve = pd.read_csv(curve_csv)
        if len(curve):
            sec.image(plots.stack_curve(curve, ctx.out / "stack_curve.png"), ctx.out, "second-stage validation curve")


def _need_oof(ctx: Context, sec: Section) -> bool:
    if ctx.joined is None or ctx.joined.empty:
        sec.note(f"Skipped: no out-of-fold predictions with labels ({ctx.summary.get('oof_source', 'none')}).")
        return False
    return True


def _ranking_section(ctx: Context, sec: Section) -> None:
    if not _need_oof(ctx, sec):
        return
    sec.text(
        "One panel per label. Solid: each slice scored alone; dashed: each CT series, positive when any "
        "slice is, scored by its most suspicious slice. Precision-recall is the honest view for rare subtypes "
        "(epidural is under 1% of slices): ROC can look good while precision stays low."
    )
    sec.image(plots.roc_grid(ctx.joined, ctx.series, ctx.out / "roc.png"), ctx.out, "ROC curves")
    sec.image(plots.pr_grid(ctx.joined, ctx.series, ctx.threshold, ctx.out / "pr.png"), ctx.out, "PR curves")


def _calibration_section(ctx: Context, sec: Section) -> None:
    from . import intervals

    if not _need_oof(ctx, sec):
        return
    curves = {"first stage": intervals.calibration_bins(ctx.joined["any"], ctx.joined[ev.pred_col("any")])}
    ece = {"first stage": intervals.expected_calibration_error(ctx.joined["any"], ctx.joined[ev.pred_col("any")])}
    stacked_path = Run(ctx.run).stack.oof
    if stacked_path.exists():
        stacked = ev.join_truth_pred(ctx.labels, _read_pred(stacked_path))
        if len(stacked):
            curves["stacked"] = intervals.calibration_bins(stacked["any"], stacked[ev.pred_col("any")])
            ece["stacked"] = intervals.expected_calibration_error(stacked["any"], stacked[ev.pred_col("any")])
    ctx.summary["calibration_error_any"] = ece
    sec.text(
        "Out of fold, slices binned by their predicted 'any' probability: a calibrated model's points lie on "
        "the diagonal (of the slices given p=0.3, 30 % bleed); the log loss rewards calibration as much as "
        "ranking. Expected calibration error (count-weighted mean gap): "
        + ", ".join(f"{k} {v:.3f}" for k, v in ece.items())
        + "."
    )
    sec.image(
        plots.calibration(curves, ctx.out / "calibration.png", "Calibration of 'any', out of fold"),
        ctx.out,
        "calibration of any",
    )


def _threshold_section(ctx: Context, sec: Section) -> None:
    if not _need_oof(ctx, sec):
        return
    t = ctx.threshold
    panels = [("slice", ev.confusion(ctx.joined["any"], ctx.joined["any_pred"], t))]
    if ctx.series is not None:
        panels.append(("series", ev.confusion(ctx.series["any"], ctx.series["any_pred"], t)))
    sec.image(plots.confusion_matrices(panels, "any", t, ctx.out / "confusion_any.png"), ctx.out, "confusion any")
    table = ev.threshold_table(ctx.joined, t)
    write_csv(table.reset_index(), ctx.out / "thresholds.csv")
    sec.image(plots.f1_bars(table, t, ctx.out / "f1.png"), ctx.out, "F1 per label")
    sec.table(
        table,
        f"Slice level, threshold {t:g} (BEST_THR/BEST_F1: the threshold maximising F1 on these OOF "
        f"predictions, optimistic because it is chosen on the same data)",
    )


def _series_section(ctx: Context, sec: Section) -> None:
    if not _need_oof(ctx, sec):
        return
    if ctx.series is None:
        sec.note("Skipped: the labels table has no series_id column.")
        return
    table = ev.series_table(ctx.joined, ctx.threshold)
    write_csv(table.reset_index(), ctx.out / "series_table.csv")
    stacked_path = Run(ctx.run).stack.oof
    sec.text(
        f"As Danilov, Kotik et al. present their clinical test: per CT series (n={len(ctx.series)}), a series is "
        f"positive for a subtype when any of its slices is; its probability is the maximum over its slices and "
        f"it is called positive at p >= {ctx.threshold:g}. POS/NEG: series counts (share)."
    )
    sec.table(
        _with_ci(ctx, table, ctx.series, "series_auc_any_ci"),
        f"Series-level quality metrics, first stage ({ctx.summary['oof_source']}); AUC with its bootstrap 95 % "
        f"interval over {len(ctx.series)} series",
    )
    if stacked_path.exists():
        stacked = ev.join_truth_pred(ctx.labels, _read_pred(stacked_path))
        if len(stacked) and "series_id" in stacked:
            stacked_table = ev.series_table(stacked, ctx.threshold)
            write_csv(stacked_table.reset_index(), ctx.out / "series_table_stacked.csv")
            ctx.summary["series_auc_any_stacked"] = float(stacked_table.loc["any", "AUC"])
            sec.table(
                _with_ci(ctx, stacked_table, ev.series_frame(stacked), "series_auc_any_stacked_ci"),
                f"Series-level quality metrics, stacked ({stacked_path})",
            )


def _with_ci(ctx: Context, table: pd.DataFrame, series: pd.DataFrame, key: str) -> pd.DataFrame:
    """The formatted series table with bootstrap 95 % intervals on the AUCs (a few dozen series: wide)."""
    from . import intervals

    cis = intervals.series_auc_intervals(series)
    ctx.summary[key] = [cis.loc["any", "AUC_LO"], cis.loc["any", "AUC_HI"]]
    return intervals.with_intervals(ev.format_series_table(table), cis)


def _cam_examples(ctx: Context, rows: pd.DataFrame) -> tuple[dict[str, list[plots.CamExample]], list[str]]:
    """Grad-CAM for `rows` (joined OOF rows with `gallery` and `cam_label` columns), each image explained by its
    own fold's best.pt; each fold model is loaded once for all galleries. Returns examples per gallery, in row order."""
    import torch

    from ..data.dataset import SliceDataset
    from ..data.transforms import build_eval_transforms
    from .gradcam import GradCAM, overlay
    from ..models.checkpoint import load_checkpoint

    rows = rows.reset_index(drop=True)
    found: dict[int, plots.CamExample] = {}
    problems = []
    for fold, group in rows.groupby("fold", sort=True):
        ckpt = Run(ctx.cam_run).fold(int(fold)).best
        if not ckpt.exists():
            problems.append(f"{ckpt} missing: {len(group)} example(s) of fold {int(fold)} without Grad-CAM")
            continue
        try:
            model, mcfg = load_checkpoint(ckpt)
        except UserError as e:  # a truncated or foreign checkpoint costs its examples, not the report
            problems.append(str(e))
            continue
        frame = group.drop_duplicates("image_id")
        dataset = SliceDataset(frame[["image_id", *LABELS]], ctx.layout, mcfg, transform=build_eval_transforms(mcfg))
        images = dict(zip(frame["image_id"], (dataset[i][0] for i in range(len(dataset)))))
        unreadable = set(dataset.failed)
        x = torch.stack([images[i] for i in group["image_id"]])
        idx = [LABELS.index(label) for label in group["cam_label"]]
        with GradCAM(model) as cam:
            maps, probs = cam(x, idx)
        windows = list(mcfg.data.windows)
        channel = mcfg.data.neighbors * len(windows) + (windows.index("brain") if "brain" in windows else 0)
        for i, (row_id, row) in enumerate(group.iterrows()):
            if row["image_id"] in unreadable:
                problems.append(f"{row['image_id']}: cached image unreadable, no Grad-CAM")
                continue
            image = x[i, channel].numpy()
            label, j = row["cam_label"], idx[i]
            # the probability the gallery was chosen by (OOF; an ensemble's combination) and the explained model's
            explained = f"{label}: truth {int(row[label])}, p {row[ev.pred_col(label)]:.2f}"
            if label != "any":
                explained = f"any p {row[ev.pred_col('any')]:.2f}\n{explained}"
            title = f"{row['image_id']}, fold {int(fold)}\n{explained}"
            empty = not np.any(maps[i] > 0)  # every location argues against the label: Grad-CAM's ReLU leaves 0
            found[row_id] = plots.CamExample(
                image=image,
                overlay=overlay(image, maps[i]),
                title=title,
                cam_title=(
                    f"Grad-CAM, model p {probs[i, j]:.2f}\n"
                    + ("no positive evidence" if empty else "red raises the score")
                ),
            )
    out: dict[str, list[plots.CamExample]] = {}
    for row_id, gallery in rows["gallery"].items():
        if row_id in found:
            out.setdefault(gallery, []).append(found[row_id])
    return out, sorted(set(problems), key=problems.index)


GALLERIES = {
    "positives": "Most confident true positives (truth any=1 and p >= threshold, highest p first)",
    "errors": "Worst errors (highest per-image weighted log loss; the label explained is the worst one)",
}


def true_positives(joined: pd.DataFrame, threshold: float, n: int) -> pd.DataFrame:
    """The `n` most confident true positives: truth any=1 and 'any' predicted at or above the threshold, highest
    first; each explains the true subtype the model is surest of (`any` when no subtype is labelled)."""
    hit = joined[(joined["any"] > 0.5) & (joined[ev.pred_col("any")] >= threshold)]
    pos = hit.nlargest(n, ev.pred_col("any")).copy()
    subtypes = list(LABELS[1:])
    pos["cam_label"] = [
        max((s for s in subtypes if r[s] > 0.5), key=lambda s: r[ev.pred_col(s)], default="any")
        for _, r in pos.iterrows()
    ]
    return pos


def _gradcam_section(ctx: Context, sec: Section) -> None:
    if ctx.n_cam <= 0:
        sec.note("Grad-CAM turned off (--gradcam 0).")
        return
    if not _need_oof(ctx, sec):
        return
    if "fold" not in ctx.joined:
        sec.note("Skipped: the labels table has no fold column, so the model that never saw each image is unknown.")
        return
    joined = ctx.joined
    pos = true_positives(joined, ctx.threshold, ctx.n_cam)
    worst = joined.assign(loss=weighted_bce(joined)).nlargest(ctx.n_cam, "loss").copy()
    y = worst[list(LABELS)].to_numpy(float)
    p = worst[[ev.pred_col(label) for label in LABELS]].to_numpy(float)
    worst["cam_label"] = [LABELS[k] for k in np.argmax(metrics.bce(y, p), axis=1)]
    whose = f" of member '{ctx.members[0][0]}'" if ctx.is_ensemble and ctx.members else ""
    sec.text(
        f"Grad-CAM (Selvaraju et al.) on the backbone's last feature map of the fold model{whose} that did not "
        f"train on the slice: red areas raise the explained label's score. Left of each pair the model's input "
        f"(brain window, after the black-border crop) with the OOF probability the gallery was chosen by, right "
        f"the overlay with that fold model's own probability. True positives: slices with any=1 predicted at "
        f"p >= {ctx.threshold:g} ({len(pos)} shown)."
    )
    rows = pd.concat([pos.assign(gallery="positives"), worst.assign(gallery="errors")], ignore_index=True)
    examples, problems = _cam_examples(ctx, rows) if len(rows) else ({}, [])
    for problem in problems:
        sec.note(problem)
    for gallery, title in GALLERIES.items():
        if gallery not in examples:
            sec.note(f"No Grad-CAM {gallery} to show.")
            continue
        sec.image(plots.gradcam_gallery(examples[gallery], title, ctx.out / f"gradcam_{gallery}.png"), ctx.out, title)


def _test_section(ctx: Context, sec: Section) -> None:
    """Held-out test scores when the data folder has test labels (the synthetic competition; never Kaggle's)."""
    files = {
        "first stage (TTA, mean of folds)": Run(ctx.run).predictions.test,
        "second stage (stacked)": Run(ctx.run).stack.test,
    }
    if not ctx.layout.test_labels_csv.exists():
        sec.note(
            f"No {ctx.layout.test_labels_csv}: the real competition keeps test labels on Kaggle "
            f"(make submit scores there); out-of-fold sections above are the local estimate."
        )
        return
    present = {name: path for name, path in files.items() if path.exists()}
    if not present:
        sec.note(f"No {' or '.join(map(str, files.values()))}: run make predict (and make stack) first.")
        return
    from ..core.labels import read_labels as read_label_csv

    truth = read_label_csv(ctx.layout.test_labels_csv)
    meta, _ = read_meta(ctx.layout)
    if meta is not None and "series_id" in meta:
        truth = truth.merge(meta[["image_id", "series_id"]].drop_duplicates("image_id"), on="image_id", how="left")
    rows, tables = [], {}
    for name, path in present.items():
        joined = ev.join_truth_pred(truth, _read_pred(path))
        if joined.empty:
            sec.note(f"{path}: no image in common with {ctx.layout.test_labels_csv}.")
            continue
        score = oof_scores(joined)
        row = {
            "predictions": name,
            "images": len(joined),
            "weighted log loss": score["weighted_log_loss"],
            **score["per_label"],
        }
        if "series_id" in joined and joined["series_id"].notna().all():
            tables[name] = ev.series_table(joined, ctx.threshold)
            row["series AUC (any)"] = float(tables[name].loc["any", "AUC"])
        rows.append(row)
    if rows:
        ctx.summary["test"] = rows
        sec.table(pd.DataFrame(rows), f"Test set ({ctx.layout.test_labels_csv})", index=False)
    for name, table in tables.items():
        sec.table(ev.format_series_table(table), f"Series level on the test set, {name}, threshold {ctx.threshold:g}")


def _data_section(ctx: Context, sec: Section) -> None:
    if ctx.labels is not None and len(ctx.labels):
        sec.image(plots.label_counts(ctx.labels, ctx.out / "label_counts.png"), ctx.out, "label counts")
        sec.image(plots.cooccurrence(ctx.labels, ctx.out / "cooccurrence.png"), ctx.out, "label co-occurrence")
    else:
        sec.note(f"Label overview skipped: {ctx.summary.get('labels_source', 'no labels')}.")
    meta, source = read_meta(ctx.layout)
    if meta is None or meta.empty:
        sec.note(f"DICOM overview skipped: {source}.")
        return
    sec.text(
        f"From {source}: {len(meta)} images, {meta['series_id'].nunique() if 'series_id' in meta else '?'} "
        f"series. Images with RescaleIntercept other than -1024 or BitsStored 12 are the odd ones the HU "
        f"conversion has to handle."
    )
    sec.image(plots.dicom_values(meta, ctx.out / "dicom_values.png"), ctx.out, "BitsStored and RescaleIntercept")
    if "series_id" in meta:
        sec.image(plots.series_lengths(meta, ctx.out / "series_lengths.png"), ctx.out, "series lengths")


# key (for `sections=`), title, builder; in page order
SECTIONS: list[tuple[str, str, Callable[[Context, Section], None]]] = [
    ("summary", "Summary", _summary_section),
    ("choice", "What was submitted", _choice_section),
    ("curves", "Training curves", _curves_section),
    ("ranking", "ROC and precision-recall", _ranking_section),
    ("calibration", "Calibration", _calibration_section),
    ("thresholds", "Thresholds, confusion matrix and F1", _threshold_section),
    ("series", "Series-level evaluation", _series_section),
    ("test", "Held-out test set", _test_section),
    ("gradcam", "Grad-CAM", _gradcam_section),
    ("data", "Data overview", _data_section),
]


def _prepare(ctx: Context) -> None:
    """Read every input once and fill the summary (what `compare` shows), whichever sections are drawn."""
    ctx.logs = read_logs(ctx.run)
    ctx.trained = {name: recorded_config(run) for name, run in ctx.members}
    ctx.summary["folds_done"] = sum(1 for d in fold_dirs(ctx.run).values() if fold_done(d))
    if ctx.is_ensemble:
        ctx.summary["members"] = {
            name: sum(1 for d in fold_dirs(run).values() if fold_done(d)) for name, run in ctx.members
        }
    secs = [lg["seconds"].mean() for lg in ctx.logs.values() if "seconds" in lg]
    ctx.summary["sec_per_epoch"] = float(np.mean(secs)) if secs else None
    cv = trained_cv(ctx.cam_run)
    if cv is not None and cv != (ctx.cfg.cv.k, ctx.cfg.cv.seed):
        ctx.notes.append(
            f"The folds were trained with cv.k={cv[0]}, cv.seed={cv[1]} (fold config.yaml), not the "
            f"config's {ctx.cfg.cv.k}/{ctx.cfg.cv.seed}: labels and folds follow the trained split."
        )
    ctx.labels, ctx.summary["labels_source"] = read_labels(ctx.cfg, ctx.layout, cv)
    try:
        oof, ctx.summary["oof_source"] = read_oof(ctx.run, ctx.notes)
    except Exception as e:  # a broken prediction file: report it, keep the rest of the report
        oof, ctx.summary["oof_source"] = None, f"unreadable: {e}"
    if oof is None or ctx.labels is None:
        if ctx.labels is None:
            ctx.notes.append(f"No labels: {ctx.summary['labels_source']}.")
        return
    joined = ev.join_truth_pred(ctx.labels, oof, keep=("series_id", "fold"))
    dropped = len(oof) - len(joined)
    if dropped:
        ctx.notes.append(f"{dropped} OOF predictions have no label in the folds table and were left out.")
    ctx.joined = joined
    ctx.series = ev.series_frame(joined) if "series_id" in joined else None
    ctx.summary["images"] = len(joined)
    if len(joined):
        score = oof_scores(joined)
        prior = joined[list(LABELS)].mean().to_dict()  # the constant every stage must beat
        ctx.summary["prior_weighted_log_loss"] = oof_scores(
            joined.assign(**{ev.pred_col(label): prior[label] for label in LABELS})
        )["weighted_log_loss"]
        ctx.summary["weighted_log_loss"] = score["weighted_log_loss"]
        ctx.summary["per_label"] = score["per_label"]
        if ctx.series is not None:
            y, p = ctx.series["any"].to_numpy(), ctx.series[ev.pred_col("any")].to_numpy()
            ctx.summary["series_auc_any"] = ev.roc_auc(y, p)


def recorded_config(run: Path) -> Config | None:
    """The config the run's folds recorded (a finished fold's config.yaml first): what was trained."""
    from ..core import config as C

    dirs = sorted(fold_dirs(run).values(), key=lambda d: not fold_done(d))
    for d in dirs:
        if d.config.exists():
            try:
                import yaml

                return C.from_dict(yaml.safe_load(d.config.read_text()) or {}, source=str(d.config))
            except Exception as e:  # an unreadable record: say so, describe nothing rather than the wrong thing
                log.warning("%s unreadable (%s)", d.config, e)
    return None


def recorded_layout(runs: list[Path], layout: Layout) -> tuple[Layout, str | None]:
    """The data folder the runs' folds trained on (done.json), when it is not `layout`'s and still exists: the
    report describes what was trained, wherever the layout put it (the demo's data/synth included)."""
    from ..core.provenance import recorded

    for run in runs:
        for d in fold_dirs(run).values():
            path = (recorded(d.done).get("data") or {}).get("path")
            if path and Path(path).is_dir() and Path(path).resolve() != layout.data.resolve():
                return Layout.of(path), f"data folder {path} (recorded by {d.done}), not {layout.data}"
            if path:
                return layout, None
    return layout, None


def make_report(
    cfg: Config,
    layout: Layout,
    runs: str | Path = "runs",
    threshold: float = 0.5,
    gradcam: int = 8,
    sections: list[str] | None = None,
) -> Path:
    """Write runs/<name>/report/index.html and its figures; returns the page's path.

    An ensemble gets one page: its members (as each was trained), the ensemble, the second stage, what submit chose
    by OOF. The data folder is the one the folds recorded. `sections` picks a subset of `SECTIONS` keys (default:
    all); summary.json is always written.
    """
    if not 0.0 < threshold < 1.0:
        raise UserError(f"{fix('--threshold', 'THRESHOLD')} {threshold} must be between 0 and 1 (exclusive), e.g. 0.5")
    keys = [key for key, _, _ in SECTIONS]
    unknown = [key for key in sections or [] if key not in keys]
    if unknown:
        raise UserError(f"unknown report section(s) {unknown}; choose from {', '.join(keys)}")
    ctx = _context(cfg, layout, runs, threshold, gradcam)
    stale = _stale_inputs(cfg, ctx.layout, runs)
    ctx.notes += [f"Warning: {why}" for why in stale]
    for why in stale:
        log.warning(f"report: {why}")
    page = Page(f"ich_kaggle report: {cfg.name}")
    skipped = _build_sections(ctx, page, [s for s in SECTIONS if sections is None or s[0] in sections])
    ctx.summary["written"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with atomic_open(ctx.out / SUMMARY) as f:
        json.dump(ctx.summary, f, indent=2, default=float)
    index = page.write(ctx.out / "index.html")
    log.info(f"report: {index}")
    if skipped or stale:  # the page is written, but it is not the whole report of fresh inputs: not exit 0
        what = (
            f"{len(skipped)} section(s) skipped ({', '.join(skipped)}; see the warnings above)"
            if skipped
            else f"made from stale inputs ({stale[0]})"
        )
        raise UserError(f"report {index} is incomplete: {what}; fix that and rerun `make report CONFIG={cfg.name}`")
    return index


def _context(cfg: Config, layout: Layout, runs: str | Path, threshold: float, n_cam: int) -> Context:
    """The report's inputs, resolved once: the run (each member's, for an ensemble), the data folder its folds
    recorded, and what every section reads (`_prepare`)."""
    run = Run.of(runs, cfg.name).dir
    if not run.is_dir():
        raise UserError(
            f"{run} not found; train first (make train CONFIG={cfg.name}) "
            f"or pass {fix('--runs <folder>', 'RUNS=<folder>')}"
        )
    if cfg.is_ensemble:
        from ..core.ensemble import member_names

        members = [(name, Run.of(runs, name).dir) for name in member_names(cfg)]
    else:
        members = [(cfg.name, run)]
    layout, moved = recorded_layout([r for _, r in members], layout)
    ctx = Context(
        cfg=cfg, layout=layout, run=run, out=Run(run).report, threshold=threshold, n_cam=n_cam, members=members
    )
    if moved:
        ctx.notes.append(f"Reported on the {moved}.")
        log.info(f"report: {moved}")
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.summary.update(name=cfg.name, threshold=threshold)
    try:
        _prepare(ctx)
    except UserError as e:  # e.g. an OOF file without the label columns: the page says which file
        ctx.notes.append(str(e))
    return ctx


def _build_sections(ctx: Context, page: Page, chosen: list) -> list[str]:
    """Each chosen section into `page`; the titles of those that failed. One broken input costs only its section
    (the page says why), except a full or read-only disk, which every later section would hit too."""
    skipped: list[str] = []
    for key, title, build in tqdm(chosen, desc="report", unit="section", leave=False):
        sec = page.section(title)
        start = time.time()
        try:
            build(ctx, sec)
        except Exception as e:
            if isinstance(e, OSError) and e.errno in (
                errno.ENOSPC,
                errno.EDQUOT,
                errno.EACCES,
                errno.EPERM,
                errno.EROFS,
            ):
                raise cannot_write(e.filename or ctx.out, e) from None
            skipped.append(title)
            log.warning(f"report section '{title}' skipped: {type(e).__name__}: {e}")
            sec.note(f"Section failed: {type(e).__name__}: {e}")
        log.debug("section %s: %.1f s", title, time.time() - start)
    return skipped


def _stale_inputs(cfg: Config, layout: Layout, runs: str | Path) -> list[str]:
    """What `predict`/`submit` would refuse among the files the report reads: folds trained on another split or
    config, predictions whose chain no longer holds (a fold retrained, a file cut short)."""
    from ..core import freshness, manifest
    from ..data import trained

    out = []
    if not cfg.is_ensemble and (layout.train_dir.is_dir() or layout.test_dir.is_dir()):  # a report may lack the data
        try:
            trained.check(cfg, layout, runs)
        except UserError as e:
            out.append(str(e))
    pred = Run.of(runs, cfg.name).predictions
    for path in (pred.oof, pred.test):
        if manifest.read(path) is not None and (why := freshness.chain_reason(path)):
            out.append(f"{path} is stale ({why}); rerun `make predict CONFIG={cfg.name}`")
    return out
