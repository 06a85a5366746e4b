"""The 2nd-place layout of the second stage (darraghdog, RSNA ICH 2019), for comparison with `per_fold` and `mixture`.

2nd place trained one sequence model per first-stage fold model, on that CNN's embeddings of the whole training
set: second stage k is fitted on fold model k's predictions and embeddings of the images fold model k TRAINED on
(every fold but k: in-sample, so overconfident), predicts fold k's held-out images from the same model's OOF
features (the OOF rows of the layout) and the test images from its test features; the test prediction is the mean
over k. Against `per_fold` (second stage k trained on fold k's held-out fifth only, with an inner cross-fit) it sees
(k-1)/k of the series instead of 1/k, but trains on features from images its CNN has seen and is applied to features
of images it has not: `bench --what stack-layouts` measures which effect wins.

Stopping: 2nd place stopped on the held-out fold itself. Here each net stops on `stack.val_fraction` of its own
(in-sample) training series, as every other stacker does, so that fold k's labels never choose anything about the
model that predicts fold k and the OOF loss stays comparable with the other designs' (stopping on fold k would make
its OOF loss optimistic; the test loss would not change meaning).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..core.config import StackConfig
from ..core.registry import STACK_MODELS
from .pipeline import CURVE_COLUMNS, LABEL_COLS, StackResult, _values, _wide, merge_sources, score_row
from .fit import torch_threads
from .sequences import build_sequences
from .stage import reduce_embeddings


@dataclass
class InSampleInputs:
    """What fold model k (of every source) produced: on the images it trained on, on its held-out fold, on the test
    images. Each list holds one wide probability frame (image_id + labels) per source; the extras are embedding
    features (image_id + columns, the same columns in all three) in fold model k's own space."""

    train: list[pd.DataFrame]  # fold model k on the training images of the other folds (in-sample)
    oof: list[pd.DataFrame]  # fold model k on fold k's held-out images
    test: list[pd.DataFrame]  # fold model k on the test images
    train_extra: pd.DataFrame | None = None
    oof_extra: pd.DataFrame | None = None
    test_extra: pd.DataFrame | None = None


def project_fold_model(
    train: tuple[np.ndarray, np.ndarray],
    oof: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    dim: int,
    prefix: str,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(ids, embeddings) of one fold model on its training, held-out and test images -> three feature frames, all
    projected by one PCA fitted (without labels) on that fold model's own embeddings, as `per_fold` does."""
    ids = np.concatenate([train[0], oof[0]])
    emb = np.concatenate([train[1], oof[1]])
    fitted, te = reduce_embeddings((ids, emb), test, dim, prefix=prefix, seed=seed)
    return fitted.iloc[: len(train[0])].reset_index(drop=True), fitted.iloc[len(train[0]) :].reset_index(drop=True), te


def run_second_place(
    meta: pd.DataFrame,
    folds: pd.DataFrame,
    inputs: dict[int, InSampleInputs],
    scfg: StackConfig,
    source_names: list[str] | None = None,
    progress: bool = True,
) -> StackResult:
    """Fit the 2nd-place layout (module docstring): OOF = fold k predicted by second stage k, test = mean over k.

    Fold model k's training rows are restricted to images of the other folds, so second stage k never trains on a
    label of fold k whatever the caller passes. Images without a series keep their first-stage prediction. Runs on
    `stack.threads` torch threads, like `run_stacking`."""
    with torch_threads(scfg.threads):
        return _run(meta, folds, inputs, scfg, source_names, progress)


def _rows(frames: list[pd.DataFrame], extra: pd.DataFrame | None, columns: list[str] | None, keep: set | None):
    """Merged sources (+ extras, reindexed to the training set's columns) restricted to `keep` image ids."""
    if extra is not None and columns is not None:
        extra = extra.reindex(columns=["image_id", *columns])
    merged, n_models = merge_sources(frames, extra)
    if keep is not None:
        merged = merged[merged["image_id"].isin(keep)].reset_index(drop=True)
    return merged, n_models


def _run(
    meta: pd.DataFrame,
    folds: pd.DataFrame,
    inputs: dict[int, InSampleInputs],
    scfg: StackConfig,
    source_names: list[str] | None,
    progress: bool,
) -> StackResult:
    outer = sorted(inputs)
    if len(outer) < 2:
        raise ValueError(f"the second_place layout needs at least 2 fold models, got {outer}")
    series_cols = [c for c in ("image_id", "series_id", "slice_rank", "z", "series_len") if c in meta.columns]
    place = meta[series_cols].drop_duplicates("image_id")
    lab = folds[["image_id", "fold", *LABEL_COLS]].drop_duplicates("image_id")
    stacker = STACK_MODELS.build(scfg.model, key="stack.model")
    oof_parts, first_parts, test_preds, curves, models = [], [], [], [], {}
    seconds = {"build": 0.0, "sequence": 0.0}
    bar = tqdm(total=len(outer), desc="stack second_place", disable=not progress, leave=False)
    for k in outer:
        f = inputs[k]
        t0 = time.perf_counter()
        held = set(lab.loc[lab["fold"] == k, "image_id"])
        others = set(lab.loc[lab["fold"] != k, "image_id"])
        columns = [c for c in f.train_extra.columns if c != "image_id"] if f.train_extra is not None else None
        tr, n_models = _rows(f.train, f.train_extra, columns, others)
        train = tr.merge(lab, on="image_id", how="inner").merge(place, on="image_id", how="inner")
        ho, _ = _rows(f.oof, f.oof_extra, columns, held)
        ho_rows = ho.merge(place, on="image_id", how="inner")
        shared = set(train["series_id"]) & set(ho_rows["series_id"])
        if shared:
            raise ValueError(
                f"series {sorted(shared)[0]} has images in fold {k} and in the other folds; the second_place layout "
                f"needs series that lie in one fold (cv.split=patient)"
            )
        values, _ = _values(train, n_models)
        seqs = build_sequences(train, values, train[LABEL_COLS].to_numpy(np.float32))
        seconds["build"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        curve: list[dict] = []
        net = stacker.fit(seqs, scfg, n_models, k, curve)
        models[k] = net
        if curve:
            curves.append(pd.DataFrame(curve).assign(fold=k))

        def predict(rows: pd.DataFrame, merged: pd.DataFrame) -> np.ndarray:
            """Rows of `merged` in order: the net where the image has a series, else the first-stage mean."""
            _, out = _values(merged, n_models)
            if len(rows):
                v, _ = _values(rows, n_models)
                s = build_sequences(rows, v)
                pos = pd.Index(merged["image_id"]).get_indexer(rows["image_id"])
                out[pos] = s.scatter(stacker.predict(net, s, scfg), len(rows))
            return out

        oof_parts.append(_wide(ho["image_id"].to_numpy(), predict(ho_rows, ho)))
        first_parts.append(_wide(ho["image_id"].to_numpy(), _values(ho, n_models)[1]))
        te, _ = _rows(f.test, f.test_extra, columns, None)
        test_preds.append(_wide(te["image_id"].to_numpy(), predict(te.merge(place, on="image_id", how="inner"), te)))
        seconds["sequence"] += time.perf_counter() - t0
        bar.update(1)
    bar.close()

    first = pd.concat(first_parts, ignore_index=True)
    stacked = pd.concat(oof_parts, ignore_index=True)
    ids = test_preds[0]["image_id"]
    test = _wide(
        ids.to_numpy(),
        np.mean([t.set_index("image_id").loc[ids, LABEL_COLS].to_numpy(np.float64) for t in test_preds], axis=0),
    )
    scored = first[["image_id"]].merge(lab, on="image_id", how="inner")
    y = scored[LABEL_COLS].to_numpy(np.float64)

    def at(frame: pd.DataFrame) -> np.ndarray:
        return frame.set_index("image_id").loc[scored["image_id"], LABEL_COLS].to_numpy(np.float64)

    rows = [score_row("first_stage", y, at(first))]
    n_models = len(inputs[outer[0]].oof)
    if n_models > 1:
        names = source_names or [f"source{m}" for m in range(n_models)]
        for m in range(n_models):
            src = pd.concat([inputs[k].oof[m] for k in outer], ignore_index=True).drop_duplicates("image_id")
            rows.append(score_row(f"first_stage:{names[m]}", y, at(src)))
    rows.append(score_row("stacked", y, at(stacked)))
    curve = pd.concat(curves, ignore_index=True)[CURVE_COLUMNS] if curves else pd.DataFrame(columns=CURVE_COLUMNS)
    return StackResult(first, stacked, test, pd.DataFrame(rows), curve, seconds, models)
