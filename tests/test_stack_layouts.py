"""The 2nd-place layout of the second stage (`stack.in_sample`) on simulated first-stage outputs: what each second
stage trains on, and that fold k's OOF never learns from fold k's labels."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ich_kaggle.core.config import StackConfig
from ich_kaggle.core.labels import LABELS
from ich_kaggle.stack.in_sample import InSampleInputs, run_second_place
from ich_kaggle.stack.sequences import logit
from ich_kaggle.stack.simulate import simulate, synthetic_series_z

L = list(LABELS)
K = 3


def _inputs(sim) -> dict[int, InSampleInputs]:
    """Per fold model k: sharper (in-sample) predictions on the other folds' images, the simulated OOF ones on fold
    k, its own perturbed test predictions; one embedding column that carries the labels, in every set."""
    fold_of = sim.folds.set_index("image_id")["fold"]
    y = sim.folds.set_index("image_id")[L]
    rng = np.random.default_rng(0)

    def emb(f: pd.DataFrame, noise: float) -> pd.DataFrame:
        any_ = y["any"].reindex(f["image_id"]).fillna(0).to_numpy()
        return pd.DataFrame({"image_id": f["image_id"].to_numpy(), "m0e0": any_ + rng.normal(0, noise, len(f))})

    out = {}
    for k in range(K):
        held = sim.oof[sim.oof["image_id"].map(fold_of) == k]
        rest = sim.oof[sim.oof["image_id"].map(fold_of) != k]
        sharp = 0.5 * logit(rest[L].to_numpy()) + 0.5 * np.where(y.loc[rest["image_id"]].to_numpy() == 1, 3.0, -5.0)
        seen = pd.concat(
            [rest[["image_id"]].reset_index(drop=True), pd.DataFrame(1 / (1 + np.exp(-sharp)), columns=L)], axis=1
        )
        test = sim.test.assign(**{c: np.clip(sim.test[c] * (1 + 0.02 * k), 0, 1) for c in L})
        out[k] = InSampleInputs([seen], [held], [test], emb(seen, 0.3), emb(held, 1.0), emb(test, 1.0))
    return out


def test_second_place_layout_trains_each_stage_on_the_other_folds_only():
    """Second stage k trains on fold model k's in-sample rows of the other folds, predicts fold k (its OOF) and the
    test set (mean over k). With fold 1's labels replaced by noise, fold 1's OOF does not move (its second stage
    never trained on them) while fold 0's does (its training set holds fold 1)."""
    sim = simulate(
        n_series=60, test_series=6, k=K, seed=3, noise=2.5, structure=synthetic_series_z(60, np.random.default_rng(0))
    )
    scfg = StackConfig(model="conv", hidden=8, layers=1, epochs=2, batch_series=16, lr=5e-3)
    clean = run_second_place(sim.meta, sim.folds, _inputs(sim), scfg, progress=False)
    assert sorted(clean.oof["image_id"]) == sorted(sim.oof["image_id"])
    assert sorted(clean.test["image_id"]) == sorted(sim.test["image_id"])
    assert list(clean.metrics["stage"]) == ["first_stage", "stacked"]
    assert sorted(clean.models) == list(range(K)) and set(clean.curve["fold"]) == set(range(K))

    folds = sim.folds.copy()
    in1 = folds["fold"] == 1
    folds.loc[in1, L] = (np.random.default_rng(1).random((int(in1.sum()), len(L))) < 0.5).astype(np.int8)
    noisy = run_second_place(sim.meta, folds, _inputs(sim), scfg, progress=False)
    fold_of = sim.folds.set_index("image_id")["fold"]
    a, b = (r.oof.set_index("image_id")[L] for r in (clean, noisy))
    ids0, ids1 = fold_of.index[fold_of == 0], fold_of.index[fold_of == 1]
    assert np.array_equal(a.loc[ids1].to_numpy(), b.loc[ids1].to_numpy())
    assert not np.allclose(a.loc[ids0].to_numpy(), b.loc[ids0].to_numpy(), atol=1e-4)
