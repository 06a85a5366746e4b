"""Report figures. Object-oriented matplotlib (`Figure`, no pyplot state), Agg canvas, each PNG written atomically.

Every function takes plain frames/arrays and an output path and returns the path, so each is testable alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from ..core.labels import LABELS
from . import evaluation as ev
from ..core.io import atomic_path

DPI = 100
PAGE_PX = 1400  # the report page's max-width (html.CSS): a wider figure is shown scaled down
SMALL = 10  # points: the smallest text in a figure (legends, bar labels, captions) -- 14 px at DPI 100
MIN_TEXT_PX = 12.5  # no figure text is displayed smaller than this (the page's own text is ~14-16 px)
COLORS = dict(zip(LABELS, ("#222222", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")))


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """PNG, written atomically (a crash never leaves a truncated image behind)."""
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


# --- training ----------------------------------------------------------------------------------------------


def training_curves(log: pd.DataFrame, fold: int, path: str | Path) -> Path:
    """Per fold: train loss vs validation weighted log loss, validation log loss per label, learning rate."""
    fig = new_figure(15, 4.2)
    ax_loss, ax_labels, ax_lr = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1.2, 0.8]})
    epochs = log["epoch"].to_numpy()
    if "train_loss" in log:
        ax_loss.plot(epochs, log["train_loss"], "o-", label="train loss (weighted BCE)", color="#7f7f7f")
    if "val_weighted_log_loss" in log:
        val = log["val_weighted_log_loss"].to_numpy(float)
        ax_loss.plot(epochs, val, "o-", label="validation weighted log loss", color="#d62728")
        if np.isfinite(val).any():
            best = int(np.nanargmin(val))
            ax_loss.scatter(
                [epochs[best]],
                [val[best]],
                s=140,
                facecolors="none",
                edgecolors="k",
                zorder=5,
                label=f"best: epoch {epochs[best]}, {val[best]:.4f}",
            )
    ax_loss.set(title=f"Fold {fold}: loss per epoch", xlabel="epoch", ylabel="log loss")
    ax_loss.legend(fontsize=SMALL)
    for label in LABELS:
        col = f"val_{label}"
        if col in log:
            ax_labels.plot(epochs, log[col], "o-", label=label, color=COLORS[label], markersize=4)
    ax_labels.set(title=f"Fold {fold}: validation log loss per label", xlabel="epoch", ylabel="log loss")
    ax_labels.legend(fontsize=SMALL, ncol=2)
    if "lr" in log:
        ax_lr.plot(epochs, log["lr"], "o-", color="#17becf")
        if (log["lr"] > 0).all():
            ax_lr.set_yscale("log")
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch", ylabel="lr (log scale)")
    for ax in (ax_loss, ax_labels, ax_lr):
        ax.grid(alpha=0.3)
        ax.set_xticks(epochs)
    return save(fig, path)


# --- ranking curves ----------------------------------------------------------------------------------------


def stack_curve(curve: pd.DataFrame, path: str | Path) -> Path:
    """The second stage's inner validation loss per fold (stack/curve.csv), the step it kept marked."""
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for fold, part in curve.groupby("fold"):
        (line,) = ax.plot(part["epoch"], part["val_loss"], marker=".", label=f"fold {fold}")
        best = part.loc[part["val_loss"].idxmin()]
        ax.plot([best["epoch"]], [best["val_loss"]], marker="*", markersize=12, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("inner validation weighted log loss")
    ax.set_title("second stage: stopped on its inner validation split (star: weights kept)")
    ax.legend(fontsize=SMALL)
    return save(fig, path)


def _grid(title: str) -> tuple[Figure, np.ndarray]:
    fig = new_figure(14, 8.6)
    axes = fig.subplots(2, 3)
    fig.suptitle(title, fontsize=13)
    return fig, axes.ravel()


def roc_grid(slices: pd.DataFrame, series: pd.DataFrame | None, path: str | Path) -> Path:
    """ROC per label: slice level and (when series ids are known) series level, as Danilov/Kotik's Figure 1."""
    fig, axes = _grid("ROC curves per label (out-of-fold): slice level and series level (max over slices)")
    for ax, label in zip(axes, LABELS):
        for frame, name, style in ((slices, "slices", "-"), (series, "series", "--")):
            if frame is None or frame.empty:
                continue
            y, p = frame[label].to_numpy(), frame[ev.pred_col(label)].to_numpy()
            auc = ev.roc_auc(y, p)
            if np.isnan(auc):
                ax.plot([], [], style, color=COLORS[label], label=f"{name}: one class only, no ROC")
                continue
            fpr, tpr = ev.roc_points(y, p)
            ax.plot(
                fpr,
                tpr,
                style,
                color=COLORS[label],
                drawstyle="default",
                label=f"{name} (n={len(frame)}, pos={int((y > 0.5).sum())}): AUC {auc:.3f}",
            )
        ax.plot([0, 1], [0, 1], ":", color="#aaaaaa", label="chance")
        ax.set(
            title=label,
            xlabel="false positive rate (1 - specificity)",
            ylabel="true positive rate (recall)",
            xlim=(-0.01, 1.01),
            ylim=(-0.01, 1.01),
            aspect="equal",
        )
        ax.legend(fontsize=SMALL, loc="lower right")
        ax.grid(alpha=0.3)
    return save(fig, path)


def pr_grid(slices: pd.DataFrame, series: pd.DataFrame | None, threshold: float, path: str | Path) -> Path:
    """Precision-recall per label (the rare-class view), with the best-F1 point and the fixed threshold marked."""
    fig, axes = _grid(f"Precision-recall curves per label (out-of-fold); o = best F1, x = threshold {threshold:g}")
    for ax, label in zip(axes, LABELS):
        for frame, name, style in ((slices, "slices", "-"), (series, "series", "--")):
            if frame is None or frame.empty:
                continue
            y, p = frame[label].to_numpy(), frame[ev.pred_col(label)].to_numpy()
            ap = ev.average_precision(y, p)
            if np.isnan(ap):
                ax.plot([], [], style, color=COLORS[label], label=f"{name}: no positives, no PR curve")
                continue
            recall, precision = ev.pr_points(y, p)
            (line,) = ax.step(
                recall,
                precision,
                style,
                where="post",
                color=COLORS[label],
                label=f"{name}: AP {ap:.3f}, prevalence {np.mean(y > 0.5):.3f}",
            )
            thr, f1 = ev.best_f1(y, p)
            best = ev.confusion(y, p, thr)
            ax.plot(
                best.recall,
                best.precision,
                "o",
                color=line.get_color(),
                markersize=8,
                mfc="none",
                mew=2,
                label=f"{name} best F1 {f1:.3f} at p>={thr:.2f}",
            )
            fixed = ev.confusion(y, p, threshold)
            ax.plot(fixed.recall, fixed.precision, "x", color=line.get_color(), markersize=9, mew=2)
        ax.set(title=label, xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(-0.01, 1.01), ylim=(0, 1.03))
        ax.legend(fontsize=SMALL, loc="lower left")
        ax.grid(alpha=0.3)
    return save(fig, path)


def confusion_matrices(panels: list[tuple[str, ev.Confusion]], label: str, threshold: float, path: str | Path) -> Path:
    """2x2 confusion matrices (counts and row percentages), one panel per level (slices, series)."""
    fig = new_figure(5.2 * len(panels), 4.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, cm) in zip(axes, panels):
        m = cm.matrix()
        rows = m.sum(axis=1, keepdims=True)
        share = np.divide(m, np.maximum(rows, 1))
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]}\n({share[i, j]:.1%} of row)",
                    ha="center",
                    va="center",
                    fontsize=11,
                    color="white" if share[i, j] > 0.6 else "black",
                )
        ax.set_xticks([0, 1], [f"predicted negative\n(p < {threshold:g})", f"predicted positive\n(p >= {threshold:g})"])
        ax.set_yticks([0, 1], ["truly negative", "truly positive"])
        ax.set_title(
            f"'{label}' per {name}: acc {cm.accuracy:.3f}, prec {cm.precision:.3f}, rec {cm.recall:.3f}", fontsize=10
        )
    return save(fig, path)


def f1_bars(table: pd.DataFrame, threshold: float, path: str | Path, level: str = "slice") -> Path:
    """F1 per label at the fixed threshold next to the best achievable F1 (its threshold written on the bar)."""
    fig = new_figure(10, 4.6)
    ax = fig.subplots()
    x = np.arange(len(table))
    fixed = ax.bar(x - 0.2, table["F1"], 0.4, label=f"F1 at threshold {threshold:g}", color="#1f77b4")
    best = ax.bar(x + 0.2, table["BEST_F1"], 0.4, label="best F1 (threshold chosen on these OOF)", color="#ff7f0e")
    ax.bar_label(fixed, fmt="%.2f", fontsize=SMALL)
    ax.bar_label(
        best,
        labels=[f"{f:.2f}\n@{t:.2f}" if np.isfinite(t) else "-" for f, t in zip(table["BEST_F1"], table["BEST_THR"])],
        fontsize=SMALL,
    )
    ax.set_xticks(x, list(table.index))
    ax.set(ylim=(0, 1.18), ylabel="F1", title=f"Thresholded F1 per label ({level} level, out-of-fold)")
    ax.legend(fontsize=SMALL, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


# --- data overview -----------------------------------------------------------------------------------------


def label_counts(labels: pd.DataFrame, path: str | Path) -> Path:
    """Positive images per label (and positive series when series ids are present), with prevalence."""
    has_series = "series_id" in labels
    fig = new_figure(13 if has_series else 7, 4.4)
    axes = np.atleast_1d(fig.subplots(1, 2 if has_series else 1))
    views = [("images", labels[list(LABELS)])]
    if has_series:
        views.append(("series", labels.groupby("series_id")[list(LABELS)].max()))
    for ax, (name, frame) in zip(axes, views):
        counts = frame.sum().astype(int)
        bars = ax.bar(list(LABELS), counts, color=[COLORS[label] for label in LABELS])
        ax.bar_label(bars, labels=[f"{c}\n({c / max(len(frame), 1):.1%})" for c in counts], fontsize=SMALL)
        ax.set(
            title=f"Positive {name} per label (of {len(frame)} labelled {name})",
            ylabel=f"positive {name}",
            ylim=(0, max(counts.max(), 1) * 1.25),
        )
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def cooccurrence(labels: pd.DataFrame, path: str | Path) -> Path:
    """Images positive for both labels; the diagonal is each label's count. Shows how subtypes come together."""
    y = labels[list(LABELS)].to_numpy(np.int64)
    m = y.T @ y
    fig = new_figure(7.2, 6)
    ax = fig.subplots()
    im = ax.imshow(np.log1p(m), cmap="viridis")
    for i in range(len(LABELS)):
        for j in range(len(LABELS)):
            ax.text(
                j,
                i,
                str(m[i, j]),
                ha="center",
                va="center",
                fontsize=SMALL,
                color="black" if np.log1p(m[i, j]) > 0.6 * np.log1p(m.max()) else "white",
            )
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=35, ha="right")
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_title("Label co-occurrence (images positive for both)")
    fig.colorbar(im, ax=ax, label="log(1 + images)")
    return save(fig, path)


def dicom_values(meta: pd.DataFrame, path: str | Path) -> Path:
    """BitsStored and RescaleIntercept value counts, train vs test: the corrupted-intercept check at a glance."""
    fig = new_figure(13, 4.4)
    axes = fig.subplots(1, 2)
    for ax, col, title in ((axes[0], "bits_stored", "BitsStored"), (axes[1], "intercept", "RescaleIntercept")):
        if col not in meta:
            ax.text(0.5, 0.5, f"no '{col}' column in meta.csv", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        split = meta["split"] if "split" in meta else pd.Series("all", index=meta.index)
        table = pd.crosstab(meta[col], split).sort_index()
        x = np.arange(len(table))
        width = 0.8 / max(len(table.columns), 1)
        for k, name in enumerate(table.columns):
            bars = ax.bar(x + (k - (len(table.columns) - 1) / 2) * width, table[name], width, label=str(name))
            ax.bar_label(bars, fontsize=SMALL)
        ax.set_xticks(x, [f"{v:g}" if isinstance(v, (int, float, np.number)) else str(v) for v in table.index])
        ax.set(title=f"{title} per image", xlabel=title, ylabel="images", ylim=(0, table.to_numpy().max() * 1.18))
        ax.legend(title="split", fontsize=SMALL)
        ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def series_lengths(meta: pd.DataFrame, path: str | Path) -> Path:
    """Slices per CT series (train vs test): the sequence lengths the second stage sees."""
    per_series = meta.groupby("series_id").agg(
        length=("series_len", "first") if "series_len" in meta else ("image_id", "size"),
        split=("split", "first") if "split" in meta else ("image_id", lambda s: "all"),
    )
    fig = new_figure(8, 4.4)
    ax = fig.subplots()
    lo, hi = int(per_series["length"].min()), int(per_series["length"].max())
    bins = np.arange(lo, hi + 2) - 0.5 if hi - lo < 40 else 30
    groups = [(name, g["length"].to_numpy()) for name, g in per_series.groupby("split")]
    ax.hist([g for _, g in groups], bins=bins, stacked=True, label=[f"{n} ({len(g)} series)" for n, g in groups])
    ax.set(
        title=f"Slices per series (median {per_series['length'].median():g}, range {lo}-{hi})",
        xlabel="slices in the series",
        ylabel="series",
    )
    ax.legend(fontsize=SMALL)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


# --- Grad-CAM ----------------------------------------------------------------------------------------------


@dataclass
class CamExample:
    image: np.ndarray  # (H, W) grey in [0, 1]
    overlay: np.ndarray  # (H, W, 3) uint8
    title: str
    cam_title: str = "Grad-CAM (red = raises the score)"


def gallery_figure(examples: list[CamExample], title: str, per_row: int = 2) -> Figure:
    """Each example as a pair: the input (brain window) and the Grad-CAM overlay for the explained label; two pairs
    a row, so that captions are set at page size (11 pt, ~15 px) without being shrunk to fit the page."""
    rows = (len(examples) + per_row - 1) // per_row
    cols = 2 * min(per_row, len(examples))
    fig = new_figure(3.2 * cols, 3.9 * rows + 0.6)
    axes = np.atleast_2d(fig.subplots(rows, cols))
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, ex in enumerate(examples):
        r, c = divmod(i, per_row)
        a, b = axes[r, 2 * c], axes[r, 2 * c + 1]
        a.imshow(ex.image, cmap="gray", vmin=0, vmax=1)
        a.set_title(ex.title, fontsize=11)
        b.imshow(ex.overlay)
        b.set_title(ex.cam_title, fontsize=11)
    fig.suptitle(title, fontsize=14)
    return fig


def gradcam_gallery(examples: list[CamExample], title: str, path: str | Path, per_row: int = 2) -> Path:
    return save(gallery_figure(examples, title, per_row), path)


def displayed_text_px(fig: Figure) -> list[float]:
    """The height in page pixels of every text in `fig` (font size at DPI, times the page's scaling of a figure
    wider than the page): what a reader sees."""
    width_px = fig.get_figwidth() * DPI
    scale = min(1.0, PAGE_PX / width_px)
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return [t.get_fontsize() * DPI / 72 * scale for t in texts]


# --- calibration -------------------------------------------------------------------------------------------


def calibration(curves: dict[str, pd.DataFrame], path: str | Path, title: str) -> Path:
    """Reliability diagram: per stage, observed frequency against mean predicted probability per bin (marker area
    ~ images in the bin); the diagonal is perfect calibration."""
    fig = new_figure(7.5, 5.6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", label="perfectly calibrated")
    for name, table in curves.items():
        if not len(table):
            continue
        size = 20 + 180 * np.sqrt(table["n"] / table["n"].max())
        line = ax.plot(table["predicted"], table["observed"], marker="", label=name)[0]
        ax.scatter(table["predicted"], table["observed"], s=size, color=line.get_color(), alpha=0.7)
    ax.set(
        xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability (bin)", ylabel="observed frequency", title=title
    )
    ax.legend(fontsize=SMALL, loc="upper left")
    ax.grid(alpha=0.3)
    return save(fig, path)


def stage_bars(metrics: pd.DataFrame, path: str | Path) -> Path:
    """Log loss per label for each stage of stack/metrics.csv (first stage, its members, stacked)."""
    stage_col = "stage" if "stage" in metrics else metrics.columns[0]
    cols = ["weighted_log_loss", *[label for label in LABELS if label in metrics]]
    fig = new_figure(12, 4.6)
    ax = fig.subplots()
    x = np.arange(len(cols))
    width = 0.8 / max(len(metrics), 1)
    for k, (_, row) in enumerate(metrics.iterrows()):
        bars = ax.bar(
            x + (k - (len(metrics) - 1) / 2) * width, row[cols].to_numpy(float), width, label=str(row[stage_col])
        )
        ax.bar_label(bars, fmt="%.3f", fontsize=SMALL, rotation=90, padding=2)
    ax.set_xticks(x, ["weighted\n(competition)", *cols[1:]])
    top = float(np.nanmax(metrics[cols].to_numpy(float))) if len(metrics) else 1.0
    ax.set(
        ylabel="out-of-fold log loss (lower is better)",
        ylim=(0, top * 1.25),
        title="First stage vs second stage (sequence model over each series), out-of-fold",
    )
    ax.legend(fontsize=SMALL, title="stage")
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)
