"""Compact embeddings: each fold model's pooled features kept only as the principal components the second stage uses.

Why: a 2048-d float16 embedding is 4 KB a slice, 12 GB per config at competition scale, and the per-fold second
stage reads only `stack.embedding_dim` components of it (issue 26). The projection is fitted once per fold model, on
its own held-out (OOF) embeddings (no labels), with a randomized solver (a full SVD of 50k x 2048 took ~2 minutes;
the randomized one needs a few seconds), and kept in `predictions/oof_fold<k>_pca.npz` so that the test embeddings of
the same fold model, here or in a Kaggle kernel that has no training images, are projected into the same space.
Components are whitened (unit variance on the fitted rows) so that float16 keeps their precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.io import atomic_open


@dataclass
class Projection:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (d, D) rows: principal directions
    scale: np.ndarray  # (d,) standard deviation of each component on the fitted rows

    def apply(self, emb: np.ndarray, batch: int = 65_536) -> np.ndarray:
        """(N, D) -> (N, d) float16, in batches (the float32 copy of 120k x 2048 would be 1 GB)."""
        out = np.empty((len(emb), len(self.scale)), dtype=np.float16)
        for lo in range(0, len(emb), batch):
            part = emb[lo : lo + batch].astype(np.float32) - self.mean
            out[lo : lo + batch] = (part @ self.components.T / self.scale).astype(np.float16)
        return out

    def save(self, path: Path) -> None:
        with atomic_open(path, "wb") as f:
            np.savez(f, mean=self.mean, components=self.components, scale=self.scale)

    @classmethod
    def load(cls, path: Path) -> "Projection":
        if not path.exists():
            raise UserError(
                f"{path} not found: the test embeddings of this fold model are projected with the PCA "
                f"fitted on its OOF embeddings; rerun `make predict` where the training images are "
                f"(or ship the predictions folder with the model)"
            )
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mean"], z["components"], z["scale"])


def fit_projection(emb: np.ndarray, dim: int, seed: int = 0, fit_rows: int = 50_000) -> Projection:
    """PCA of (a random sample of at most `fit_rows` rows of) `emb` to min(dim, D, rows) whitened components."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    sample = emb[rng.choice(len(emb), size=min(fit_rows, len(emb)), replace=False)].astype(np.float32)
    n = max(1, min(dim, sample.shape[1], len(sample) - 1))
    pca = PCA(n_components=n, svd_solver="randomized", random_state=seed).fit(sample)
    scale = np.sqrt(pca.explained_variance_).astype(np.float32) + 1e-6
    return Projection(pca.mean_.astype(np.float32), pca.components_.astype(np.float32), scale)
