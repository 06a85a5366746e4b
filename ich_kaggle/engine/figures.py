"""Figures, object-oriented matplotlib (`Figure`, no pyplot state) on the Agg canvas, each PNG written atomically;
and the one training-curve figure: a fold's curves.png during training, and the report's curves (report/plots.py
draws its other figures with these helpers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.io import atomic_path
from ..core.labels import LABELS

DPI = 100
SMALL = 10  # points: the smallest text in a figure (legends, bar labels, captions) -- 14 px at DPI 100
COLORS = dict(zip(LABELS, ("#222222", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")))


def new_figure(width: float, height: float):
    """A `matplotlib.figure.Figure` on its own Agg canvas (matplotlib is imported here: training needs it only
    once a curve is drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path) -> Path:
    """PNG, written atomically (a crash never leaves a truncated image behind)."""
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def training_curves(log: pd.DataFrame, fold: int, path: str | Path, title: str = "") -> Path:
    """Per fold (a log.csv frame): train loss vs validation weighted log loss, validation log loss per label,
    learning rate; `title` (e.g. the config's name) above them."""
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
    if title:
        fig.suptitle(title)
    return save(fig, path)
