"""Which rows each epoch trains on (oversampling, subsampling) and the DataLoaders that feed them.

The plan depends only on (seed, epoch), so every rank and every resumed run sees the same images in the same order;
`DistributedSampler` then deals them out rank by rank (its shuffle is also seeded by seed + epoch).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..data.dataset import loader_workers

from ..core.labels import LABELS
from ..core.config import Config
from .dist import DistInfo, worker_init_fn

MAX_REPEAT = 8


def repeat_factors(labels: np.ndarray) -> np.ndarray:
    """Per row: how often to show it. Positives of subtype c repeat sqrt(max_count / count_c) times (<= 8).

    Square-root balancing: epidural (~0.4% of slices) is shown more often without drowning the common subtypes.
    `any` (column 0) is not balanced; a row takes the largest factor among its positive subtypes.
    """
    labels = np.asarray(labels) > 0.5
    sub = labels[:, 1:]
    counts = sub.sum(axis=0)
    if counts.max(initial=0) == 0:
        return np.ones(len(labels), dtype=np.int64)
    factor = np.where(counts > 0, np.sqrt(counts.max() / np.maximum(counts, 1)), 1.0)
    factor = np.clip(np.round(factor), 1, MAX_REPEAT).astype(np.int64)
    per_row = np.where(sub, factor[None, :], 1).max(axis=1)
    return per_row.astype(np.int64)


def epoch_indices(cfg: Config, labels: np.ndarray, epoch: int) -> np.ndarray:
    """Row indices for one epoch (unshuffled order; the sampler shuffles)."""
    n = len(labels)
    idx = np.arange(n)
    if cfg.train.balance == "oversample":
        idx = np.repeat(idx, repeat_factors(labels))
    cap = cfg.train.max_images_per_epoch
    if cap and cap < len(idx):
        rng = np.random.default_rng([cfg.train.seed, epoch, 7])
        idx = np.sort(rng.choice(idx, size=cap, replace=False))
    return idx


def image_size(cfg: Config, epoch: int) -> int:
    """Progressive resizing: train.progressive_sizes[epoch] while listed, then data.image_size."""
    sizes = cfg.train.progressive_sizes
    return int(sizes[epoch]) if epoch < len(sizes) else int(cfg.data.image_size)


def _loader(ds: Dataset, sampler, batch: int, cfg: Config, info: DistInfo, seed: int, drop_last: bool) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    workers = loader_workers(cfg.data.num_workers, info.local_world_size)
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=info.device.type == "cuda",
        worker_init_fn=worker_init_fn,
        generator=g,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


def _drops_last(per_rank: int, batch: int) -> bool:
    """Drop a ragged last batch (BatchNorm fails on a batch of one) unless that would leave nothing."""
    return per_rank > batch


def train_loader(ds: Dataset, indices: np.ndarray, cfg: Config, info: DistInfo, batch: int, epoch: int) -> DataLoader:
    subset = Subset(ds, indices.tolist())
    sampler = DistributedSampler(
        subset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.train.seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    drop_last = _drops_last(len(sampler), batch)
    return _loader(subset, sampler, batch, cfg, info, seed=cfg.train.seed * 1000 + epoch, drop_last=drop_last)


def batches_per_epoch(rows: int, info: DistInfo, batch: int) -> int:
    """len(train_loader(...)) for an epoch of `rows` rows, without building a loader: `DistributedSampler` pads every
    rank to ceil(rows / world_size) rows, which `train_loader` cuts into batches of `batch`."""
    per_rank = math.ceil(rows / info.world_size)
    return per_rank // batch if _drops_last(per_rank, batch) else math.ceil(per_rank / batch)


def eval_loader(ds: Dataset, cfg: Config, info: DistInfo, batch: int) -> DataLoader:
    """Each rank predicts its share (padded to equal length; duplicates are dropped after the gather)."""
    sampler = DistributedSampler(ds, num_replicas=info.world_size, rank=info.rank, shuffle=False, drop_last=False)
    return _loader(ds, sampler, batch, cfg, info, seed=cfg.train.seed, drop_last=False)


def label_matrix(frame) -> np.ndarray:
    return frame[list(LABELS)].to_numpy(dtype=np.float32)
