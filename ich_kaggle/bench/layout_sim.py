"""The second stage's embedding layouts on simulated first-stage outputs with in-sample features (issue 26).

The simulation of `bench/stack_scale.py` (real series structure, five fold models each with its own feature space)
extended with what the 2nd-place layout trains on: each fold model's predictions and embeddings of the images it
trained on. In-sample features are modelled as the OOF ones with their error shrunk by a factor `gamma` (1: no
gap, a model that did not fit its training images better than unseen ones; 0: it reproduces their labels), for the
logits and for the embedding latent alike. `gamma` is set by matching the ratio of in-sample to OOF first-stage loss
measured on real fold models (`bench --what stack-layouts` prints it for the demo's). What this cannot express: a
CNN memorises its training images, so its in-sample errors are not merely smaller but differently shaped (it also
fits label noise); the shrink is the first-order effect only. Measured (docs/stacking.md): at the demo's gap the
simulation puts `second_place` far ahead of `per_fold`, while the demo's real in-sample features put it behind out
of fold, so these figures measure the data-size effect of the layouts, not the in-sample mismatch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..core import metrics
from ..core.config import StackConfig
from ..core.labels import LABELS
from .stack import COMPETITION_TEST_SLICES, COMPETITION_TRAIN_SLICES, HEADERS

L = list(LABELS)
K = 5
SIGNAL = (1.5, -3.5)  # simulate(): logit of a positive / negative slice before noise


def _frame(ids: np.ndarray, logits: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(1 / (1 + np.exp(-logits)), columns=L)
    frame.insert(0, "image_id", ids)
    return frame


def simulated(scale: float, gamma: float, dim: int = 16, seed: int = 0):
    """(sim, parts): parts[k] = (in-sample, OOF, test) of fold model k, each (probability frame, (ids, emb))."""
    from ..stack.simulate import real_series_z, simulate, synthetic_series_z

    structure = real_series_z(HEADERS) if HEADERS.exists() else synthetic_series_z(2000, np.random.default_rng(0))
    mean_len = float(np.mean([len(s) for s in structure]))
    n_train = max(20, int(round(COMPETITION_TRAIN_SLICES * scale / mean_len)))
    n_test = max(4, int(round(COMPETITION_TEST_SLICES * scale / mean_len)))
    sim = simulate(n_train, n_test, k=K, seed=seed, structure=structure)
    rng = np.random.default_rng(seed + 1)
    y_tr = sim.folds[L].to_numpy(np.float32)
    y_te = sim.test_truth[L].to_numpy(np.float32)
    signal_tr = np.where(y_tr == 1, *SIGNAL)
    err_tr = np.log(sim.oof[L].to_numpy() / (1 - sim.oof[L].to_numpy())) - signal_tr
    logit_te = np.log(sim.test[L].to_numpy() / (1 - sim.test[L].to_numpy()))
    lat_err_tr = rng.normal(0, 1.0, y_tr.shape)
    latent_te = 1.5 * y_te + rng.normal(0, 1.0, y_te.shape)
    folds = sim.folds["fold"].to_numpy()
    ids_tr, ids_te = sim.oof["image_id"].to_numpy(), sim.test["image_id"].to_numpy()
    parts = {}
    for k in range(K):
        side = max(dim, len(L))  # fold model k's own feature space: a random rotation of the latent
        rot = np.linalg.qr(rng.normal(size=(side, side)))[0][: len(L), :dim]

        def features(rows: np.ndarray, g: float):
            n = int(rows.sum())
            logits = signal_tr[rows] + g * (err_tr[rows] + rng.normal(0, 0.7, (n, len(L))))
            emb = (1.5 * y_tr[rows] + g * lat_err_tr[rows]) @ rot + g * rng.normal(0, 0.5, (n, dim))
            return _frame(ids_tr[rows], logits), (ids_tr[rows].astype(str), emb.astype(np.float32))

        test_logits = logit_te + rng.normal(0, 0.7, logit_te.shape)
        test_emb = (latent_te @ rot + rng.normal(0, 0.5, (len(ids_te), dim))).astype(np.float32)
        parts[k] = (
            features(folds != k, gamma),
            features(folds == k, 1.0),
            (_frame(ids_te, test_logits), (ids_te.astype(str), test_emb)),
        )
    return sim, parts


def loss_ratio(sim, parts) -> float:
    """In-sample over OOF weighted log loss of the simulated first stage, pooled over the fold models."""
    y = sim.folds.set_index("image_id")[L]

    def pooled(i: int) -> float:
        frame = pd.concat([parts[k][i][0] for k in parts], ignore_index=True)
        return metrics.weighted_log_loss(y.loc[frame["image_id"]].to_numpy(np.float64), frame[L].to_numpy())

    return pooled(0) / pooled(1)


def gamma_for(ratio: float, scale: float = 0.005, grid=np.linspace(0.1, 1.0, 19)) -> float:
    """The shrink whose simulated in-sample / OOF loss ratio is closest to `ratio` (a measured one)."""
    return float(min(grid, key=lambda g: abs(loss_ratio(*simulated(scale, float(g), seed=9)) - ratio)))


def fit(design: str, sim, parts, scfg: StackConfig):
    """per_fold or second_place on the simulated parts: (OOF, test) weighted log loss."""
    from ..stack.in_sample import InSampleInputs, project_fold_model, run_second_place
    from ..stack.pipeline import FoldInputs, run_per_fold
    from ..stack.stage import reduce_embeddings

    scfg, dim = scfg.embedding_level(), scfg.embedding_dim
    if design == "per_fold":
        inputs = {}
        for k, (_, (oof, oof_e), (test, test_e)) in parts.items():
            o, t = reduce_embeddings(oof_e, test_e, dim, prefix="m0", seed=scfg.seed)
            inputs[k] = FoldInputs([oof], [test], o, t)
        result = run_per_fold(sim.meta, sim.folds, inputs, scfg, progress=False)
    elif design == "second_place":
        inputs = {}
        for k, ((seen, seen_e), (oof, oof_e), (test, test_e)) in parts.items():
            x = project_fold_model(seen_e, oof_e, test_e, dim, prefix="m0", seed=scfg.seed)
            inputs[k] = InSampleInputs([seen], [oof], [test], *x)
        result = run_second_place(sim.meta, sim.folds, inputs, scfg, progress=False)
    else:
        raise ValueError(f"unknown design {design}")
    y = sim.folds.set_index("image_id")[L]
    oof = result.oof.set_index("image_id").loc[y.index, L].to_numpy(np.float64)
    return (
        metrics.weighted_log_loss(y.to_numpy(np.float64), oof),
        metrics.score_frames(sim.test_truth, result.test)["weighted_log_loss"],
    )
