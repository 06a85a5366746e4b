"""`train_fold`: one fold from folds.csv + cache to best.pt, log.csv, curves.png, oof.csv, oof_embeddings.npz.

Resumable at epoch boundaries: last.pt holds everything needed (model, optimizer, scheduler, scaler, log, best
metric, RNG states) and all per-epoch randomness is re-derived from (seed, epoch, rank), so an interrupted run that
is restarted ends with the same weights as one that never stopped (bitwise on CPU; on CUDA with
ICH_DETERMINISTIC=1, which turns cuDNN autotuning off).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..core.labels import LABELS
from ..core.config import Config, dump
from ..core.errors import UserError, fix
from ..core.io import atomic_open, write_csv
from ..models.checkpoint import clean_state_dict, read_checkpoint, save_checkpoint
from ..core.layout import FoldRun, Layout, Run
from ..core import interrupt
from ..core.lock import exclusive
from ..core.freshness import config_differences, fold_split_digest  # noqa: F401 (fold_split_digest: re-exported)
from ..core import provenance
from ..data import folds as folds_mod
from . import dist as D
from .precision import choose as choose_precision
from .logs import close_log, open_log, plot_curves, write_log_csv
from . import ema
from .plan import epoch_indices, eval_loader, image_size, label_matrix, train_loader

_LOG = logging.getLogger(__name__)
STOP_ENV = "ICH_STOP_AFTER_EPOCHS"  # stop (resumably) once this many epochs are done: for tests and time-boxed jobs
# A recipe's per-batch loss: factory(cfg, train_ds=, meta=, loss_fn=, net=, info=) -> object with
# start_epoch(epoch, size) and __call__(model, x, y, idx) -> loss (see `recipes.mil.MILBatchLoss`).
BatchLossFactory = Callable[..., Any]
# keys that do not change training (data.source: the cache and the DICOMs give the same HU, `data.source`)


@dataclass
class FoldData:
    train: pd.DataFrame
    val: pd.DataFrame
    meta: pd.DataFrame


def check_fold(cfg: Config, fold: int) -> None:
    from ..core.config import selected_folds

    selected_folds(cfg.cv, fold)


def prepare_data(cfg: Config, layout: Layout, fold: int, info: D.DistInfo | None = None) -> FoldData:
    """Build what is missing (meta, folds, and the cache unless data.source=dicom) on rank 0, then split folds.csv
    into train / validation."""
    from ..data import folds, meta, preprocess
    from ..data.dataset import drop_empty_slices, hu_reader

    info = info or D.DistInfo()
    check_fold(cfg, fold)
    if info.is_main:
        table = folds.fold_table(layout, cfg.cv)
        if cfg.data.source == "cache":  # data.source=dicom reads every slice from its DICOM: no cache at all
            preprocess.ensure(layout)
    D.barrier(info)
    if not info.is_main:
        table = folds.fold_table(layout, cfg.cv)
    val = table[table["fold"] == fold].reset_index(drop=True)
    train = table[table["fold"] != fold].reset_index(drop=True)
    if val.empty or train.empty:
        raise UserError(
            f"{layout.folds_csv}: fold {fold} leaves an empty {'validation' if val.empty else 'training'} "
            f"set; use fewer folds ({fix('--set cv.k=...', 'SET_EXTRA=cv.k=...')}) or more data"
        )
    table_meta = meta.load_meta(layout)
    if cfg.data.min_brain_fraction > 0:
        train = drop_empty_slices(
            train, layout, cfg.data.min_brain_fraction, hu_reader(layout, cfg.data.source, table_meta)
        )
    return FoldData(train=train, val=val, meta=table_meta)


def build_network(cfg: Config, info: D.DistInfo) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module to train, possibly compiled/DDP-wrapped; the plain ICHNet)."""
    from ..models import build_model

    net = build_model(cfg.model, in_channels=cfg.data.in_channels, num_classes=len(LABELS))  # applies model.freeze
    if info.distributed:
        if info.device.type == "cuda":  # SyncBatchNorm is CUDA-only; on CPU each rank normalises its own share
            # one BatchNorm over the global batch keeps N-process training equivalent to one process
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net.to(info.device)
    if cfg.train.channels_last:
        net.to(memory_format=torch.channels_last)
    model: torch.nn.Module = net
    if cfg.train.compile:
        model = torch.compile(model)
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            find_unused_parameters=cfg.model.freeze != "none",
        )
    return model, net


def init_head_bias(net: torch.nn.Module, labels: np.ndarray) -> int:
    """Start every 6-logit output layer of the head at the training labels' log-odds (RetinaNet's prior init).

    With a zero bias every slice starts at p=0.5 (log loss 0.69 per label) and AdamW needs thousands of steps to
    learn that epidural bleeds are rare; from the prior, the first epoch already starts at the prior-only loss.
    Returns how many layers were initialised.
    """
    prior = np.clip(np.asarray(labels, dtype=np.float64).mean(axis=0), 1e-4, 1 - 1e-4)
    bias = torch.tensor(np.log(prior / (1 - prior)), dtype=torch.float32)
    done = 0
    head = getattr(net, "head", net)
    for module in head.modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == len(LABELS) and module.bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias.to(module.bias.device, module.bias.dtype))
            done += 1
    return done


def autocast(cfg: Config, device: torch.device):
    """The autocast `precision.choose` picks for train.amp on this device (bf16 from compute capability 8.0, fp16
    below, bf16 on CPU; nothing for amp=none)."""
    return choose_precision(cfg.train.amp, device).autocast()


def to_device(x: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x


def batches(loader):
    """Iterate a DataLoader; a UserError raised inside a worker (its traceback attached) becomes one line again."""
    try:
        yield from loader
    except UserError as e:
        last = str(e).strip().splitlines()[-1]
        raise UserError(last.split("UserError: ", 1)[-1]) from None


PROBE_BATCHES = 3  # the speed a CPU warning quotes: batches 2..3 (the first one also starts the loader workers)


def cpu_warning(cfg: Config, images_per_s: float, images_left: int) -> str:
    """One line for a GPU config (it asks for mixed precision) that trains on the CPU: its measured speed and the
    time the rest of the fold would take at it, before hours go by unnoticed."""
    hours = images_left / max(images_per_s, 1e-9) / 3600
    return (
        f"{cfg.name} is a GPU config (train.amp={cfg.train.amp}) training on the CPU: {images_per_s:.2f} images/s "
        f"measured, ~{hours:.1f} h for the {images_left} training images left in this fold (validation not "
        f"counted); use a GPU or Kaggle's (docs/kaggle.md), or a CPU config such as tiny"
    )


def train_epoch(
    model,
    loader,
    loss_fn,
    optimizer,
    scheduler,
    scaler,
    cfg: Config,
    info: D.DistInfo,
    desc: str,
    batch_loss=None,
    after_step=None,
    probe=None,
) -> tuple[float, int, float]:
    """(mean train loss over all ranks, images seen over all ranks, seconds); `after_step()` after each optimizer
    step (the weights' moving average); `probe(images/s)` once, after the first PROBE_BATCHES batches."""
    model.train()
    accum, n = cfg.train.accum_steps, len(loader)
    total, seen = torch.zeros(2, dtype=torch.float64), 0
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    bar = tqdm(
        batches(loader), desc=desc, unit="batch", total=n, leave=False, disable=not info.is_main, dynamic_ncols=True
    )
    for i, (x, y, idx) in enumerate(bar):
        x, y = to_device(x, cfg, info.device), y.to(info.device, non_blocking=True)
        group_start = (i // accum) * accum
        group = min(accum, n - group_start)
        step_now = (i - group_start) == group - 1
        sync = model.no_sync() if info.distributed and not step_now else contextlib.nullcontext()
        with sync:
            if batch_loss is not None:  # a recipe's own loss (train_fold's batch_loss), e.g. MIL bags
                loss = batch_loss(model, x, y, idx)
            else:
                with autocast(cfg, info.device):
                    logits = model(x)
                loss = loss_fn(logits.float(), y)
            scaler.scale(loss / group).backward()
        if step_now:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if after_step is not None:
                after_step()
        total += torch.tensor([loss.item() * len(x), len(x)], dtype=torch.float64)
        seen += len(x)
        elapsed = time.perf_counter() - start
        if probe is not None and i == 0:
            probe_from = (elapsed, seen)
        elif probe is not None and i == PROBE_BATCHES - 1:
            probe((seen - probe_from[1]) * info.world_size / max(elapsed - probe_from[0], 1e-9))
        bar.set_postfix(loss=f"{total[0] / total[1]:.4f}", img_s=f"{seen * info.world_size / max(elapsed, 1e-9):.1f}")
    if info.distributed:  # NCCL reduces CUDA tensors only
        reduced = total.to(info.device)
        torch.distributed.all_reduce(reduced)
        total = reduced.cpu()
    return float(total[0] / max(total[1], 1)), int(total[1]), time.perf_counter() - start


@torch.inference_mode()
def predict_frame(
    net: torch.nn.Module, ds, cfg: Config, info: D.DistInfo, embeddings: bool = False, desc: str = "predict"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (len(ds), 6) in dataset order (and pooled embeddings), each rank predicting its share."""
    net.eval()
    loader = eval_loader(ds, cfg, info, batch=max(1, cfg.train.batch_size // info.world_size) * 2)
    idx_parts, prob_parts, emb_parts = [], [], []
    for x, _, idx in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not info.is_main):
        x = to_device(x, cfg, info.device)
        with autocast(cfg, info.device):
            feats = net.features(x)
            logits = net.classify(feats)
        idx_parts.append(idx.numpy())
        prob_parts.append(torch.sigmoid(logits.float()).cpu().numpy())
        if embeddings:
            emb_parts.append(feats.float().cpu().numpy().astype(np.float16))
    local = (
        np.concatenate(idx_parts) if idx_parts else np.zeros(0, int),
        np.concatenate(prob_parts) if prob_parts else np.zeros((0, len(LABELS)), np.float32),
        np.concatenate(emb_parts) if emb_parts else None,
    )
    parts = D.gather_objects(info, local)
    order = np.concatenate([p[0] for p in parts])
    probs = np.concatenate([p[1] for p in parts])
    _, first = np.unique(order, return_index=True)  # DistributedSampler pads with repeats
    out_probs = np.empty((len(ds), len(LABELS)), dtype=np.float32)
    out_probs[order[first]] = probs[first]
    out_emb = None
    if embeddings:
        emb = np.concatenate([p[2] for p in parts])
        out_emb = np.empty((len(ds), emb.shape[1]), dtype=np.float16)
        out_emb[order[first]] = emb[first]
    if len(first) != len(ds):
        raise RuntimeError(f"prediction covered {len(first)} of {len(ds)} images")
    return out_probs, out_emb


def validate(net, ds, labels: np.ndarray, cfg: Config, info: D.DistInfo) -> dict[str, float]:
    from ..core import metrics

    probs, _ = predict_frame(net, ds, cfg, info, desc="validate")
    row = {"val_weighted_log_loss": metrics.weighted_log_loss(labels, probs)}
    row.update({f"val_{k}": v for k, v in metrics.per_label_log_loss(labels, probs).items()})
    return row


def check_resumable(ckpt: dict, cfg: Config, path: Path) -> None:
    diff = config_differences(ckpt["config"], cfg.to_dict())
    if diff:
        raise UserError(
            f"{path} was trained with a different config ({', '.join(diff[:5])}); "
            f"train beside it with {fix('--run <new name>', 'RUN=<new name>')}, retrain it with "
            f"{fix('--force', 'FORCE=1')} (the old fold is kept until the new one finishes), or restore "
            f"those settings to resume"
        )


def _stop_after(stop_after_epochs: int | None) -> int | None:
    if stop_after_epochs is not None:
        return stop_after_epochs
    value = os.environ.get(STOP_ENV)
    return int(value) if value else None


def write_oof(files: FoldRun, frame: pd.DataFrame, probs: np.ndarray, emb: np.ndarray) -> None:
    oof = pd.DataFrame(probs.astype(np.float64), columns=list(LABELS))
    oof.insert(0, "image_id", frame["image_id"].astype(str).to_numpy())
    write_csv(oof, files.oof)
    with atomic_open(files.oof_embeddings, "wb") as f:
        np.savez(f, image_id=frame["image_id"].astype(str).to_numpy().astype(str), emb=emb.astype(np.float16))


def train_fold(
    cfg: Config,
    layout: Layout,
    fold: int,
    runs: str | Path = "runs",
    force: bool = False,
    stop_after_epochs: int | None = None,
    batch_loss: BatchLossFactory | None = None,
) -> Path:
    """Train (or resume, or skip if finished) one fold; returns runs/<cfg.name>/fold<k>/.

    batch_loss: a recipe's per-batch loss, built once the fold's data and network exist (see `recipes`);
    None trains with the loss of `train.loss`.
    """
    check_fold(cfg, int(fold))
    files = Run.of(runs, cfg.name).fold(int(fold))
    if not force and finished(cfg, layout, files):  # read-only: works in a read-only runs folder too
        return files.dir
    # --force on a finished fold trains beside it in fold<k>.new/ and swaps at the end: until the new fold is done
    # (an interruption included) the old one stays where it was, whole and usable
    staged = force and files.done.exists()
    target = files.staging if staged else files
    info = D.setup()
    try:  # rank 0 holds the fold's lock: a second run on the same fold stops with one line
        with exclusive(files.lock, f"fold {fold} of {cfg.name}") if info.is_main else contextlib.nullcontext():
            out = _train_fold(cfg, layout, target, force, _stop_after(stop_after_epochs), info, batch_loss)
            if staged and info.is_main and target.done.exists():
                replace_fold(files, target)
                out = files.dir
            D.barrier(info)
            return out
    finally:
        close_log(_LOG)
        D.teardown(info)


def replace_fold(files: FoldRun, new: FoldRun) -> None:
    """The finished `new` fold takes the place of `files` (renames only: the old one is removed last)."""
    old = files.dir.with_name(files.dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    files.dir.rename(old)
    new.dir.rename(files.dir)
    shutil.rmtree(old)
    _LOG.info(f"fold {files.fold}: the retrained fold replaced the old one in {files.dir}")


def finished(cfg: Config, layout: Layout, files: FoldRun) -> bool:
    """Whether the fold is trained to the end with this config on the images folds.csv gives it now (then it is
    skipped); a fold trained with another config or on other images is one line saying how to go on."""
    if not (files.done.exists() and files.last.exists() and files.oof.exists() and files.oof_embeddings.exists()):
        return False
    ckpt = read_checkpoint(files.last)
    check_resumable(ckpt, cfg, files.last)
    table = folds_mod.fold_table(layout, cfg.cv)
    provenance.check_data(ckpt.get("data"), provenance.data_identity(layout.data, table), files.dir, cfg.name)
    check_split(ckpt, table, files, layout)
    if not ckpt.get("done"):
        return False
    _LOG.info(
        f"fold {files.fold} of {cfg.name} is already trained ({files.dir}); "
        f"pass {fix('--force', 'FORCE=1')} to retrain it"
    )
    return True


def check_split(ckpt: dict, table: pd.DataFrame, files: FoldRun, layout: Layout) -> str:
    """The fold's split digest now; one line when the checkpoint was trained on other images."""
    split = fold_split_digest(table, files.fold)
    if ckpt.get("split", split) != split:
        raise UserError(
            f"{files.last} was trained on other images than fold {files.fold} of {layout.folds_csv} has "
            f"now (folds.csv was rebuilt or the data changed); retrain with {fix('--force', 'FORCE=1')}, "
            f"or restore that folds.csv"
        )
    return split


def _train_fold(
    cfg: Config,
    layout: Layout,
    files: FoldRun,
    force: bool,
    stop_after: int | None,
    info: D.DistInfo,
    batch_loss_factory: BatchLossFactory | None,
) -> Path:
    from ..data.dataset import SliceDataset
    from ..data.transforms import build_eval_transforms, build_train_transforms
    from .losses import build_loss
    from .optim import build_optimizer, build_scheduler

    fold = files.fold
    fdir, last_path, best_path = files.dir, files.last, files.best
    if info.is_main and fdir.exists():
        for path in fdir.iterdir():  # --force: everything but the lock this run holds; always: debris of killed saves
            if path != files.lock and (force or (path.name.startswith(".") and path.name.endswith(".tmp"))):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    D.barrier(info)
    log = open_log(files.train_log, info.is_main, _LOG)
    if info.is_main:  # rank 0 builds folds.csv if it is missing; the others read it after
        table = folds_mod.fold_table(layout, cfg.cv)
    D.barrier(info)
    table = table if info.is_main else folds_mod.fold_table(layout, cfg.cv)
    ckpt = read_checkpoint(last_path) if last_path.exists() else None
    split = fold_split_digest(table, fold)
    data_id = provenance.data_identity(layout.data, table)
    if ckpt is not None:
        check_resumable(ckpt, cfg, last_path)
        provenance.check_data(ckpt.get("data"), data_id, fdir, cfg.name)
        check_split(ckpt, table, files, layout)

    D.seed_everything(cfg.train.seed)
    D.set_deterministic()
    data = prepare_data(cfg, layout, fold, info)
    if info.is_main:
        dump(cfg, files.config)
    train_labels, val_labels = label_matrix(data.train), label_matrix(data.val)
    train_ds = SliceDataset(data.train, layout, cfg, transform=None, train=True, meta=data.meta)
    val_ds = SliceDataset(data.val, layout, cfg, transform=build_eval_transforms(cfg), train=False, meta=data.meta)

    log.info(f"fold {fold}: {choose_precision(cfg.train.amp, info.device).describe()}")  # stops on an unusable GPU
    log.info(
        f"fold {fold}: images from "
        + (
            f"the cache {layout.cache_dir}"
            if cfg.data.source == "cache"
            else f"their DICOMs under {layout.data} (data.source=dicom, no cache)"
        )
    )
    model, net = build_network(cfg, info)
    average = ema.build(cfg, net)  # train.ema > 0: validated, saved as best.pt and predicted with instead of net
    loss_fn = build_loss(cfg, train_labels).to(info.device)
    batch_loss = (
        None
        if batch_loss_factory is None
        else batch_loss_factory(cfg, train_ds=train_ds, meta=data.meta, loss_fn=loss_fn, net=net, info=info)
    )
    optimizer = build_optimizer(cfg, net)
    batch = D.per_rank_batch(cfg.train.batch_size, info)
    steps_per_epoch = math.ceil(
        len(train_loader(train_ds, epoch_indices(cfg, train_labels, 0), cfg, info, batch, 0)) / cfg.train.accum_steps
    )
    scheduler = build_scheduler(cfg, optimizer, max(1, steps_per_epoch))
    precision = choose_precision(cfg.train.amp, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision.scaler)

    start_epoch, rows, best, best_epoch = 0, [], math.inf, -1
    if ckpt is not None and not ckpt.get("done"):
        net.load_state_dict(clean_state_dict(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if average is not None:
            average.load_state_dict(ckpt["ema"])
        start_epoch, rows = int(ckpt["epoch"]), list(ckpt["log"])
        best, best_epoch = float(ckpt["best_metric"]), int(ckpt["best_epoch"])
        if info.world_size == int(ckpt.get("world_size", 1)) and "rng" in ckpt:
            D.set_rng_state(ckpt["rng"])  # per-epoch streams are re-derived from the seed; this covers the rest
        log.info(f"resuming fold {fold} of {cfg.name} from epoch {start_epoch}/{cfg.train.epochs} ({last_path})")
    elif ckpt is not None:  # finished but its OOF files are missing: only redo those
        start_epoch, rows = cfg.train.epochs, list(ckpt["log"])
        best, best_epoch = float(ckpt["best_metric"]), int(ckpt["best_epoch"])
    else:
        init_head_bias(net, train_labels)
        log.info(
            f"fold {fold} of {cfg.name}: {len(data.train)} training / {len(data.val)} validation images, "
            f"{info.world_size} process(es) on {info.device}, global batch {cfg.train.batch_size} "
            f"x {cfg.train.accum_steps} accumulation, {steps_per_epoch} steps/epoch"
        )
    del ckpt  # optimizer state of a big model: do not keep a second copy for the whole run
    started = time.time()
    probe = None
    if info.device.type == "cpu" and cfg.train.amp != "none" and info.is_main and start_epoch < cfg.train.epochs:
        images_left = steps_per_epoch * cfg.train.batch_size * cfg.train.accum_steps * (cfg.train.epochs - start_epoch)

        def probe(rate: float) -> None:
            log.warning(cpu_warning(cfg, rate, images_left))

    for epoch in range(start_epoch, cfg.train.epochs):
        interrupt.check()  # a Ctrl-C swallowed as the fold started (a finaliser) stops it here
        t0 = time.perf_counter()
        D.seed_everything(D.epoch_seed(cfg.train.seed, epoch, info.rank))  # dropout etc.: same on resume
        size = image_size(cfg, epoch)
        train_ds.transform = build_train_transforms(cfg, size)
        if batch_loss is not None:
            batch_loss.start_epoch(epoch, size)
        train_ds.set_epoch(epoch)
        val_ds.transform = build_eval_transforms(cfg, size)
        loader = train_loader(train_ds, epoch_indices(cfg, train_labels, epoch), cfg, info, batch, epoch)
        desc = f"fold {fold} epoch {epoch + 1}/{cfg.train.epochs} ({size}px)"
        train_loss, seen, train_s = train_epoch(
            model,
            loader,
            loss_fn,
            optimizer,
            scheduler,
            scaler,
            cfg,
            info,
            desc,
            batch_loss,
            None if average is None else lambda: average.update(net),
            probe if epoch == start_epoch else None,
        )
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss}
        row.update(validate(net if average is None else average.module, val_ds, val_labels, cfg, info))
        row.update({"seconds": time.perf_counter() - t0, "train_images_per_s": seen / max(train_s, 1e-9)})
        rows.append(row)
        improved = row["val_weighted_log_loss"] < best
        if improved:
            best, best_epoch = row["val_weighted_log_loss"], epoch + 1
        if info.is_main:
            state = clean_state_dict(net.state_dict())
            if improved:  # the weights that were validated: the moving average when there is one
                kept = state if average is None else clean_state_dict(average.module.state_dict())
                save_checkpoint(
                    best_path,
                    {
                        "model": kept,
                        "config": cfg.to_dict(),
                        "epoch": epoch + 1,
                        "val_weighted_log_loss": best,
                        "num_classes": len(LABELS),
                    },
                )
            extra = {} if average is None else {"ema": average.state_dict()}
            save_checkpoint(
                last_path,
                {
                    **extra,
                    "model": state,
                    "config": cfg.to_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "rng": D.rng_state(),
                    "log": rows,
                    "best_metric": best,
                    "best_epoch": best_epoch,
                    "split": split,
                    "data": data_id,
                    "done": epoch + 1 == cfg.train.epochs,
                    "num_classes": len(LABELS),
                    "world_size": info.world_size,
                },
            )
            write_log_csv(rows, files.log_csv)
            plot_curves(rows, files.curves, title=f"{cfg.name} fold {fold}")
            log.info(
                f"epoch {epoch + 1}/{cfg.train.epochs}: train_loss {train_loss:.4f}  val weighted log loss "
                f"{row['val_weighted_log_loss']:.4f}{' (best)' if improved else ''}  "
                + "  ".join(f"{c} {row[f'val_{c}']:.3f}" for c in LABELS)
                + f"  {row['train_images_per_s']:.1f} img/s  {row['seconds']:.0f}s"
            )
        D.barrier(info)
        if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.train.epochs:
            log.info(f"stopping after epoch {epoch + 1} as requested ({STOP_ENV}); rerun the same command to resume")
            return fdir

    # out-of-fold predictions of the best checkpoint, at the final image size
    best_ckpt = read_checkpoint(best_path, map_location=info.device)
    net.load_state_dict(clean_state_dict(best_ckpt["model"]))
    val_ds.transform = build_eval_transforms(cfg)
    probs, emb = predict_frame(net, val_ds, cfg, info, embeddings=True, desc="oof")
    if info.is_main:
        write_oof(files, data.val, probs, emb)
        from ..core import metrics

        summary = {
            "fold": fold,
            "config": cfg.name,
            "split": split,
            "best_epoch": best_epoch,
            "best_val_weighted_log_loss": best,
            "oof_weighted_log_loss": metrics.weighted_log_loss(val_labels, probs),
            "epochs": cfg.train.epochs,
            "n_train": len(data.train),
            "n_val": len(data.val),
            "world_size": info.world_size,
            "seconds_this_run": round(time.time() - started, 1),
            **provenance.record(layout.data, table),
        }
        with atomic_open(files.done) as f:
            json.dump(summary, f, indent=2)
        log.info(
            f"fold {fold} done: best epoch {best_epoch}, val weighted log loss {best:.4f}; "
            f"wrote {files.oof} ({len(data.val)} images)"
        )
    D.barrier(info)
    return fdir
