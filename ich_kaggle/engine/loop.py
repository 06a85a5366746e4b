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
from dataclasses import dataclass, field
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
from .figures import training_curves
from . import ema
from .hooks import Hooks
from .logs import close_log, open_log, write_log_csv
from .plan import batches_per_epoch, epoch_indices, eval_loader, image_size, label_matrix, train_loader

log = logging.getLogger(__name__)
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
    hooks: Hooks | None = None,
    probe=None,
) -> tuple[float, int, float]:
    """(mean train loss over all ranks, images seen over all ranks, seconds); `hooks.after_step()` after each
    optimizer step (e.g. the weights' moving average); `probe(images/s)` once, after the first PROBE_BATCHES
    batches."""
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
            if hooks is not None:
                hooks.after_step()
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
        close_log(log)
        D.teardown(info)


def replace_fold(files: FoldRun, new: FoldRun) -> None:
    """The finished `new` fold takes the place of `files` (renames only: the old one is removed last)."""
    old = files.dir.with_name(files.dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    files.dir.rename(old)
    new.dir.rename(files.dir)
    shutil.rmtree(old)
    log.info(f"fold {files.fold}: the retrained fold replaced the old one in {files.dir}")


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
    log.info(
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


@dataclass
class FoldInputs:
    """A fold's rows and datasets (`fold_inputs`), shared by training and the LR finder."""

    data: FoldData
    train_ds: Any  # data.dataset.SliceDataset; its transform is set per epoch (progressive sizes)
    val_ds: Any
    train_labels: np.ndarray
    val_labels: np.ndarray


def fold_inputs(
    cfg: Config, layout: Layout, fold: int, info: D.DistInfo, train_transform: Callable | None = None
) -> FoldInputs:
    """`prepare_data`, then the training and validation datasets of the fold."""
    from ..data.dataset import SliceDataset
    from ..data.transforms import build_eval_transforms

    data = prepare_data(cfg, layout, fold, info)
    train_ds = SliceDataset(data.train, layout, cfg, transform=train_transform, train=True, meta=data.meta)
    val_ds = SliceDataset(data.val, layout, cfg, transform=build_eval_transforms(cfg), train=False, meta=data.meta)
    return FoldInputs(data, train_ds, val_ds, label_matrix(data.train), label_matrix(data.val))


@dataclass
class Trainable:
    """What the optimizer steps (`build_trainable`), shared by training and the LR finder."""

    model: torch.nn.Module  # possibly compiled / DDP-wrapped: what the batches go through
    net: torch.nn.Module  # the plain ICHNet inside: what is saved, averaged and predicted with
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer


def build_trainable(cfg: Config, info: D.DistInfo, train_labels: np.ndarray) -> Trainable:
    """The network (`build_network`), the loss of `train.loss` (class weights from the fold's labels), the optimizer.

    The head's bias is left as built: `init_head_bias` is for a fresh start only (a resumed run loads its weights)."""
    from .losses import build_loss
    from .optim import build_optimizer

    model, net = build_network(cfg, info)
    loss_fn = build_loss(cfg, train_labels).to(info.device)
    return Trainable(model, net, loss_fn, build_optimizer(cfg, net))


def build_hooks(cfg: Config, net: torch.nn.Module) -> Hooks:
    """The hooks `cfg` asks for, bound to `net` (the plain network, on its device): train.ema > 0, the average."""
    return Hooks(hook for hook in (ema.build(cfg, net),) if hook is not None)


@dataclass
class Progress:
    """Where a fold stands: epochs done, their log rows, the best validation loss so far and its epoch."""

    epoch: int = 0
    rows: list[dict] = field(default_factory=list)
    best: float = math.inf
    best_epoch: int = -1

    @classmethod
    def of(cls, ckpt: dict) -> Progress:
        return cls(int(ckpt["epoch"]), list(ckpt["log"]), float(ckpt["best_metric"]), int(ckpt["best_epoch"]))

    def add(self, row: dict) -> bool:
        """Record an epoch's row; whether its validation loss is the best so far."""
        self.rows.append(row)
        self.epoch = int(row["epoch"])
        improved = row["val_weighted_log_loss"] < self.best
        if improved:
            self.best, self.best_epoch = row["val_weighted_log_loss"], self.epoch
        return improved


def clear_fold(files: FoldRun, force: bool, info: D.DistInfo) -> None:
    """--force: remove everything but the lock this run holds; always: the debris of killed saves (rank 0)."""
    if info.is_main and files.dir.exists():
        for path in files.dir.iterdir():
            if path != files.lock and (force or (path.name.startswith(".") and path.name.endswith(".tmp"))):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    D.barrier(info)


def shared_fold_table(cfg: Config, layout: Layout, info: D.DistInfo) -> pd.DataFrame:
    """folds.csv: rank 0 builds it if it is missing, the other ranks read it after."""
    if info.is_main:
        table = folds_mod.fold_table(layout, cfg.cv)
    D.barrier(info)
    return table if info.is_main else folds_mod.fold_table(layout, cfg.cv)


def resumable_checkpoint(cfg: Config, layout: Layout, files: FoldRun, table: pd.DataFrame, data_id: Any) -> dict | None:
    """The fold's last.pt, if there is one, after checking it was trained with this config on these images."""
    if not files.last.exists():
        return None
    ckpt = read_checkpoint(files.last)
    check_resumable(ckpt, cfg, files.last)
    provenance.check_data(ckpt.get("data"), data_id, files.dir, cfg.name)
    check_split(ckpt, table, files, layout)
    return ckpt


def describe_inputs(cfg: Config, layout: Layout, fold: int, info: D.DistInfo) -> None:
    """train.log says which precision trains the fold and where its images come from."""
    log.info(f"fold {fold}: {choose_precision(cfg.train.amp, info.device).describe()}")  # stops on an unusable GPU
    source = (
        f"the cache {layout.cache_dir}"
        if cfg.data.source == "cache"
        else f"their DICOMs under {layout.data} (data.source=dicom, no cache)"
    )
    log.info(f"fold {fold}: images from {source}")


@dataclass
class FoldTrainer:
    """One fold's training on this rank, step by step: `build`, `restore`, `train`, `finish`."""

    cfg: Config
    layout: Layout
    files: FoldRun
    info: D.DistInfo
    table: pd.DataFrame  # folds.csv
    stamp: dict  # what the fold trained on, saved in last.pt: the split digest and the data's identity
    inputs: FoldInputs
    parts: Trainable
    hooks: Hooks
    batch_loss: Any  # a recipe's per-batch loss (BatchLossFactory's product) or None
    batch: int  # per rank
    steps_per_epoch: int
    scheduler: Any
    scaler: torch.amp.GradScaler

    @classmethod
    def build(
        cls,
        cfg: Config,
        layout: Layout,
        files: FoldRun,
        info: D.DistInfo,
        table: pd.DataFrame,
        stamp: dict,
        batch_loss_factory: BatchLossFactory | None,
    ) -> FoldTrainer:
        """Data, network, hooks, loss, optimizer, schedule and gradient scaler, from the run's seed."""
        from .optim import build_scheduler

        D.seed_everything(cfg.train.seed)
        D.set_deterministic()
        inputs = fold_inputs(cfg, layout, files.fold, info)
        if info.is_main:
            dump(cfg, files.config)
        describe_inputs(cfg, layout, files.fold, info)
        parts = build_trainable(cfg, info, inputs.train_labels)
        hooks = build_hooks(cfg, parts.net)  # e.g. train.ema > 0: the average is validated and kept as best.pt
        batch_loss = None
        if batch_loss_factory is not None:
            kwargs = dict(train_ds=inputs.train_ds, meta=inputs.data.meta, loss_fn=parts.loss_fn, net=parts.net)
            batch_loss = batch_loss_factory(cfg, info=info, **kwargs)
        batch = D.per_rank_batch(cfg.train.batch_size, info)
        rows = len(epoch_indices(cfg, inputs.train_labels, 0))
        steps_per_epoch = math.ceil(batches_per_epoch(rows, info, batch) / cfg.train.accum_steps)
        scheduler = build_scheduler(cfg, parts.optimizer, max(1, steps_per_epoch))
        scaler = torch.amp.GradScaler(info.device.type, enabled=choose_precision(cfg.train.amp, info.device).scaler)
        return cls(
            cfg, layout, files, info, table, stamp, inputs, parts, hooks, batch_loss, batch, steps_per_epoch,
            scheduler, scaler,
        )  # fmt: skip

    def restore(self, ckpt: dict | None) -> Progress:
        """Resume from last.pt (weights, optimizer, schedule, scaler, hooks, RNG); a fresh start sets the head's
        bias to the label prior; a finished fold whose OOF files are missing only redoes those."""
        cfg, info, parts, fold = self.cfg, self.info, self.parts, self.files.fold
        if ckpt is None:
            init_head_bias(parts.net, self.inputs.train_labels)
            data = self.inputs.data
            log.info(
                f"fold {fold} of {cfg.name}: {len(data.train)} training / {len(data.val)} validation images, "
                f"{info.world_size} process(es) on {info.device}, global batch {cfg.train.batch_size} "
                f"x {cfg.train.accum_steps} accumulation, {self.steps_per_epoch} steps/epoch"
            )
            return Progress()
        progress = Progress.of(ckpt)
        if ckpt.get("done"):
            progress.epoch = cfg.train.epochs
            return progress
        parts.net.load_state_dict(clean_state_dict(ckpt["model"]))
        parts.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.hooks.load_state_dict(ckpt, self.files.last)
        if info.world_size == int(ckpt.get("world_size", 1)) and "rng" in ckpt:
            D.set_rng_state(ckpt["rng"])  # per-epoch streams are re-derived from the seed; this covers the rest
        done, last = progress.epoch, self.files.last
        log.info(f"resuming fold {fold} of {cfg.name} from epoch {done}/{cfg.train.epochs} ({last})")
        return progress

    def train(self, progress: Progress, stop_after: int | None) -> bool:
        """The epochs left, each saved to last.pt (best.pt when it improved); False when `stop_after` stopped the
        fold early (resumable), True when every epoch is done."""
        cfg, info = self.cfg, self.info
        probe = self.cpu_probe(progress.epoch)
        for epoch in range(progress.epoch, cfg.train.epochs):
            interrupt.check()  # a Ctrl-C swallowed as the fold started (a finaliser) stops it here
            row = self.epoch(epoch, probe)
            probe = None
            improved = progress.add(row)
            if info.is_main:
                self.save(progress, improved)
                self.report(progress, improved)
            D.barrier(info)
            if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.train.epochs:
                log.info(
                    f"stopping after epoch {epoch + 1} as requested ({STOP_ENV}); rerun the same command to resume"
                )
                return False
        return True

    def cpu_probe(self, start_epoch: int) -> Callable[[float], None] | None:
        """For a GPU config on the CPU (rank 0): warn once, with the measured speed, how long the fold would take."""
        cfg, info = self.cfg, self.info
        if info.device.type != "cpu" or cfg.train.amp == "none" or not info.is_main or start_epoch >= cfg.train.epochs:
            return None
        steps_left = self.steps_per_epoch * (cfg.train.epochs - start_epoch)
        images_left = steps_left * cfg.train.batch_size * cfg.train.accum_steps

        def probe(rate: float) -> None:
            log.warning(cpu_warning(cfg, rate, images_left))

        return probe

    def epoch(self, epoch: int, probe: Callable[[float], None] | None) -> dict:
        """Train one epoch (its seed, image size, augmentation and rows), then validate: the epoch's log row."""
        from ..data.transforms import build_eval_transforms, build_train_transforms

        cfg, info, inputs, parts = self.cfg, self.info, self.inputs, self.parts
        t0 = time.perf_counter()
        D.seed_everything(D.epoch_seed(cfg.train.seed, epoch, info.rank))  # dropout etc.: same on resume
        size = image_size(cfg, epoch)
        inputs.train_ds.transform = build_train_transforms(cfg, size)
        if self.batch_loss is not None:
            self.batch_loss.start_epoch(epoch, size)
        inputs.train_ds.set_epoch(epoch)
        inputs.val_ds.transform = build_eval_transforms(cfg, size)
        loader = train_loader(
            inputs.train_ds, epoch_indices(cfg, inputs.train_labels, epoch), cfg, info, self.batch, epoch
        )
        desc = f"fold {self.files.fold} epoch {epoch + 1}/{cfg.train.epochs} ({size}px)"
        train_loss, seen, train_s = train_epoch(
            parts.model,
            loader,
            parts.loss_fn,
            parts.optimizer,
            self.scheduler,
            self.scaler,
            cfg,
            info,
            desc,
            self.batch_loss,
            self.hooks,
            probe,
        )
        row = {"epoch": epoch + 1, "lr": parts.optimizer.param_groups[0]["lr"], "train_loss": train_loss}
        row.update(validate(self.hooks.weights(parts.net), inputs.val_ds, inputs.val_labels, cfg, info))
        row.update({"seconds": time.perf_counter() - t0, "train_images_per_s": seen / max(train_s, 1e-9)})
        return row

    def save(self, progress: Progress, improved: bool) -> None:
        """last.pt after every epoch (everything to resume from); best.pt when the epoch improved, with the weights
        that were validated; log.csv and curves.png beside them."""
        cfg, net, epoch = self.cfg, self.parts.net, progress.epoch
        state = clean_state_dict(net.state_dict())
        if improved:
            validated = self.hooks.weights(net)
            kept = state if validated is net else clean_state_dict(validated.state_dict())
            best = {"model": kept, "config": cfg.to_dict(), "epoch": epoch, "val_weighted_log_loss": progress.best}
            save_checkpoint(self.files.best, {**best, "num_classes": len(LABELS)})
        save_checkpoint(
            self.files.last,
            {
                **self.hooks.state_dict(),
                "model": state,
                "config": cfg.to_dict(),
                "optimizer": self.parts.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": epoch,
                "rng": D.rng_state(),
                "log": progress.rows,
                "best_metric": progress.best,
                "best_epoch": progress.best_epoch,
                **self.stamp,
                "done": epoch == cfg.train.epochs,
                "num_classes": len(LABELS),
                "world_size": self.info.world_size,
            },
        )
        write_log_csv(progress.rows, self.files.log_csv)
        training_curves(pd.DataFrame(progress.rows), self.files.fold, self.files.curves, title=cfg.name)

    def report(self, progress: Progress, improved: bool) -> None:
        row = progress.rows[-1]
        log.info(
            f"epoch {progress.epoch}/{self.cfg.train.epochs}: train_loss {row['train_loss']:.4f}  val weighted log "
            f"loss {row['val_weighted_log_loss']:.4f}{' (best)' if improved else ''}  "
            + "  ".join(f"{c} {row[f'val_{c}']:.3f}" for c in LABELS)
            + f"  {row['train_images_per_s']:.1f} img/s  {row['seconds']:.0f}s"
        )

    def finish(self, progress: Progress, started: float) -> None:
        """Out-of-fold predictions of best.pt at the final image size (oof.csv, oof_embeddings.npz), then done.json."""
        from ..core import metrics
        from ..data.transforms import build_eval_transforms

        cfg, info, files, inputs, net = self.cfg, self.info, self.files, self.inputs, self.parts.net
        best_ckpt = read_checkpoint(files.best, map_location=info.device)
        net.load_state_dict(clean_state_dict(best_ckpt["model"]))
        inputs.val_ds.transform = build_eval_transforms(cfg)
        probs, emb = predict_frame(net, inputs.val_ds, cfg, info, embeddings=True, desc="oof")
        if info.is_main:
            data = inputs.data
            write_oof(files, data.val, probs, emb)
            summary = {
                "fold": files.fold,
                "config": cfg.name,
                "split": self.stamp["split"],
                "best_epoch": progress.best_epoch,
                "best_val_weighted_log_loss": progress.best,
                "oof_weighted_log_loss": metrics.weighted_log_loss(inputs.val_labels, probs),
                "epochs": cfg.train.epochs,
                "n_train": len(data.train),
                "n_val": len(data.val),
                "world_size": info.world_size,
                "seconds_this_run": round(time.time() - started, 1),
                **provenance.record(self.layout.data, self.table),
            }
            with atomic_open(files.done) as f:
                json.dump(summary, f, indent=2)
            log.info(
                f"fold {files.fold} done: best epoch {progress.best_epoch}, val weighted log loss "
                f"{progress.best:.4f}; wrote {files.oof} ({len(data.val)} images)"
            )
        D.barrier(info)


def _train_fold(
    cfg: Config,
    layout: Layout,
    files: FoldRun,
    force: bool,
    stop_after: int | None,
    info: D.DistInfo,
    batch_loss_factory: BatchLossFactory | None,
) -> Path:
    """Train one fold on this rank (the caller holds its lock): set up, resume, the epochs left, OOF files."""
    clear_fold(files, force, info)
    open_log(files.train_log, info.is_main, log)
    table = shared_fold_table(cfg, layout, info)
    stamp = {"split": fold_split_digest(table, files.fold), "data": provenance.data_identity(layout.data, table)}
    ckpt = resumable_checkpoint(cfg, layout, files, table, stamp["data"])
    trainer = FoldTrainer.build(cfg, layout, files, info, table, stamp, batch_loss_factory)
    progress = trainer.restore(ckpt)
    del ckpt  # optimizer state of a big model: do not keep a second copy for the whole run
    started = time.time()
    if trainer.train(progress, stop_after):
        trainer.finish(progress, started)
    return files.dir
