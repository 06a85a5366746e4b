"""The fitted second stage, saved per fold, and applied to new series (`infer` through the model bundle).

`make stack` cross-fits one model per fold and predicts the test series with the mean of the fold models; `save`
keeps what that test path needs (`runs/<cfg>/stack/models.pt`, `stack_embeddings/models.pt`), and `apply` repeats
it on any first-stage outputs, so on the competition's test set it gives `test.csv` again. Three layouts, as the
stack was fitted (`stack.use_embeddings`, `stack.embedding_space`):

- `probs`: one sequence net per fold (its shape and weights) over each source's fold-averaged logits and the
  position features;
- `mixture`: the same, plus each source's fold-averaged embeddings reduced by the principal components the stack
  fitted (`stack.reduction`; kept here, so new slices are projected into the space the nets were trained in);
- `per_fold`: per first-stage fold model k, the inner models fitted on fold k's held-out series and, per source,
  the stack's reduction of that fold model's compact embeddings (the projection `predict` fitted on its OOF
  embeddings, `predictions/oof_fold<k>_pca.npz`, belongs to the fold model: the bundle keeps it beside the fold's
  weights and `infer` applies it first); the prediction is the mean over k of each fold model's stage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.config import StackConfig
from ..core.errors import UserError
from ..core.io import atomic_path
from ..core.labels import LABELS
from .fit import predict_net
from .nets import SequenceNet
from .pipeline import _values, merge_sources
from .reduction import Reduction
from .sequences import build_sequences

FORMAT = 2  # 1: probability-level only (read as layout probs)
LAYOUTS = ("probs", "mixture", "per_fold")


def savable(scfg: StackConfig) -> str | None:
    """Why the second stage of these settings cannot be saved for new images, or None (every layout can now)."""
    return None


def layout_of(scfg: StackConfig) -> str:
    if not scfg.use_embeddings:
        return "probs"
    return "per_fold" if scfg.embedding_space == "per_fold" else "mixture"


def _model_entry(m: object) -> dict:
    if isinstance(m, SequenceNet):
        return {
            "type": "net",
            "state": {n: t.detach().cpu() for n, t in m.state_dict().items()},
            "n_features": int(m.inp[0].in_features),
        }
    raise TypeError(f"cannot save a second-stage model of type {type(m).__name__}")


def save(
    path: Path,
    models: dict[int, object],
    scfg: StackConfig,
    n_models: int,
    reductions: list[Reduction] | dict[int, list[Reduction]] | None = None,
) -> Path:
    """Save the fitted stage. probs: `models` {fold: model}; mixture: the same and `reductions` [per source];
    per_fold: `models` {fold model k: {inner fold: model}} and `reductions` {k: [per source]}."""
    layout = layout_of(scfg)
    payload: dict = {"format": FORMAT, "layout": layout, "stack": dataclasses.asdict(scfg), "n_models": int(n_models)}
    if layout == "per_fold":
        if not isinstance(reductions, dict):
            raise ValueError("a per_fold stage is saved with its reductions")
        payload["outer"] = {
            int(k): {
                "folds": {int(i): _model_entry(m) for i, m in inner.items()},
                "reductions": [r.arrays() for r in reductions[k]],
            }
            for k, inner in models.items()
        }
    else:
        payload["folds"] = {int(k): _model_entry(m) for k, m in models.items()}
        if layout == "mixture":
            if not isinstance(reductions, list):
                raise ValueError("a mixture stage is saved with its reductions")
            payload["reductions"] = [r.arrays() for r in reductions]
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


@dataclasses.dataclass
class FoldStack:
    """per_fold: the second stage of one first-stage fold model."""

    models: dict[int, object]
    reductions: list[Reduction]  # per source: the stack's components of the fold model's compact embeddings


@dataclasses.dataclass
class SavedStack:
    scfg: StackConfig
    n_models: int
    models: dict[int, object]  # probs, mixture: per fold
    layout: str = "probs"
    reductions: list[Reduction] | None = None  # mixture: per source
    per_fold: dict[int, FoldStack] | None = None  # per_fold: per first-stage fold model

    @property
    def needs_embeddings(self) -> bool:
        return self.layout != "probs"

    @property
    def fold_models(self) -> list[int]:
        """per_fold: the first-stage folds whose own predictions and embeddings it reads."""
        return sorted(self.per_fold) if self.per_fold else []


def _load_model(path: Path, k: int, entry: dict, scfg: StackConfig, n_models: int) -> SequenceNet:
    if entry.get("type") != "net":
        kind = entry.get("type")
        raise UserError(f"{path}: fold {k} holds a second-stage model of type {kind!r}; rerun `make stack FORCE=1`")
    net = SequenceNet(
        entry["n_features"],
        n_models,
        kind=scfg.model,
        hidden=scfg.hidden,
        layers=scfg.layers,
        dropout=scfg.dropout,
        skip_k=scfg.neighbors_k,
    )
    net.load_state_dict(entry["state"])
    return net.eval()


def load(path: Path) -> SavedStack:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: unreadable second stage ({type(e).__name__}); rerun `make stack`") from None
    if not isinstance(payload, dict) or payload.get("format") not in (1, FORMAT):
        raise UserError(f"{path}: not a saved second stage of format {FORMAT}; rerun `make stack FORCE=1`")
    scfg = StackConfig(**payload["stack"])
    n_models = payload["n_models"]
    layout = payload.get("layout", "probs")
    if layout not in LAYOUTS:
        raise UserError(f"{path}: unknown second-stage layout {layout!r}; rerun `make stack FORCE=1`")
    if layout == "per_fold":
        per_fold = {
            int(k): FoldStack(
                {int(i): _load_model(path, i, e, scfg, n_models) for i, e in sorted(o["folds"].items())},
                [Reduction(**r) for r in o["reductions"]],
            )
            for k, o in sorted(payload["outer"].items())
        }
        return SavedStack(scfg, n_models, {}, layout, per_fold=per_fold)
    models = {int(k): _load_model(path, k, e, scfg, n_models) for k, e in sorted(payload["folds"].items())}
    reductions = [Reduction(**r) for r in payload["reductions"]] if layout == "mixture" else None
    return SavedStack(scfg, n_models, models, layout, reductions)


def _fitted_stage(
    models: dict[int, object],
    scfg: StackConfig,
    n_models: int,
    frames: list[pd.DataFrame],
    extra: pd.DataFrame | None,
    place: pd.DataFrame,
) -> pd.DataFrame:
    """One fitted stage on test inputs, as `pipeline.run_stacking` predicts its test series: the mean of the fold
    models over the series placed by `place`; images without a place keep the mean of the sources."""
    merged, n = merge_sources(frames, extra)
    cols = [c for c in ("image_id", "series_id", "slice_rank", "z", "series_len") if c in place.columns]
    rows = merged.merge(place[cols].drop_duplicates("image_id"), on="image_id", how="inner")
    _, mean = _values(merged, n)
    out = mean.astype(np.float64).copy()
    if len(rows):
        values, _ = _values(rows, n)
        seqs = build_sequences(rows, values)
        total = None
        for model in models.values():
            p = predict_net(model, seqs, batch_series=max(256, scfg.batch_series), reverse_tta=scfg.reverse_tta)
            total = p if total is None else total + p
        pos = pd.Index(merged["image_id"]).get_indexer(rows["image_id"])
        out[pos] = seqs.scatter(total / len(models), len(rows))
    frame = pd.DataFrame(np.clip(out, 0.0, 1.0).astype(np.float64), columns=list(LABELS))
    frame.insert(0, "image_id", merged["image_id"].to_numpy())
    return frame


def _float16(emb: np.ndarray) -> np.ndarray:
    """As `predict` stores embeddings (float16) and the stack reads them back (float32)."""
    return np.asarray(emb, dtype=np.float16).astype(np.float32)


def fold_mean_embeddings(per_fold: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """A source's test embeddings as `predict` averages them for the mixture design: each fold model's stored as
    float16, the mean over the fold models of the images every one of them has, stored as float16 again."""
    ks = sorted(per_fold)
    common = per_fold[ks[0]].index
    for k in ks[1:]:
        common = common.intersection(per_fold[k].index, sort=False)
    embs = [_float16(per_fold[k].loc[common].to_numpy()) for k in ks]
    return pd.DataFrame(_float16(np.mean(embs, axis=0)), index=common)


def apply(
    saved: SavedStack,
    frames: list[pd.DataFrame],
    place: pd.DataFrame,
    fold_probs: list[dict[int, pd.DataFrame]] | None = None,
    fold_embeddings: list[dict[int, pd.DataFrame]] | None = None,
) -> pd.DataFrame:
    """Second-stage probabilities (image_id + 6 labels) of the images of `frames` (one wide frame per source, the
    fold average, as the stack was fitted on); `place`: image_id, series_id, slice_rank, z, series_len.

    With embeddings also, per source and fold model, `fold_embeddings` (a frame indexed by image_id): mixture: the
    raw pooled embeddings `predict.stage.predict_folds` returns; per_fold: those projected by the fold model's own
    `predict.compact.Projection` (its compact embeddings), and each fold model's wide probabilities (`fold_probs`)."""
    if len(frames) != saved.n_models:
        raise UserError(f"the second stage was fitted on {saved.n_models} source(s), given {len(frames)}")
    if saved.needs_embeddings and (fold_embeddings is None or len(fold_embeddings) != saved.n_models):
        raise UserError("this second stage reads the embeddings of every source's fold models; none were given")
    if saved.layout == "probs":
        return _fitted_stage(saved.models, saved.scfg, saved.n_models, frames, None, place)
    if saved.layout == "mixture":
        parts = []
        for m, (red, embs) in enumerate(zip(saved.reductions, fold_embeddings)):
            e = fold_mean_embeddings(embs)
            parts.append(red.frame(e.index.to_numpy(), e.to_numpy(), prefix=f"m{m}").set_index("image_id"))
        extra = pd.concat(parts, axis=1, join="outer").reset_index()
        return _fitted_stage(saved.models, saved.scfg, saved.n_models, frames, extra, place)
    if fold_probs is None or len(fold_probs) != saved.n_models:
        raise UserError("this second stage reads every source's fold models' own predictions; none were given")
    outs = []
    for k, fs in saved.per_fold.items():
        missing = [m for m in range(saved.n_models) if k not in fold_probs[m] or k not in fold_embeddings[m]]
        if missing:
            raise UserError(f"the second stage reads fold model {k} of source(s) {missing}, which the bundle lacks")
        parts = []
        for m in range(saved.n_models):
            e = fold_embeddings[m][k]
            compact = _float16(e.to_numpy())
            parts.append(fs.reductions[m].frame(e.index.to_numpy(), compact, prefix=f"m{m}").set_index("image_id"))
        extra = pd.concat(parts, axis=1, join="outer").reset_index()
        outs.append(_fitted_stage(fs.models, saved.scfg, saved.n_models, [f[k] for f in fold_probs], extra, place))
    ids = outs[0]["image_id"]
    values = np.mean([fr.set_index("image_id").loc[ids, list(LABELS)].to_numpy(np.float64) for fr in outs], axis=0)
    frame = pd.DataFrame(np.clip(values, 0.0, 1.0).astype(np.float64), columns=list(LABELS))
    frame.insert(0, "image_id", ids.to_numpy())
    return frame
