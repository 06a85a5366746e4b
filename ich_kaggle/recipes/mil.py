"""Set-based multiple-instance learning (Kodandarama, Prabhakaran, Singh): one slice CNN, two kinds of labels.

Every training step mixes, in ONE forward pass (so BatchNorm and DDP see one batch):
- a batch of slice-labelled images -> the engine's slice loss (focal in the recipe), and
- one scan ("bag": the slices of a series in z order) labelled only at scan level ->
  `mil_loss` = CE(Y, max_i p_i) per label, plus `smoothness` of the slices' pooled embeddings,
  SC = sum_i max(d(e_{i+1}, e_i) - d(e_{i-1}, e_i) + margin, 0).
Bags of scans positive for rare subtypes repeat more often when `train.balance: oversample` (minority oversampling).
The smoothness term is averaged over the bag's triples (`reduction="mean"`) so smooth_weight does not depend on
the bag size. The network is the usual per-slice ICHNet, so validation, oof.csv, predict, stack and submit are
unchanged.

Knobs (config `recipe:`): kind: mil, and under `recipe.mil:` bag_size (0 = whole series; longer series are subsampled
evenly, keeping z order), mil_weight, smooth_weight, margin, scan_only_fraction (share of training series whose slice
labels are hidden: they teach only through their scan label, as in data sets labelled per scan).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.config import Config
from ..data.dataset import SliceDataset, loader_workers
from ..core.errors import UserError, fix

EPS = 1e-12


def mil_loss(
    slice_logits: torch.Tensor,
    scan_labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    per_label: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """CE(Y, max_i p_i): a scan is positive for a label iff its most suspicious slice is.

    slice_logits (N, K) for the N slices of one scan, scan_labels (K,). Since the sigmoid is monotone,
    max_i p_i = sigmoid(max_i z_i); the loss is taken on the max logit, so its gradient reaches only the max slice.
    `per_label(logits, targets) -> (1, K)` defaults to BCE (pass a focal loss's `per_label` to use focal);
    `weights` (K,) weigh the labels (weighted mean), default equal.
    """
    top = slice_logits.float().max(dim=0).values.unsqueeze(0)
    target = scan_labels.float().reshape(1, -1)
    if per_label is None:
        loss = nn.functional.binary_cross_entropy_with_logits(top, target, reduction="none")
    else:
        loss = per_label(top, target)
    if weights is None:
        return loss.mean()
    w = weights.to(loss.device, loss.dtype)
    return (loss * w).sum() / w.sum()


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean distance with a finite gradient at 0 (identical embeddings)."""
    return ((a - b).pow(2).sum(dim=1) + EPS).sqrt()


def smoothness(emb: torch.Tensor, margin: float = 0.0, reduction: str = "sum") -> torch.Tensor:
    """SC = sum_{i=2}^{M-1} max(d(e_{i+1}, e_i) - d(e_{i-1}, e_i) + margin, 0) over z-ordered embeddings (M, D).

    A triplet loss with anchor e_i: the step to the next slice may not exceed the step from the previous one
    (by `margin`), so constant-speed (and slowing) trajectories cost 0 at margin 0 and a jump costs its size.
    reduction: sum (the paper) or mean over the M - 2 triples (independent of the bag size).
    """
    emb = emb.float()
    if len(emb) < 3:
        return emb.sum() * 0.0
    prev = _dist(emb[:-2], emb[1:-1])
    nxt = _dist(emb[2:], emb[1:-1])
    terms = torch.relu(nxt - prev + margin)
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    raise ValueError(f"reduction must be sum or mean, got {reduction!r}")


def series_bags(frame: pd.DataFrame, meta: pd.DataFrame) -> tuple[list[np.ndarray], np.ndarray]:
    """(row indices of `frame` per series in z order, series code per row). Needs series_id; z from meta."""
    if "series_id" not in frame.columns:
        raise UserError(
            f"recipe.kind=mil needs a series_id column in folds.csv; "
            f"rebuild it with `{fix('python -m ich_kaggle folds', 'make folds')}`"
        )
    rank = meta.drop_duplicates("image_id").set_index("image_id")["slice_rank"]
    ids = frame["image_id"].astype(str)
    order = pd.DataFrame(
        {
            "row": np.arange(len(frame)),
            "series": frame["series_id"].astype(str).to_numpy(),
            "rank": rank.reindex(ids).fillna(0).to_numpy(),
        }
    )
    codes, _ = pd.factorize(order["series"])
    order["code"] = codes
    order = order.sort_values(["code", "rank", "row"], kind="stable")
    bags = [g["row"].to_numpy() for _, g in order.groupby("code", sort=True)]
    return bags, codes


def subsample_bag(rows: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """At most `size` rows spread evenly over the whole series (random phase), in z order."""
    if size <= 0 or len(rows) <= size:
        return rows
    stride = len(rows) / size
    pos = np.floor(rng.uniform(0, stride) + stride * np.arange(size)).astype(int)
    return rows[np.clip(pos, 0, len(rows) - 1)]


class BagDataset(SliceDataset):
    """Slices whose random augmentation is drawn per series: every slice of a bag gets the same flip/rotation/window
    jitter, so neighbouring slices stay neighbours in image space (what the smoothness term assumes)."""

    def __init__(self, *args, series_codes: np.ndarray, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.series_codes = np.asarray(series_codes)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(self.series_codes[index]), 13])


class EpochBags(torch.utils.data.Dataset):
    """One epoch's bags in plan order: item i = (slices of bag plan[i] as (N, C, H, W), scan label (K,)).

    The evenly spaced subsample of a long series depends on (seed, epoch, i) only: the same on resume.
    """

    def __init__(
        self, ds: BagDataset, bags: list[np.ndarray], plan: np.ndarray, bag_size: int, seed: int, epoch: int
    ) -> None:
        self.ds, self.bags, self.plan, self.bag_size, self.seed, self.epoch = ds, bags, plan, bag_size, seed, epoch

    def __len__(self) -> int:
        return len(self.plan)

    def rows(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch, int(position), 19])
        rows = subsample_bag(self.bags[int(self.plan[position])], self.bag_size, rng)
        return rows, self.ds.labels[rows].max(axis=0)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, label = self.rows(position)
        return torch.stack([self.ds[int(r)][0] for r in rows]), torch.from_numpy(np.ascontiguousarray(label))


class MILBatchLoss:
    """Per-batch loss of the MIL recipe: slice loss on the batch + MIL and smoothness on one bag, one forward pass.

    `start_epoch(epoch, size)` fixes that epoch's bag order (a function of seed, epoch and rank: resumable).
    """

    def __init__(
        self, cfg: Config, train_ds: SliceDataset, meta: pd.DataFrame, loss_fn: nn.Module, net: nn.Module, info: Any
    ) -> None:
        from ..engine.plan import repeat_factors

        if not hasattr(loss_fn, "per_label"):
            raise UserError(
                f"config '{cfg.name}': recipe.kind=mil works with one backbone and loss bce|focal (not an ensemble)"
            )
        self.cfg, self.settings, self.loss_fn, self.net, self.info = cfg, cfg.recipe.mil, loss_fn, net, info
        self.bags, codes = series_bags(train_ds.frame, meta)
        labels = train_ds.labels
        self.scan_labels = np.stack([labels[b].max(axis=0) for b in self.bags]).astype(np.float32)
        self.repeats = (
            repeat_factors(self.scan_labels)
            if cfg.train.balance == "oversample"
            else np.ones(len(self.bags), dtype=np.int64)
        )
        hidden = np.random.default_rng([cfg.train.seed, 17]).random(len(self.bags)) < self.settings.scan_only_fraction
        if hidden.all():
            hidden[0] = False
        self.scan_only_rows = np.zeros(len(train_ds), dtype=bool)
        for b in np.flatnonzero(hidden):
            self.scan_only_rows[self.bags[b]] = True
        self.ds = BagDataset(
            train_ds.frame, train_ds.layout, cfg, transform=None, train=True, meta=meta, series_codes=codes
        )
        self.plan = np.arange(len(self.bags))
        self.epoch = 0
        self.loader: torch.utils.data.DataLoader | None = None
        self._iter = None
        self.last: dict[str, float] = {}

    def start_epoch(self, epoch: int, size: int) -> None:
        from ..data.transforms import build_train_transforms
        from ..engine.dist import worker_init_fn

        self.epoch = int(epoch)
        self.ds.transform = build_train_transforms(self.cfg, size)
        self.ds.set_epoch(epoch)
        rng = np.random.default_rng([self.cfg.train.seed, self.epoch, int(getattr(self.info, "rank", 0)), 11])
        self.plan = rng.permutation(np.repeat(np.arange(len(self.bags)), self.repeats))
        bags = EpochBags(self.ds, self.bags, self.plan, self.settings.bag_size, self.cfg.train.seed, self.epoch)
        workers = loader_workers(self.cfg.data.num_workers, self.info.local_world_size)
        # bags are read and augmented in worker processes, like the slice batches (batch_size=None: one bag an item)
        self.loader = torch.utils.data.DataLoader(
            bags,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            worker_init_fn=worker_init_fn,
            pin_memory=getattr(self.info, "device", torch.device("cpu")).type == "cuda",
            prefetch_factor=2 if workers > 0 else None,
        )
        self._iter = None

    def bag_rows(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the epoch's `position`-th bag in z order, its scan label (K,))."""
        return EpochBags(self.ds, self.bags, self.plan, self.settings.bag_size, self.cfg.train.seed, self.epoch).rows(
            position
        )

    def next_bag(self) -> tuple[torch.Tensor, np.ndarray]:
        """(the next bag's images (N, C, H, W), its scan label); the epoch's plan repeats if the epoch is longer."""
        if self._iter is None:
            self._iter = iter(self.loader)
        try:
            x, label = next(self._iter)
        except StopIteration:
            self._iter = iter(self.loader)
            x, label = next(self._iter)
        return x, np.asarray(label)

    def slice_loss(self, logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        hidden = torch.as_tensor(self.scan_only_rows[idx.cpu().numpy()], device=logits.device)
        if not bool(hidden.any()):
            return self.loss_fn(logits, y)
        w = self.loss_fn.weights.to(logits.device)
        per_sample = (self.loss_fn.per_label(logits, y) * w).sum(dim=1) / w.sum()
        keep = ~hidden
        return per_sample[keep].sum() / keep.sum().clamp(min=1)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        from ..engine.loop import autocast, to_device

        xb, scan_label = self.next_bag()
        xb = to_device(xb, self.cfg, x.device)
        captured: list[torch.Tensor] = []
        handle = self.net.head.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
        try:
            with autocast(self.cfg, x.device):
                logits = model(torch.cat([x, xb.to(x.dtype)]))
        finally:
            handle.remove()
        logits = logits.float()
        n = len(x)
        s = self.settings
        loss_slices = self.slice_loss(logits[:n], y, idx)
        target = torch.as_tensor(scan_label, device=logits.device)
        loss_mil = mil_loss(logits[n:], target, self.loss_fn.weights, self.loss_fn.per_label)
        loss_smooth = smoothness(captured[-1][n:], s.margin, reduction="mean")
        self.last = {
            "slice": float(loss_slices.detach()),
            "mil": float(loss_mil.detach()),
            "smooth": float(loss_smooth.detach()),
            "bag": len(xb),
        }
        return loss_slices + s.mil_weight * loss_mil + s.smooth_weight * loss_smooth


__all__ = ["mil_loss", "smoothness", "MILBatchLoss", "BagDataset", "EpochBags", "series_bags", "subsample_bag"]
