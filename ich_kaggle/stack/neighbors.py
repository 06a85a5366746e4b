"""The `neighbors` baseline: per slice, the first-stage logits of the k previous and k next slices (and its own)
-> one logistic regression per label. Always computed, so every sequence net is compared with the simplest context model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ..core.config import StackConfig
from ..core.labels import LABEL_WEIGHTS
from ..core.registry import STACK_MODELS
from .sequences import N_LABELS, N_POS, Sequences



def neighbor_features(seqs: Sequences, k: int, n_models: int) -> np.ndarray:
    """(S, L, D) = logits at offsets -k..k of every model (0 beyond the series) + presence flags of the 2k neighbours."""
    logits = seqs.x[:, :, N_POS: N_POS + n_models * N_LABELS]
    s, length, c = logits.shape
    padded = np.zeros((s, length + 2 * k, c), dtype=np.float32)
    padded[:, k: k + length] = logits
    present = np.zeros((s, length + 2 * k), dtype=np.float32)
    present[:, k: k + length] = seqs.mask
    parts = [padded[:, k + o: k + o + length] for o in range(-k, k + 1)]
    flags = [present[:, k + o: k + o + length, None] for o in range(-k, k + 1) if o != 0]
    return np.concatenate(parts + flags, axis=2)


@dataclass
class NeighborModel:
    """Standardised features -> linear layer with one independent output (logistic regression) per label."""

    mean: np.ndarray
    std: np.ndarray
    weight: torch.Tensor  # (D, 6)
    bias: torch.Tensor  # (6,)
    k: int
    n_models: int

    def predict(self, seqs: Sequences) -> np.ndarray:
        feats = (neighbor_features(seqs, self.k, self.n_models) - self.mean) / self.std
        with torch.inference_mode():
            logits = torch.from_numpy(feats) @ self.weight + self.bias
        return (torch.sigmoid(logits).numpy() * seqs.mask[..., None]).astype(np.float32)


def fit_neighbors(seqs: Sequences, k: int, n_models: int, l2: float = 1e-4, iters: int = 40) -> NeighborModel:
    """Full-batch L-BFGS on the metric's weighted BCE (the loss splits by label, so this is 6 logistic regressions)."""
    feats = neighbor_features(seqs, k, n_models)[seqs.scored]
    y = torch.from_numpy(seqs.y[seqs.scored])
    mean = feats.mean(0)
    std = feats.std(0) + 1e-6
    xt = torch.from_numpy((feats - mean) / std)
    w = torch.zeros(xt.shape[1], N_LABELS, requires_grad=True)
    prior = y.mean(0).clamp(1e-4, 1 - 1e-4)
    b = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    lw = torch.tensor(LABEL_WEIGHTS)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        per = F.binary_cross_entropy_with_logits(xt @ w + b, y, reduction="none").mean(0)
        loss = (per * lw).sum() / lw.sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return NeighborModel(mean.astype(np.float32), std.astype(np.float32), w.detach(), b.detach(), k, n_models)


@STACK_MODELS.register("neighbors")
class NeighborStacker:
    """The stack model `neighbors` (the interface of stack/fit.py's SequenceStacker): `fit_neighbors` per fold."""

    def fit(self, seqs: Sequences, scfg: StackConfig, n_models: int, fold: int,
            curve: list[dict] | None = None) -> NeighborModel:
        return fit_neighbors(seqs, scfg.neighbors_k, n_models)

    def predict(self, model: NeighborModel, seqs: Sequences, scfg: StackConfig) -> np.ndarray:
        return model.predict(seqs)
