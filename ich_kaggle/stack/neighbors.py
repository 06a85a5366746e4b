"""The `neighbors` baseline: per slice, the first-stage logits of the k previous and k next slices (and its own)
-> one logistic regression per label. Always computed, so every sequence net is compared with the simplest context
model.

Its L2 penalty is chosen by cross-fitting over the folds it is given. Each fold's OOF logits come from a different
fold model, and undertrained fold models differ in scale: with a fixed weak penalty (1e-4) the regression learned
the other folds' scales and scored far worse than the constant prior on held-out folds (0.393 vs 0.226 on the
demo's synthetic data). Chosen per fold from `L2_GRID`, it falls back towards the prior where the logits do not
transfer and keeps the context where they do.
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
    """(S, L, D) = logits at offsets -k..k of every model (0 beyond the series) + presence flags of the 2k
    neighbours."""
    logits = seqs.x[:, :, N_POS : N_POS + n_models * N_LABELS]
    s, length, c = logits.shape
    padded = np.zeros((s, length + 2 * k, c), dtype=np.float32)
    padded[:, k : k + length] = logits
    present = np.zeros((s, length + 2 * k), dtype=np.float32)
    present[:, k : k + length] = seqs.mask
    parts = [padded[:, k + o : k + o + length] for o in range(-k, k + 1)]
    flags = [present[:, k + o : k + o + length, None] for o in range(-k, k + 1) if o != 0]
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


L2_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0)  # on standardised features, per mean weighted BCE; 100: ~the prior
DEFAULT_L2 = 1e-1  # when the sequences hold fewer than 2 folds to choose by


def fit_neighbors(seqs: Sequences, k: int, n_models: int, l2: float | None = None, iters: int = 40) -> NeighborModel:
    """The baseline fitted on `seqs`; `l2` None: chosen by `choose_l2` on the folds `seqs` holds."""
    if l2 is None:
        l2 = choose_l2(seqs, k, n_models, iters)
    return _fit(seqs, k, n_models, l2, iters)


def choose_l2(seqs: Sequences, k: int, n_models: int, iters: int = 40, grid: tuple[float, ...] = L2_GRID) -> float:
    """The penalty of `grid` with the lowest weighted log loss when each fold of `seqs` is predicted by a baseline
    fitted on the others (slices outside the loss mask, e.g. a held-out fold's under a random split, never count)."""
    from ..core.metrics import weighted_log_loss
    from .fit import cross_fit

    if seqs.slots is None:
        return DEFAULT_L2
    inner = seqs.subset(np.arange(len(seqs)))
    inner.slots = np.where(seqs.scored, seqs.slots, -1)
    inner.loss_mask = None
    at = inner.mask & (inner.slots >= 0)
    if len(np.unique(inner.slots[at])) < 2:
        return DEFAULT_L2
    losses = {}
    for l2 in grid:
        cf = cross_fit(inner, None, lambda s, f: _fit(s, k, n_models, l2, iters), lambda m, s: m.predict(s))
        losses[l2] = weighted_log_loss(inner.y[at], cf.oof[at])
    return min(losses, key=losses.get)


PSEUDO = 0.5  # per label, half a positive and half a negative example at the mean features (Jeffreys' prior)


def _fit(seqs: Sequences, k: int, n_models: int, l2: float, iters: int = 40) -> NeighborModel:
    """Full-batch L-BFGS on the metric's weighted BCE (the loss splits by label, so this is 6 logistic regressions).

    The bias carries `PSEUDO` counts of each class: a label with no positive in the training folds (epidural on a
    small set) otherwise gets a bias near -inf and a held-out positive costs ~9 nats."""
    feats = neighbor_features(seqs, k, n_models)[seqs.scored]
    y = torch.from_numpy(seqs.y[seqs.scored])
    mean = feats.mean(0)
    std = feats.std(0) + 1e-6
    xt = torch.from_numpy((feats - mean) / std)
    w = torch.zeros(xt.shape[1], N_LABELS, requires_grad=True)
    n = len(y)
    prior = (y.sum(0) + PSEUDO) / (n + 2 * PSEUDO)
    b = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    lw = torch.tensor(LABEL_WEIGHTS)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        per = F.binary_cross_entropy_with_logits(xt @ w + b, y, reduction="none").sum(0)
        # the pseudo-counts: at the mean features (0 after standardising) the logit is the bias alone
        per = (per + PSEUDO * (F.softplus(-b) + F.softplus(b))) / (n + 2 * PSEUDO)
        loss = (per * lw).sum() / lw.sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return NeighborModel(mean.astype(np.float32), std.astype(np.float32), w.detach(), b.detach(), k, n_models)


@STACK_MODELS.register("neighbors")
class NeighborStacker:
    """The stack model `neighbors` (the interface of stack/fit.py's SequenceStacker): `fit_neighbors` per fold."""

    def fit(
        self, seqs: Sequences, scfg: StackConfig, n_models: int, fold: int, curve: list[dict] | None = None
    ) -> NeighborModel:
        return fit_neighbors(seqs, scfg.neighbors_k, n_models)

    def predict(self, model: NeighborModel, seqs: Sequences, scfg: StackConfig) -> np.ndarray:
        return model.predict(seqs)
