"""`make stack`: a second-stage sequence model over each series' slices, trained on the first stage's OOF predictions.

Reads `runs/<cfg>/predictions/{oof,test}.csv` (and `*_embeddings.npz` with stack.use_embeddings; each fold model's
`{oof,test}_fold<k>*` with stack.embedding_space=per_fold) of one or several first-stage models, the meta table and
the folds the first stage used (`data.folds.fold_table`: cv.split, cv.folds); writes
`runs/<cfg>/stack/{oof,test,metrics}.csv`. Extra first-stage models: `--set stack.sources=[dir,...]` (prediction
folders or run folders). The array code lives in the other modules of `ich_kaggle.stack`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.labels import LABELS
from ..core.config import Config, StackConfig
from ..core.errors import UserError, fix
from ..core.io import write_csv
from ..core import ensemble, freshness, manifest
from ..core.layout import Layout, Predictions, Run, Stacked

log = logging.getLogger(__name__)

LABEL_COLS = list(LABELS)


def prediction_dirs(
    cfg: Config, runs: str | Path = "runs", sources: list[str | Path] | None = None
) -> list[Predictions]:
    """The first-stage prediction folders to stack: given, `stack.sources`, an ensemble's members, or the config's
    own."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if sources:
        return Run.of(runs, cfg.name).prediction_sources([str(s) for s in sources])
    return ensemble.stack_sources(cfg, runs)


def read_predictions(path: Path, config_name: str) -> pd.DataFrame:
    if not path.exists():
        raise UserError(f"{path} not found; run `make predict CONFIG={config_name}` first")
    frame = pd.read_csv(path)
    missing = [c for c in ["image_id", *LABEL_COLS] if c not in frame.columns]
    if missing:
        raise UserError(
            f"{path}: missing columns {missing}; expected image_id + {', '.join(LABEL_COLS)} (rerun predict)"
        )
    values = frame[LABEL_COLS].to_numpy(np.float64)
    if not np.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise UserError(f"{path}: probabilities must be finite and in [0, 1]; rerun predict")
    return frame


def read_embeddings(path: Path, config_name: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise UserError(f"{path} not found; run `make predict CONFIG={config_name}` or set stack.use_embeddings=false")
    with np.load(path, allow_pickle=False) as z:
        if "image_id" not in z or "emb" not in z:
            raise UserError(f"{path}: expected arrays image_id and emb; rerun predict")
        return z["image_id"].astype(str), z["emb"].astype(np.float32)


def reduce_embeddings(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    dim: int,
    prefix: str,
    seed: int = 0,
    fit_rows: int = 50_000,
    fitted: list | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Project embeddings on their first `dim` principal components (fitted without labels), scaled to unit variance
    (`stack.reduction`); the fitted projection is appended to `fitted` when given (saved with the stack).

    Full 1-2k-dimensional embeddings of 750k slices would not fit in memory as padded series; a few components carry
    what the sequence model can use.
    """
    from .reduction import fit_reduction

    red = fit_reduction(train[1], test[1], dim, seed=seed, fit_rows=fit_rows)
    if fitted is not None:
        fitted.append(red)
    return red.frame(*train, prefix), red.frame(*test, prefix)


def _extras(
    dirs: list[Predictions], scfg: StackConfig, name: str, fitted: list | None = None
) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """stack.embedding_space=mixture: every source's embeddings, reduced (each reduction appended to `fitted`)."""
    if not scfg.use_embeddings:
        return None, None
    oof_parts, test_parts = [], []
    for m, d in enumerate(dirs):
        oof_e = read_embeddings(d.oof_embeddings, name)
        test_e = read_embeddings(d.test_embeddings, name)
        o, t = reduce_embeddings(oof_e, test_e, scfg.embedding_dim, prefix=f"m{m}", seed=scfg.seed, fitted=fitted)
        oof_parts.append(o.set_index("image_id"))
        test_parts.append(t.set_index("image_id"))
    return (
        pd.concat(oof_parts, axis=1, join="outer").reset_index(),
        pd.concat(test_parts, axis=1, join="outer").reset_index(),
    )


def _per_fold_inputs(
    dirs: list[Predictions], scfg: StackConfig, name: str, folds: list[int], fitted: dict | None = None
) -> dict:
    """stack.embedding_space=per_fold: per fold model k, every source's fold-k OOF and test predictions and its
    embeddings, projected by a PCA fitted on fold model k's own embeddings (see `pipeline.run_per_fold`); the
    reductions, one per source, go to `fitted[k]` when given."""
    from .pipeline import FoldInputs

    out = {}
    for k in folds:
        oof, test, oof_x, test_x = [], [], [], []
        for m, d in enumerate(dirs):
            for path in (d.oof_fold(k), d.test_fold(k), d.oof_fold_embeddings(k), d.test_fold_embeddings(k)):
                if not path.exists():
                    raise UserError(
                        f"{path} not found: stack.embedding_space=per_fold reads each fold model's own "
                        f"predictions (`make predict CONFIG={name}` writes them; an ensemble's combined "
                        f"predictions have none, stack its members), or use stack.embedding_space=mixture"
                    )
            oof.append(read_predictions(d.oof_fold(k), name))
            test.append(read_predictions(d.test_fold(k), name))
            o, t = reduce_embeddings(
                read_embeddings(d.oof_fold_embeddings(k), name),
                read_embeddings(d.test_fold_embeddings(k), name),
                scfg.embedding_dim,
                prefix=f"m{m}",
                seed=scfg.seed,
                fitted=None if fitted is None else fitted.setdefault(k, []),
            )
            oof_x.append(o.set_index("image_id"))
            test_x.append(t.set_index("image_id"))
        out[k] = FoldInputs(
            oof,
            test,
            pd.concat(oof_x, axis=1, join="outer").reset_index(),
            pd.concat(test_x, axis=1, join="outer").reset_index(),
        )
    return out


def format_table(table: pd.DataFrame, model: str) -> str:
    head = f"{'stage':<28}{'weighted':>10}" + "".join(f"{c[:10]:>11}" for c in LABEL_COLS)
    lines = [f"OOF weighted log loss (second stage: {model})", head]
    for _, r in table.iterrows():
        lines.append(f"{r['stage']:<28}{r['weighted_log_loss']:>10.5f}" + "".join(f"{r[c]:>11.5f}" for c in LABEL_COLS))
    return "\n".join(lines)


def prior_loss(folds: pd.DataFrame, first_oof: pd.DataFrame) -> float | None:
    """The weighted log loss of the constant label prior (the labels' mean) on the labelled OOF images: the floor
    every stage must beat."""
    from ..core import metrics

    rows = folds[folds["image_id"].isin(set(first_oof["image_id"]))]
    return metrics.prior_log_loss(rows, rows) if len(rows) else None


def check_sources(dirs: list[Predictions], config_name: str) -> None:
    """One line when a first-stage file was cut short or edited, or what made it changed (a fold retrained, a member
    predicted again): the stack is never fitted on, nor reused over, predictions that `submit` would refuse."""
    for d in dirs:
        for f in (d.oof, d.test):
            if manifest.read(f) is not None and (reason := freshness.chain_reason(f)):
                raise UserError(f"{f} is stale ({reason}); run `make predict CONFIG={config_name}` first")


def embedding_config(cfg: Config) -> Config:
    """The config of the embedding-level second stage fitted beside the probability one (`stack.embedding_stage`)."""
    import dataclasses

    return dataclasses.replace(cfg, stack=cfg.stack.embedding_level())


def stack(
    cfg: Config,
    layout: Layout,
    runs: str | Path = "runs",
    sources: list[str | Path] | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Stack the first-stage predictions fold by fold; returns `runs/<cfg>/stack/`.

    With `stack.embedding_stage` (and not `stack.use_embeddings`) the embedding-level second stage is fitted too,
    into `runs/<cfg>/stack_embeddings/`, on the same sources: `submit` chooses among them by OOF."""
    run = Run.of(runs, cfg.name)
    out = _stack_one(cfg, layout, runs, sources, progress, force, run.stack)
    if cfg.stack.embedding_stage and not cfg.stack.use_embeddings:
        _stack_one(embedding_config(cfg), layout, runs, sources, progress, force, run.embedding_stack)
    return out


def _stack_one(
    cfg: Config,
    layout: Layout,
    runs: str | Path,
    sources: list[str | Path] | None,
    progress: bool,
    force: bool,
    out: Stacked,
) -> Path:
    """One second stage (probability- or embedding-level, as cfg.stack says) into `out`."""
    from . import saved

    per_fold = cfg.stack.use_embeddings and cfg.stack.embedding_space == "per_fold"
    if per_fold and cfg.cv.split == "random":
        raise UserError(
            "stack.embedding_space=per_fold needs cv.split=patient (under a random split a fold model's "
            "held-out images are scattered slices, not whole series); use stack.embedding_space=mixture"
        )
    dirs = prediction_dirs(cfg, runs, sources)
    if not sources and not cfg.is_ensemble:
        from ..data import trained

        trained.check(cfg, layout, runs)
    check_sources(dirs, cfg.name)
    expected = freshness.stacked(dirs, layout, cfg.stack, cfg.cv)
    keep = saved.savable(cfg.stack) is None  # the fitted models are saved for the bundle (`stack.saved`)
    if not force and _up_to_date(out, expected, keep):
        log.info(f"stack: {out.test} is up to date (same first-stage files, folds and settings); reusing")
        return out.dir
    result, folds, fitted = _fit(cfg, layout, dirs, per_fold, progress)
    _write(result, out, expected, cfg.stack if keep else None, len(dirs), fitted)
    _report(result, folds, cfg.stack, out)
    return out.dir


def _up_to_date(out: Stacked, expected: dict, keep: bool) -> bool:
    """Every output exists and was made from the expected inputs (the saved models too where they are kept)."""
    return (
        all(p.exists() for p in (out.oof, out.metrics))
        and (not keep or freshness.stale_reason(out.models, expected) is None)
        and freshness.stale_reason(out.test, expected) is None
    )


def _fit(cfg: Config, layout: Layout, dirs: list[Predictions], per_fold: bool, progress: bool):
    """Read the first-stage files, the meta table and the first stage's folds; fit. Returns (StackResult, folds, the
    embeddings' fitted reductions: a list per source, or per fold model with per_fold)."""
    from ..core.config import selected_folds
    from ..data.folds import fold_table
    from ..data.meta import load_meta
    from .pipeline import run_per_fold, run_stacking

    oof = [read_predictions(d.oof, cfg.name) for d in dirs]
    test = [read_predictions(d.test, cfg.name) for d in dirs]
    fold_ids = selected_folds(cfg.cv)
    fitted: dict | list = {} if per_fold else []  # the embeddings' reductions, saved with the models
    inputs = _per_fold_inputs(dirs, cfg.stack, cfg.name, fold_ids, fitted) if per_fold else None
    oof_x, test_x = (None, None) if per_fold else _extras(dirs, cfg.stack, cfg.name, fitted)
    meta = load_meta(layout)
    # the folds the first-stage OOF came from (cv.split, cv.folds): the stacker's folds are the same, image by image
    folds = fold_table(layout, cfg.cv)
    folds = folds[folds["fold"].isin(fold_ids)]
    known = set(folds["image_id"])
    if not any(f["image_id"].isin(known).any() for f in oof):
        raise UserError(
            f"{dirs[0].oof}: no image is in {layout.folds_csv}; predictions and folds come from "
            f"different data folders (pass the same {fix('--data', 'DATA_DIR=')} to predict and stack)"
        )
    names = [d.dir.parent.name if d.dir.name == "predictions" else d.dir.name for d in dirs]
    try:
        if per_fold:
            result = run_per_fold(meta, folds, inputs, cfg.stack, source_names=names, progress=progress)
        else:
            result = run_stacking(
                meta, folds, oof, test, cfg.stack, oof_x, test_x, source_names=names, progress=progress
            )
    except ValueError as e:  # only data problems reach here: fewer than 2 folds
        raise UserError(
            f"{layout.folds_csv}: {e}; rebuild with `make folds` and train/predict at least 2 folds"
        ) from None
    return result, folds, fitted


def _write(result, out: Stacked, expected: dict, keep: StackConfig | None, n_sources: int, fitted: dict | list) -> None:
    """The stage's files, the manifests last (out.test's is what submit checks); the fitted models (with the
    embeddings' reductions) when `keep` (the stack settings they were fitted with) is given."""
    from . import saved

    write_csv(result.oof, out.oof)
    write_csv(result.test, out.test)
    write_csv(result.metrics, out.metrics)
    write_csv(result.curve, out.curve)
    if keep is not None and result.models:
        saved.save(out.models, result.models, keep, n_sources, fitted or None)
        manifest.write(out.models, expected)
    else:
        out.models.unlink(missing_ok=True)
    manifest.write(out.oof, expected)
    manifest.write(out.test, expected)  # last: what submit checks


def _report(result, folds: pd.DataFrame, scfg: StackConfig, out: Stacked) -> None:
    """Log the score table, what the stack did not beat, and what stopped the nets."""
    space = f", embeddings {scfg.embedding_space}" if scfg.use_embeddings else ""
    log.info(format_table(result.metrics, scfg.model + space))
    losses = result.metrics.set_index("stage")["weighted_log_loss"]
    prior = prior_loss(folds, result.first_oof)
    if losses["stacked"] >= losses["first_stage"]:
        log.info(
            f"note: stacking did not improve the OOF loss ({losses['stacked']:.5f} >= {losses['first_stage']:.5f}); "
            f"`make submit` will choose the first stage by its OOF score"
        )
    if prior is not None and losses["stacked"] >= prior:
        log.info(
            f"note: the stack ({losses['stacked']:.5f}) is no better than the constant label prior ({prior:.5f}) "
            f"out of fold: the first-stage outputs carry little that transfers between folds"
        )
    if len(result.curve):
        last = result.curve.groupby("fold")["step"].max()
        best = result.curve.loc[result.curve.groupby("fold")["val_loss"].idxmin(), "step"]
        stops = result.curve["stop"][result.curve["stop"].astype(str) != ""].value_counts().to_dict()
        log.info(
            f"stack: nets stopped by {stops} after {last.tolist()} steps per fold "
            f"(best at {best.tolist()}; curve in {out.curve})"
        )
    log.info(f"wrote {out.oof} ({len(result.oof)} rows), {out.test} ({len(result.test)} rows), {out.metrics}")
