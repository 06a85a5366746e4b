"""The fitted second stage, saved per fold, and applied to new series (`infer` through the model bundle).

`make stack` cross-fits one model per fold and predicts the test series with the mean of the fold models; those
models were thrown away, so the stage `submit` chooses could not be used again. `save` keeps them
(`runs/<cfg>/stack/models.pt`: for a sequence net its shape and weights, for the neighbours baseline its arrays),
and `apply` repeats the test path of `pipeline.run_stacking` on any first-stage predictions: same inputs (each
source's logits and the position features), same packing, same mean over the fold models, so on the competition's
test set it gives `stack/test.csv` again.

Only probability-level stacking is saved: with `stack.use_embeddings` the inputs also hold principal components
fitted on the test embeddings of that run, which new images cannot reuse.
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
from .fit import predict_net
from .nets import SequenceNet
from .pipeline import _values, merge_sources
from .sequences import build_sequences

FORMAT = 1


def savable(scfg: StackConfig) -> str | None:
    """Why the second stage of these settings cannot be saved for new images, or None."""
    if scfg.use_embeddings:
        return "stack.use_embeddings=true (its principal components were fitted on that run's test embeddings)"
    return None


def save(path: Path, models: dict[int, object], scfg: StackConfig, n_models: int) -> Path:
    folds = {}
    for k, m in models.items():
        if isinstance(m, SequenceNet):
            folds[int(k)] = {
                "type": "net",
                "state": {n: t.detach().cpu() for n, t in m.state_dict().items()},
                "n_features": int(m.inp[0].in_features),
            }
        else:
            raise TypeError(f"cannot save a second-stage model of type {type(m).__name__}")
    payload = {"format": FORMAT, "stack": dataclasses.asdict(scfg), "n_models": int(n_models), "folds": folds}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


@dataclasses.dataclass
class SavedStack:
    scfg: StackConfig
    n_models: int
    models: dict[int, object]


def load(path: Path) -> SavedStack:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: unreadable second stage ({type(e).__name__}); rerun `make stack`") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a saved second stage of format {FORMAT}; rerun `make stack`")
    scfg = StackConfig(**payload["stack"])
    n_models = payload["n_models"]
    models: dict[int, object] = {}
    for k, entry in sorted(payload["folds"].items()):
        if entry.get("type") != "net":
            kind = entry.get("type")
            raise UserError(f"{path}: fold {k} holds a second-stage model of type {kind!r}; rerun `make stack`")
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
        models[int(k)] = net.eval()
    return SavedStack(scfg, n_models, models)


def apply(saved: SavedStack, frames: list[pd.DataFrame], place: pd.DataFrame) -> pd.DataFrame:
    """Second-stage probabilities (image_id + 6 labels) of the images of `frames` (one wide frame per source, as
    the stack was fitted on); `place`: image_id, series_id, slice_rank, z, series_len. Images without a place keep
    the mean of the sources, as in `run_stacking`."""
    from ..core.labels import LABELS

    if len(frames) != saved.n_models:
        raise UserError(f"the second stage was fitted on {saved.n_models} source(s), given {len(frames)}")
    merged, n = merge_sources(frames)
    cols = [c for c in ("image_id", "series_id", "slice_rank", "z", "series_len") if c in place.columns]
    rows = merged.merge(place[cols].drop_duplicates("image_id"), on="image_id", how="inner")
    _, mean = _values(merged, n)
    out = mean.astype(np.float64).copy()
    if len(rows):
        values, _ = _values(rows, n)
        seqs = build_sequences(rows, values)
        total = None
        for k, model in saved.models.items():
            if isinstance(model, SequenceNet):
                p = predict_net(
                    model, seqs, batch_series=max(256, saved.scfg.batch_series), reverse_tta=saved.scfg.reverse_tta
                )
            else:
                p = model.predict(seqs)
            total = p if total is None else total + p
        pos = pd.Index(merged["image_id"]).get_indexer(rows["image_id"])
        out[pos] = seqs.scatter(total / len(saved.models), len(rows))
    frame = pd.DataFrame(np.clip(out, 0.0, 1.0), columns=list(LABELS))
    frame.insert(0, "image_id", merged["image_id"].to_numpy())
    return frame
