"""The saved embedding-level second stage (what the model bundle holds for `stacked_embeddings`), in both designs:
fitted as `make stack` fits it, saved, loaded and applied to the first-stage outputs of the test series as `infer`
hands them over (each fold model's raw embeddings), it gives the stack's own test predictions again.

The end-to-end checks (train, predict, stack, submit, export, infer on the competition's test folder) are in
tests/test_apply.py for the default design (per_fold); here the mixture design is covered too, on simulated
first-stage outputs and random embeddings (a few seconds)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ich_kaggle.core.config import StackConfig
from ich_kaggle.core.labels import LABELS
from ich_kaggle.stack import saved
from ich_kaggle.stack.pipeline import FoldInputs, run_per_fold, run_stacking
from ich_kaggle.stack.simulate import simulate, synthetic_series_z
from ich_kaggle.stack.stage import reduce_embeddings

L = list(LABELS)
K = 3  # first-stage folds
DIM = 8  # raw embedding width
SETTINGS = dict(model="conv", hidden=8, layers=1, epochs=2, batch_series=8, lr=5e-3, max_steps=0, embedding_dim=3)


@pytest.fixture(scope="module")
def sim():
    """Simulated first stage: OOF and test probabilities, patient folds, and per fold model raw test embeddings."""
    s = simulate(n_series=24, test_series=4, k=K, seed=4, structure=synthetic_series_z(30, np.random.default_rng(4)))
    rng = np.random.default_rng(5)
    oof_emb = rng.normal(size=(len(s.oof), DIM)).astype(np.float32)
    test_emb = {k: rng.normal(size=(len(s.test), DIM)).astype(np.float32) for k in range(K)}
    return s, oof_emb, test_emb


def _f16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float16).astype(np.float32)  # as predict stores embeddings, as the stack reads them


def _check(result, stage, frames, tmp_path, **given) -> None:
    path = saved.save(tmp_path / "models.pt", result.models, stage[0], 1, stage[1])
    back = saved.load(path)
    assert back.layout == saved.layout_of(stage[0]) and back.needs_embeddings
    got = saved.apply(back, frames, given.pop("place"), **given).set_index("image_id")
    want = result.test.set_index("image_id")
    assert sorted(got.index) == sorted(want.index)
    np.testing.assert_allclose(got.loc[want.index, L].to_numpy(), want[L].to_numpy(), atol=1e-6, rtol=0)
    assert not np.allclose(got.loc[want.index, L].to_numpy(), frames[0].set_index("image_id").loc[want.index, L])


def test_saved_mixture_stack_gives_its_test_predictions_again(sim, tmp_path):
    """mixture: one net per fold over the fold-averaged embeddings (averaged and rounded to float16 as predict does)
    reduced by the stack's components, which are saved with the nets."""
    s, oof_emb, test_emb = sim
    scfg = StackConfig(**SETTINGS, use_embeddings=True, embedding_space="mixture")
    test_mean = _f16(np.mean([_f16(test_emb[k]) for k in range(K)], axis=0))  # predict's test_embeddings.npz
    fitted: list = []
    oof_x, test_x = reduce_embeddings(
        (s.oof["image_id"].to_numpy(), _f16(oof_emb)),
        (s.test["image_id"].to_numpy(), test_mean),
        scfg.embedding_dim,
        prefix="m0",
        seed=scfg.seed,
        fitted=fitted,
    )
    result = run_stacking(s.meta, s.folds, [s.oof], [s.test], scfg, oof_x, test_x, progress=False)
    raw = {k: pd.DataFrame(test_emb[k], index=s.test["image_id"].to_numpy()) for k in range(K)}
    _check(result, (scfg, fitted), [s.test], tmp_path, place=s.meta, fold_embeddings=[raw])


def test_saved_per_fold_stack_gives_its_test_predictions_again(sim, tmp_path):
    """per_fold: per fold model k, its inner nets over its own test probabilities and compact embeddings reduced by
    the stack's components of fold model k; the mean over k."""
    s, oof_emb, test_emb = sim
    scfg = StackConfig(**SETTINGS, use_embeddings=True, embedding_space="per_fold")
    fold_of = s.folds.set_index("image_id")["fold"]
    ids = s.test["image_id"].to_numpy()
    fitted: dict = {}
    inputs, fold_probs, compact = {}, {}, {}
    for k in range(K):
        held = (s.oof["image_id"].map(fold_of) == k).to_numpy()
        fold_probs[k] = s.test.assign(**{c: np.clip(s.test[c] * (1 + 0.05 * k), 0, 1) for c in L})
        compact[k] = pd.DataFrame(_f16(test_emb[k][:, :4]), index=ids)  # predict's compact (projected) embeddings
        o, t = reduce_embeddings(
            (s.oof["image_id"].to_numpy()[held], _f16(oof_emb[held, :4])),
            (ids, compact[k].to_numpy()),
            scfg.embedding_dim,
            prefix="m0",
            seed=scfg.seed,
            fitted=fitted.setdefault(k, []),
        )
        inputs[k] = FoldInputs([s.oof[held]], [fold_probs[k]], o, t)
    result = run_per_fold(s.meta, s.folds, inputs, scfg, progress=False)
    assert sorted(result.models) == list(range(K))  # each fold model's inner nets, kept for the bundle
    _check(
        result,
        (scfg, fitted),
        [s.test],
        tmp_path,
        place=s.meta,
        fold_probs=[fold_probs],
        fold_embeddings=[compact],
    )
