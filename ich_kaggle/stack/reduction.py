"""The second stage's own projection of embeddings: a few whitened principal components, as a fitted object.

`stage.reduce_embeddings` fits it (on a sample of the OOF and test embeddings, no labels) and applies it to both;
the fitted arrays are kept with the saved second stage (`stack.saved`) so that `infer` projects the embeddings of new
slices into the very space the sequence nets were trained in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Reduction:
    mean: np.ndarray  # (D,) float64
    components: np.ndarray  # (d, D) float64
    scale: np.ndarray  # (d,) float64: each component's standard deviation on the fitted sample

    def project(self, emb: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, d) float32 whitened components (float64 arithmetic, as the stack was fitted)."""
        return ((np.asarray(emb).astype(np.float64) - self.mean) @ self.components.T / self.scale).astype(np.float32)

    def frame(self, ids: np.ndarray, emb: np.ndarray, prefix: str) -> pd.DataFrame:
        """image_id + `<prefix>e<i>` columns: the extra inputs of the stack (`pipeline.merge_sources`)."""
        proj = self.project(emb)
        out = pd.DataFrame(proj, columns=[f"{prefix}e{i}" for i in range(proj.shape[1])])
        out.insert(0, "image_id", ids)
        return out

    def arrays(self) -> dict:
        return {"mean": self.mean, "components": self.components, "scale": self.scale}


def fit_reduction(train: np.ndarray, test: np.ndarray, dim: int, seed: int = 0, fit_rows: int = 50_000) -> Reduction:
    """The first `dim` principal components of a random sample of the rows of `train` and `test` (never the two
    concatenated: 120k x 2048 floats would be 1 GB at competition scale)."""
    from sklearn.utils.extmath import randomized_svd

    n_train, n_test = len(train), len(test)
    rng = np.random.default_rng(seed)
    pick = rng.choice(n_train + n_test, size=min(fit_rows, n_train + n_test), replace=False)
    parts = [train[pick[pick < n_train]]] + ([test[pick[pick >= n_train] - n_train]] if n_test else [])
    sample = np.concatenate(parts).astype(np.float64)
    mean = sample.mean(0)
    k = min(dim, *sample.shape)
    if k >= min(sample.shape) - 1:  # compact embeddings (predict.compact): already as few columns as asked
        _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    else:  # full embeddings: the leading components only (a full SVD of 50k x 2048 took ~2 minutes)
        _, _, vt = randomized_svd(sample - mean, k, random_state=seed)
    comps = vt[:k]
    scale = ((sample - mean) @ comps.T).std(0) + 1e-6
    return Reduction(mean, comps, scale)
