"""Stacking as a pure function of DataFrames: first-stage predictions + meta + folds -> stacked predictions + metrics.

Images the stacker cannot place in a series (missing from the meta table) keep their first-stage prediction, so the
outputs always cover every input image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..core.labels import LABELS
from ..core import metrics
from ..core.config import StackConfig
from ..core.registry import STACK_MODELS
from .fit import CrossFit, cross_fit, torch_threads
from .sequences import N_LABELS, Sequences, build_sequences, logit

LABEL_COLS = list(LABELS)
CURVE_COLUMNS = ["fold", "step", "epoch", "train_loss", "val_loss", "stop"]


@dataclass
class StackResult:
    first_oof: pd.DataFrame  # mean of the first-stage sources
    oof: pd.DataFrame  # the configured model (StackConfig.model)
    test: pd.DataFrame
    metrics: pd.DataFrame  # stage, weighted_log_loss, one column per label
    curve: pd.DataFrame = field(default_factory=pd.DataFrame)  # fold, step, epoch, train_loss, val_loss (inner split)
    seconds: dict[str, float] = field(default_factory=dict)
    models: dict[int, object] = field(default_factory=dict)  # the configured model fitted per fold (`stack.saved`)


def merge_sources(frames: list[pd.DataFrame], extra: pd.DataFrame | None = None) -> tuple[pd.DataFrame, int]:
    """Inner-join several wide prediction frames on image_id: image_id, p{m}_{label}..., [x_<extra column>...]."""
    merged = None
    for m, frame in enumerate(frames):
        missing = [c for c in ["image_id", *LABEL_COLS] if c not in frame.columns]
        if missing:
            raise ValueError(f"prediction frame {m} lacks columns {missing}")
        part = frame[["image_id", *LABEL_COLS]].drop_duplicates("image_id")
        part = part.rename(columns={c: f"p{m}_{c}" for c in LABEL_COLS})
        merged = part if merged is None else merged.merge(part, on="image_id", how="inner")
    if extra is not None:
        extra = extra.rename(columns={c: f"x_{c}" for c in extra.columns if c != "image_id"})
        merged = merged.merge(extra.drop_duplicates("image_id"), on="image_id", how="left")
    return merged.reset_index(drop=True), len(frames)


def _values(merged: pd.DataFrame, n_models: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 6*M [+E]) network inputs (logits, extra columns) and (N, 6) mean first-stage probabilities."""
    prob_cols = [f"p{m}_{c}" for m in range(n_models) for c in LABEL_COLS]
    probs = merged[prob_cols].to_numpy(np.float64)
    extra_cols = [c for c in merged.columns if c.startswith("x_")]
    values = logit(probs)
    if extra_cols:
        values = np.concatenate([values, np.nan_to_num(merged[extra_cols].to_numpy(np.float32))], axis=1)
    mean = probs.reshape(len(merged), n_models, N_LABELS).mean(axis=1)
    return values, mean


def _wide(ids: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(np.clip(probs, 0.0, 1.0).astype(np.float64), columns=LABEL_COLS)
    frame.insert(0, "image_id", ids)
    return frame


def score_row(stage: str, y: np.ndarray, p: np.ndarray) -> dict:
    return {"stage": stage, "weighted_log_loss": metrics.weighted_log_loss(y, p), **metrics.per_label_log_loss(y, p)}


def run_stacking(
    meta: pd.DataFrame,
    folds: pd.DataFrame,
    oof_frames: list[pd.DataFrame],
    test_frames: list[pd.DataFrame],
    scfg: StackConfig,
    oof_extra: pd.DataFrame | None = None,
    test_extra: pd.DataFrame | None = None,
    source_names: list[str] | None = None,
    progress: bool = True,
) -> StackResult:
    """Fit the configured sequence model fold by fold; score it against the first stage.

    Runs on `stack.threads` torch threads (`fit.torch_threads`)."""
    with torch_threads(scfg.threads):
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        inp = _inputs(meta, folds, oof_frames, test_frames, oof_extra, test_extra)
        seconds["build"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fitted, curves = _fit_folds(inp, scfg, progress)
        seconds["sequence"] = time.perf_counter() - t0
        oof_mean, stacked_oof, stacked_test, test_ids = _to_rows(inp, fitted)
        ids = inp.oof["image_id"].to_numpy()
        curve = pd.DataFrame(
            [{"fold": f, **row} for f, rows in sorted(curves.items()) for row in rows], columns=CURVE_COLUMNS
        )
        return StackResult(
            _wide(ids, oof_mean),
            _wide(ids, stacked_oof),
            _wide(test_ids, stacked_test),
            _scores(inp, oof_mean, stacked_oof, source_names),
            curve,
            seconds,
            fitted.models,
        )


@dataclass
class _Inputs:
    """The merged first-stage frames and their padded series: what one stacking run fits and predicts."""

    oof: pd.DataFrame  # every OOF image: image_id, p{m}_{label}..., [x_...]
    n_models: int
    lab: pd.DataFrame  # image_id, fold, labels
    train: pd.DataFrame  # the OOF images with a label and a place in a series
    tr_seqs: Sequences
    test: pd.DataFrame | None  # every test image (None without test frames)
    test_rows: pd.DataFrame  # the test images with a place in a series
    te_seqs: Sequences | None


def _inputs(
    meta: pd.DataFrame,
    folds: pd.DataFrame,
    oof_frames: list[pd.DataFrame],
    test_frames: list[pd.DataFrame],
    oof_extra: pd.DataFrame | None,
    test_extra: pd.DataFrame | None,
) -> _Inputs:
    series_cols = [c for c in ("image_id", "series_id", "slice_rank", "z", "series_len") if c in meta.columns]
    place = meta[series_cols].drop_duplicates("image_id")
    oof, n_models = merge_sources(oof_frames, oof_extra)
    lab = folds[["image_id", "fold", *LABEL_COLS]].drop_duplicates("image_id")
    train = oof.merge(lab, on="image_id", how="inner").merge(place, on="image_id", how="inner")
    values, _ = _values(train, n_models)
    tr_seqs = build_sequences(train, values, train[LABEL_COLS].to_numpy(np.float32), train["fold"].to_numpy())
    test, _ = merge_sources(test_frames, test_extra) if test_frames else (None, 0)
    te_seqs: Sequences | None = None
    test_rows = pd.DataFrame()
    if test is not None and len(test):
        test_rows = test.merge(place, on="image_id", how="inner")
        if len(test_rows):
            te_seqs = build_sequences(test_rows, _values(test_rows, n_models)[0])
    return _Inputs(oof, n_models, lab, train, tr_seqs, test, test_rows, te_seqs)


def _fit_folds(inp: _Inputs, scfg: StackConfig, progress: bool) -> tuple[CrossFit, dict[int, list[dict]]]:
    """The configured stack model cross-fitted over the folds; each fold's validation curve."""
    n_folds = len(np.unique(inp.tr_seqs.slots[inp.tr_seqs.mask])) if inp.tr_seqs.slots is not None else 0
    stacker = STACK_MODELS.build(scfg.model, key="stack.model")
    curves: dict[int, list[dict]] = {}
    with tqdm(total=n_folds, desc="stack", disable=not progress, leave=False) as bar:
        fitted = cross_fit(
            inp.tr_seqs,
            inp.te_seqs,
            lambda s, f: stacker.fit(s, scfg, inp.n_models, f, curves.setdefault(f, [])),
            lambda m, s: stacker.predict(m, s, scfg),
            progress=lambda _msg: bar.update(1),
        )
    return fitted, curves


def _to_rows(inp: _Inputs, fitted: CrossFit) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(OOF first-stage mean, stacked OOF, stacked test, test ids) row by row; images without a series keep the
    first stage."""
    _, oof_mean = _values(inp.oof, inp.n_models)
    stacked_oof = oof_mean.copy()
    stacked_oof[pd.Index(inp.oof["image_id"]).get_indexer(inp.train["image_id"])] = inp.tr_seqs.scatter(
        fitted.oof, len(inp.train)
    )
    if inp.test is None:
        return oof_mean, stacked_oof, np.zeros((0, N_LABELS)), np.array([], dtype=object)
    _, stacked_test = _values(inp.test, inp.n_models)
    if inp.te_seqs is not None:
        tpos = pd.Index(inp.test["image_id"]).get_indexer(inp.test_rows["image_id"])
        stacked_test[tpos] = inp.te_seqs.scatter(fitted.test, len(inp.test_rows))
    return oof_mean, stacked_oof, stacked_test, inp.test["image_id"].to_numpy()


def _scores(
    inp: _Inputs, oof_mean: np.ndarray, stacked_oof: np.ndarray, source_names: list[str] | None
) -> pd.DataFrame:
    """The first stage, each source and the stack, on every labelled OOF image (those without a series count with
    their first-stage value)."""
    scored = inp.oof.merge(inp.lab, on="image_id", how="inner")
    spos = pd.Index(inp.oof["image_id"]).get_indexer(scored["image_id"])
    y = scored[LABEL_COLS].to_numpy(np.float64)
    rows = [score_row("first_stage", y, oof_mean[spos])]
    if inp.n_models > 1:
        names = source_names or [f"source{m}" for m in range(inp.n_models)]
        for m in range(inp.n_models):
            p = inp.oof[[f"p{m}_{c}" for c in LABEL_COLS]].to_numpy(np.float64)[spos]
            rows.append(score_row(f"first_stage:{names[m]}", y, p))
    rows.append(score_row("stacked", y, stacked_oof[spos]))
    return pd.DataFrame(rows)


@dataclass
class FoldInputs:
    """What fold model k (of every source) produced: its held-out fold's OOF predictions and embedding features, and
    its own test predictions and embedding features (projected by the PCA fitted on those two alone)."""

    oof: list[pd.DataFrame]  # one frame per source: fold k's held-out images
    test: list[pd.DataFrame]  # one frame per source: fold model k on the test images
    oof_extra: pd.DataFrame | None = None
    test_extra: pd.DataFrame | None = None


def run_per_fold(
    meta: pd.DataFrame,
    folds: pd.DataFrame,
    per_fold: dict[int, FoldInputs],
    scfg: StackConfig,
    source_names: list[str] | None = None,
    progress: bool = True,
) -> StackResult:
    """`stack.embedding_space: per_fold`: one second stage per first-stage fold model, in that model's own feature
    space.

    Why: an embedding is a point in the space of the fold model that made it. Five separately fine-tuned models
    have five spaces; the mixture design trains on OOF embeddings (each image from the one model that did not see
    it, i.e. a mixture of five spaces) and predicts on the element-wise mean of the five test embeddings (a sixth,
    averaged space) after one PCA over both. Here nothing is mixed:

    - second stage k sees only fold model k's outputs: the OOF predictions and embeddings of fold k's held-out
      images to train on (the only images model k did not see), model k's own test predictions and embeddings to
      predict; the PCA of its embeddings is fitted on those two sets alone (no labels, as in the mixture);
    - fold k's series are split again, patient-grouped and balanced on the rare labels (`data.folds.assign_folds`,
      as many inner folds as outer ones, fewer when a fold has fewer patients), and `run_stacking` cross-fits over
      that inner split exactly as the one stacker does over the outer folds (inner validation split for stopping
      included). Every training image
      thus gets an honest OOF prediction: from an inner model that saw neither its label nor, through the features,
      any model that trained on it. Those OOF predictions are what submit's choice-by-OOF compares;
    - the test prediction of second stage k is the mean of its inner models; the submitted test prediction is the
      mean over the fold models k.

    The price: each second stage trains on 1/k of the training series (x (k-1)/k for the inner fit), and the
    whole costs about as many optimizer steps as the mixture (k x k nets on 1/k^2-sized data each).
    """
    outer = sorted(per_fold)
    if len(outer) < 2:
        raise ValueError(f"stacking needs out-of-fold predictions from at least 2 folds, got {outer}")
    results: dict[int, StackResult] = {}
    for k in outer:
        f = per_fold[k]
        inner = _inner_folds(folds, k, len(outer), scfg.seed)
        results[k] = run_stacking(meta, inner, f.oof, f.test, scfg, f.oof_extra, f.test_extra, source_names, progress)
    first = pd.concat([results[k].first_oof for k in outer], ignore_index=True)
    stacked = pd.concat([results[k].oof for k in outer], ignore_index=True)
    sources = [
        pd.concat([per_fold[k].oof[m] for k in outer], ignore_index=True) for m in range(len(per_fold[outer[0]].oof))
    ]
    return StackResult(
        first,
        stacked,
        _mean_of([results[k].test for k in outer]),
        _per_fold_scores(folds, first, stacked, sources, source_names),
        _per_fold_curve(results),
        _summed_seconds(results),
        {k: results[k].models for k in outer},  # per fold model: its inner nets (saved: `stack.saved`)
    )


def _inner_folds(folds: pd.DataFrame, k: int, n_outer: int, seed: int) -> pd.DataFrame:
    """Fold k's rows with their inner fold: patient-grouped, balanced on the rare labels (`data.folds.assign_folds`),
    as many inner folds as outer ones, fewer when the fold has fewer patients (at least 2)."""
    from ..data.folds import assign_folds

    rows = folds[folds["fold"] == k]
    n_inner = min(n_outer, rows["patient_id"].nunique())
    if n_inner < 2:
        raise ValueError(f"fold {k} holds {n_inner} patient(s); per_fold stacking splits each fold in at least 2")
    return rows.assign(fold=assign_folds(rows, k=n_inner, seed=seed + k).to_numpy())


def _mean_of(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The element-wise mean of wide prediction frames, in the first frame's image order."""
    ids = frames[0]["image_id"]
    values = np.mean([fr.set_index("image_id").loc[ids, LABEL_COLS].to_numpy(np.float64) for fr in frames], axis=0)
    return _wide(ids.to_numpy(), values)


def _per_fold_scores(
    folds: pd.DataFrame,
    first: pd.DataFrame,
    stacked: pd.DataFrame,
    sources: list[pd.DataFrame],
    source_names: list[str] | None,
) -> pd.DataFrame:
    """The first stage, each source (its fold models' OOF predictions) and the stack on the labelled OOF images."""
    lab = folds[["image_id", *LABEL_COLS]].drop_duplicates("image_id")
    scored = first[["image_id"]].merge(lab, on="image_id", how="inner")
    y = scored[LABEL_COLS].to_numpy(np.float64)

    def at(frame: pd.DataFrame) -> np.ndarray:
        return (
            frame.drop_duplicates("image_id")
            .set_index("image_id")
            .loc[scored["image_id"], LABEL_COLS]
            .to_numpy(np.float64)
        )

    rows = [score_row("first_stage", y, at(first))]
    if len(sources) > 1:
        names = source_names or [f"source{m}" for m in range(len(sources))]
        rows += [score_row(f"first_stage:{names[m]}", y, at(src)) for m, src in enumerate(sources)]
    rows.append(score_row("stacked", y, at(stacked)))
    return pd.DataFrame(rows)


def _per_fold_curve(results: dict[int, StackResult]) -> pd.DataFrame:
    """Every inner net's curve, its fold named `<outer>/<inner>`."""
    curves = [
        r.curve.assign(fold=[f"{k}/{i}" for i in r.curve["fold"]]) for k, r in sorted(results.items()) if len(r.curve)
    ]
    return pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=CURVE_COLUMNS)


def _summed_seconds(results: dict[int, StackResult]) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for r in results.values():
        for key, v in r.seconds.items():
            seconds[key] = seconds.get(key, 0.0) + v
    return seconds
