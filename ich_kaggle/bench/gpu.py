"""`make gpu-check`: every GPU path once, on the real model and the real mini set, in a few minutes.

The CUDA, AMP, channels_last and DDP/NCCL code is written for GPUs that tests never see. This runs the real
`seresnext50_512` (random init: no weights to download) at 512 px on the real mini set: a short training with the
precision `engine.precision` picks and channels_last, predict with TTA, and, when two GPUs are visible, one epoch
under a two-process torchrun. It prints train and inference images/s, peak GPU memory and the precision, and fails
(non-zero exit) on a NaN or a training loss that does not fall.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..core.errors import UserError

CONFIG = "seresnext50_512"
SETTINGS = [
    "model.pretrained=false",
    "cv.k=2",
    "cv.folds=[0]",
    "train.epochs=4",
    "train.batch_size=16",
    "data.num_workers=-1",
    "train.channels_last=true",
]


def require_cuda() -> None:
    """A clear stop where there is nothing to check (CPU-only machines, CI)."""
    import torch

    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise UserError(
            f"no CUDA device visible{where}: torch {torch.__version__} sees none, and make gpu-check "
            f"checks the GPU paths; run it on a machine with an NVIDIA GPU"
        )


def loss_problem(losses: list[float]) -> str | None:
    """Why a training run failed the check: a NaN/inf loss, or a last epoch not below the first."""
    if not losses:
        return "no epoch finished"
    bad = [i + 1 for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        return f"train loss is not finite in epoch(s) {bad}: {losses}"
    if len(losses) > 1 and not losses[-1] < losses[0]:
        return f"train loss did not fall: {[round(v, 4) for v in losses]}"
    return None


def check(mini: str | Path | None = None) -> dict[str, float | str]:
    """Train, predict and (2+ GPUs) torchrun on the mini set; returns the printed figures."""
    require_cuda()
    import pandas as pd
    import torch

    from . import mini_set
    from .. import train
    from ..core import config
    from ..core.layout import Layout, Predictions, Run
    from ..data import folds, preprocess
    from ..engine.precision import choose
    from ..predict import stage as predict

    data = mini_set(mini)
    if data is None:
        raise UserError(
            "the real mini set is missing: put rsna-ich-mini.tar.xz in ../shared/data or pass "
            "--mini <extracted folder> (make gpu-check MINI=<folder>)"
        )
    cfg = config.load(CONFIG, SETTINGS)
    device = torch.device("cuda", 0)
    precision = choose(cfg.train.amp, device)
    figures: dict[str, float | str] = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "precision": precision.describe(),
    }
    print(f"gpu-check: {figures['gpus']} x {figures['gpu']}, {figures['precision']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ich-gpu-check-") as tmp:
        layout, runs = Layout.of(data, Path(tmp) / "work"), Path(tmp) / "runs"
        folds.load_folds(layout, k=cfg.cv.k, seed=cfg.cv.seed)
        preprocess.ensure(layout)
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train.train_fold(cfg, layout, 0, runs=runs)
        figures["train_s"] = time.perf_counter() - start
        log = pd.read_csv(Run.of(runs, cfg.name).fold(0).log_csv)
        figures["train_images_per_s"] = float(
            log["train_images_per_s"].iloc[1:].mean() if len(log) > 1 else log["train_images_per_s"].iloc[0]
        )
        figures["train_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        problem = loss_problem([float(v) for v in log["train_loss"]])
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = predict.predict(cfg, layout, runs=runs)
        seconds = time.perf_counter() - start
        preds = Predictions(out)
        n_images = len(pd.read_csv(preds.test)) + len(pd.read_csv(preds.oof))
        figures["predict_images_per_s"] = n_images * len(cfg.tta.transforms) / max(seconds, 1e-9)
        figures["predict_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.device_count() >= 2:
            figures["torchrun_2_gpus"] = _torchrun(data, Path(tmp))
    for key, value in figures.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    if problem:
        raise UserError(f"gpu-check failed: {problem}")
    return figures


def _torchrun(data: Path, tmp: Path) -> str:
    """One epoch of fold 1 with DDP over two GPUs (NCCL, SyncBatchNorm)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "ich_kaggle",
        "train",
        "--config",
        CONFIG,
        "--data",
        str(data),
        "--work",
        str(tmp / "work"),
        "--runs",
        str(tmp / "ddp"),
        "--fold",
        "1",
        "--set",
        *[s for s in SETTINGS if not s.startswith(("train.epochs", "cv.folds"))],
        "train.epochs=1",
        "cv.folds=[1]",
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise UserError(f"gpu-check failed: torchrun on 2 GPUs exited {result.returncode}: {last}")
    return f"ok ({time.perf_counter() - start:.0f} s for one epoch)"
