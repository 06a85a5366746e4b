"""Per-slice features packed into length-sorted padded series tensors.

Why padded and sorted: one vectorised scatter builds the whole (n_series, max_len, F) array at competition scale
(~750k slices) in a second, and consecutive series of similar length make batches with almost no padding.
Feature layout (the nets rely on it): [position features (N_POS), first-stage logits (6 per model), extra (embeddings)].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..core.labels import LABELS

N_LABELS = len(LABELS)
# rel_pos, dz_prev, dz_next, has_prev, has_next
N_POS = 5
PROB_EPS = 1e-5


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), PROB_EPS, 1 - PROB_EPS)
    return np.log(p / (1 - p)).astype(np.float32)


@dataclass
class Sequences:
    """Series as rows of padded arrays; `row` maps each real slot back to the source frame's row (-1 = padding)."""

    x: np.ndarray  # (S, L, F) float32
    y: np.ndarray  # (S, L, 6) float32, zeros where unlabelled
    mask: np.ndarray  # (S, L) bool
    lengths: np.ndarray  # (S,) int64, ascending
    series_id: np.ndarray  # (S,) object
    group: np.ndarray  # (S,) int64 fold of each series (-1: test / none; -2: its slices sit in several folds)
    row: np.ndarray  # (S, L) int64
    slots: np.ndarray | None = None  # (S, L) int64 fold of each slice (-1: padding / none)
    loss_mask: np.ndarray | None = None  # (S, L) bool slices a model is trained on (None: every real slice)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_features(self) -> int:
        return self.x.shape[2]

    @property
    def scored(self) -> np.ndarray:
        """(S, L) the slices a loss is computed on: `loss_mask` when set, else every real slice."""
        return self.mask if self.loss_mask is None else self.loss_mask

    def subset(self, keep: np.ndarray) -> "Sequences":
        """Series selected by a boolean mask or index array (order kept, so still length-sorted)."""
        keep = np.asarray(keep)
        return Sequences(
            self.x[keep],
            self.y[keep],
            self.mask[keep],
            self.lengths[keep],
            self.series_id[keep],
            self.group[keep],
            self.row[keep],
            None if self.slots is None else self.slots[keep],
            None if self.loss_mask is None else self.loss_mask[keep],
        )

    def scatter(self, values: np.ndarray, n_rows: int) -> np.ndarray:
        """(S, L, C) per-slot values -> (n_rows, C) in source-frame row order (rows never seen stay NaN)."""
        out = np.full((n_rows, values.shape[-1]), np.nan, dtype=np.float32)
        out[self.row[self.mask]] = values[self.mask]
        return out


def position_features(
    series_code: np.ndarray, slice_rank: np.ndarray, series_len: np.ndarray, z: np.ndarray
) -> np.ndarray:
    """(N, N_POS) for rows already sorted by (series, slice_rank): where the slice sits and how far its neighbours are.

    z gaps are divided by the series' median gap, so a missing (unreadable) slice shows up as a gap of ~2.
    """
    n = len(series_code)
    rel = slice_rank / np.maximum(series_len - 1, 1)
    same_prev = np.zeros(n, dtype=bool)
    same_prev[1:] = series_code[1:] == series_code[:-1]
    dz = np.zeros(n, dtype=np.float64)
    zf = np.where(np.isfinite(z), z, np.nan)
    dz[1:] = np.abs(zf[1:] - zf[:-1])
    dz[~same_prev] = np.nan
    # median gap per series (NaN-safe); fall back to 1 where z is unknown
    med = pd.Series(dz).groupby(series_code).transform("median").to_numpy()
    ratio = dz / np.where(np.isfinite(med) & (med > 0), med, np.nan)
    ratio = np.where(same_prev, np.nan_to_num(ratio, nan=1.0), 0.0)
    ratio = np.clip(ratio, 0.0, 5.0)
    same_next = np.zeros(n, dtype=bool)
    same_next[:-1] = same_prev[1:]
    ratio_next = np.zeros(n)
    ratio_next[:-1] = ratio[1:]
    ratio_next[~same_next] = 0.0
    return np.stack([rel, ratio, ratio_next, same_prev, same_next], axis=1).astype(np.float32)


def build_sequences(
    frame: pd.DataFrame, values: np.ndarray, labels: np.ndarray | None = None, group: np.ndarray | None = None
) -> Sequences:
    """Pack rows of `frame` (series_id, slice_rank, z, series_len) into padded series.

    values: (N, V) per-row inputs (first-stage logits, embeddings) aligned with `frame`'s rows.
    labels: (N, 6) or None. group: (N,) fold per row. Under a patient split every row of a series shares it; under
    `cv.split: random` a series' slices sit in several folds (series group -2) and `slots` says which slice is where.
    """
    n = len(frame)
    codes, uniques = pd.factorize(frame["series_id"].to_numpy(), sort=False)
    rank = frame["slice_rank"].to_numpy(np.float64)
    order = np.lexsort((rank, codes))
    codes_o = codes[order]
    counts = np.bincount(codes_o, minlength=len(uniques))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(n) - starts[codes_o]
    z = pd.to_numeric(frame["z"], errors="coerce").to_numpy(np.float64) if "z" in frame else np.full(n, np.nan)
    series_len = frame["series_len"].to_numpy(np.float64) if "series_len" in frame else counts[codes].astype(np.float64)
    feats = np.concatenate(
        [
            position_features(codes_o, rank[order], series_len[order], z[order]),
            np.asarray(values, dtype=np.float32)[order],
        ],
        axis=1,
    )

    by_len = np.argsort(counts, kind="stable")  # new series index -> old code
    new_of_old = np.empty_like(by_len)
    new_of_old[by_len] = np.arange(len(by_len))
    s_idx = new_of_old[codes_o]
    n_series, max_len = len(uniques), int(counts.max()) if n else 0
    x = np.zeros((n_series, max_len, feats.shape[1]), dtype=np.float32)
    x[s_idx, pos] = feats
    y = np.zeros((n_series, max_len, N_LABELS), dtype=np.float32)
    if labels is not None:
        y[s_idx, pos] = np.asarray(labels, dtype=np.float32)[order]
    mask = np.zeros((n_series, max_len), dtype=bool)
    mask[s_idx, pos] = True
    row = np.full((n_series, max_len), -1, dtype=np.int64)
    row[s_idx, pos] = order
    g = np.full(n_series, -1, dtype=np.int64)
    slots = None
    if group is not None:
        grp = np.asarray(group, dtype=np.int64)[order]
        lo = np.full(n_series, np.iinfo(np.int64).max)
        hi = np.full(n_series, np.iinfo(np.int64).min)
        np.minimum.at(lo, s_idx, grp)
        np.maximum.at(hi, s_idx, grp)
        g = np.where(lo == hi, lo, -2)
        slots = np.full((n_series, max_len), -1, dtype=np.int64)
        slots[s_idx, pos] = grp
    return Sequences(
        x, y, mask, counts[by_len].astype(np.int64), np.asarray(uniques, dtype=object)[by_len], g, row, slots
    )


# --- torch helpers shared by the nets, training and TTA ---


def reverse_index(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, L) gather index that reverses each series within its own length; padding maps to itself."""
    ar = torch.arange(max_len, device=lengths.device).unsqueeze(0)
    ln = lengths.unsqueeze(1)
    return torch.where(ar < ln, ln - 1 - ar, ar)


def reverse_values(t: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse (B, L, C) values (labels, outputs) within each series' length."""
    idx = reverse_index(lengths, t.shape[1]).unsqueeze(-1).expand_as(t)
    return t.gather(1, idx)


def reverse_inputs(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse (B, L, F) inputs: slice order flipped and position features mirrored (prev <-> next)."""
    xr = reverse_values(x, lengths)
    mask = (torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
    pos = torch.stack([1.0 - xr[..., 0], xr[..., 2], xr[..., 1], xr[..., 4], xr[..., 3]], dim=-1)
    return torch.cat([pos * mask, xr[..., N_POS:]], dim=-1)
