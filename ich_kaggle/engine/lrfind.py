"""LR range test: train briefly while the learning rate grows exponentially; pick where the loss falls fastest."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..core.config import Config
from ..core.io import atomic_path, write_csv
from ..core.layout import Layout, Run
from . import dist as D
from .plan import batches_per_epoch, epoch_indices, train_loader

if TYPE_CHECKING:
    from .loop import FoldInputs, Trainable

log = logging.getLogger(__name__)


def suggest_lr(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The LR at the steepest descent of the smoothed loss (before it blows up)."""
    if len(lrs) < 3:
        return float(lrs[0]) if len(lrs) else float("nan")
    grad = np.gradient(losses, np.log10(lrs))
    stop = int(np.argmin(losses)) + 1  # only look before the minimum
    return float(lrs[int(np.argmin(grad[: max(stop, 2)]))])


def lr_find(
    cfg: Config,
    layout: Layout,
    fold: int,
    runs: str | Path = "runs",
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
    steps: int = 200,
    beta: float = 0.9,
) -> float:
    """Writes runs/<cfg>/fold<k>/lr_find.csv + lr_find.png and returns (and prints) the suggested LR.

    Steps: `steps`, capped at four passes over the training fold so tiny data sets finish quickly.
    The fold's training state (last.pt/best.pt) is not touched.
    """
    from ..data.transforms import build_train_transforms
    from .loop import build_trainable, fold_inputs, init_head_bias

    info = D.DistInfo(device=D.pick_device(0))  # single process: a sweep needs no DDP
    D.seed_everything(cfg.train.seed)
    inputs = fold_inputs(cfg, layout, fold, info, train_transform=build_train_transforms(cfg))
    labels = inputs.train_labels
    parts = build_trainable(cfg, info, labels)
    init_head_bias(parts.net, labels)
    per_epoch = max(1, batches_per_epoch(len(epoch_indices(cfg, labels, 0)), info, cfg.train.batch_size))
    steps = max(10, min(steps, 4 * per_epoch))
    lrs, raw, smooth = _sweep(cfg, info, inputs, parts, steps, start_lr, (end_lr / start_lr) ** (1 / (steps - 1)), beta)
    lrs_a, smooth_a = np.array(lrs), np.array(smooth)
    finite = np.isfinite(smooth_a)
    suggestion = suggest_lr(lrs_a[finite], smooth_a[finite])
    files = Run.of(runs, cfg.name).fold(fold)
    write_csv(pd.DataFrame({"lr": lrs, "loss": raw, "smoothed_loss": smooth}), files.lr_find_csv)
    _plot(lrs_a, smooth_a, suggestion, files.lr_find_png, f"{cfg.name} fold {fold}")
    log.info(f"suggested lr: {suggestion:.2e} (config has train.lr={cfg.train.lr:g}); plot: {files.lr_find_png}")
    return suggestion


def _batches(inputs: FoldInputs, cfg: Config, info: D.DistInfo) -> Iterator:
    """The training fold's batches, epoch after epoch (each epoch's rows and augmentation as training has them)."""
    epoch = 0
    while True:
        inputs.train_ds.set_epoch(epoch)
        indices = epoch_indices(cfg, inputs.train_labels, epoch)
        yield from train_loader(inputs.train_ds, indices, cfg, info, cfg.train.batch_size, epoch)
        epoch += 1


def _sweep(
    cfg: Config,
    info: D.DistInfo,
    inputs: FoldInputs,
    parts: Trainable,
    steps: int,
    start_lr: float,
    gamma: float,
    beta: float,
) -> tuple[list[float], list[float], list[float]]:
    """Up to `steps` optimizer steps from `start_lr`, the LR times `gamma` after each; stops early once the smoothed
    loss is not finite or above 4x its best. (lrs, raw losses, smoothed losses), one per step."""
    from .loop import autocast, to_device

    model, loss_fn, optimizer = parts.model, parts.loss_fn, parts.optimizer
    for g in optimizer.param_groups:
        g["lr"] = start_lr
    lrs, raw, smooth = [], [], []
    avg, best = 0.0, math.inf
    model.train()
    bar = tqdm(total=steps, desc="lr find", unit="step")
    for x, y, _ in _batches(inputs, cfg, info):
        lr = optimizer.param_groups[0]["lr"]
        with autocast(cfg, info.device):
            logits = model(to_device(x, cfg, info.device))
        loss = loss_fn(logits.float(), y.to(info.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.item())
        avg = beta * avg + (1 - beta) * value
        s = avg / (1 - beta ** (len(lrs) + 1))
        lrs.append(lr), raw.append(value), smooth.append(s)
        best = min(best, s)
        bar.update(1)
        bar.set_postfix(lr=f"{lr:.1e}", loss=f"{s:.4f}")
        for g in optimizer.param_groups:
            g["lr"] = lr * gamma
        if len(lrs) >= steps or not math.isfinite(s) or s > 4 * best:
            break
    bar.close()
    return lrs, raw, smooth


def _plot(lrs: np.ndarray, losses: np.ndarray, suggestion: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="r", ls="--", label=f"suggested {suggestion:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
