"""Ensembles as experiments: an ensemble config lists member configs; this module resolves them.

The format a kernel (or any later stage) reads from the run folders alone: `runs/<ensemble>/predictions/ensemble.json`
names each member's run folder (relative to runs/), the combination and the weights; each member's own
`runs/<member>/` is an ordinary experiment (folds, predictions, config.yaml).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import config as C
from .config import Config, EnsembleConfig
from .errors import UserError
from .labels import LABELS
from .layout import Predictions, Run


def member_names(cfg: Config) -> list[str]:
    """The run folder name of each member: a YAML path's stem, as `config.load` names it, after `<run>.` when the
    ensemble was given a RUN name (`config.named`)."""
    prefix = cfg.ensemble.run_prefix
    return [f"{prefix}.{Path(m).stem}" if prefix else Path(m).stem for m in cfg.ensemble.members]


def load_members(cfg: Config, overrides: list[str] | None = None) -> list[Config]:
    """Each member config with `ensemble.member_set` then the command-line overrides (ensemble keys excepted).

    Members must split the data as the ensemble does (cv.k, cv.seed, cv.split): the stacker trains on their OOF
    predictions fold by fold, so the folds have to be the same ones."""
    extra = [o for o in (overrides or []) if not o.strip().startswith("ensemble.")]
    members = []
    for name, run in zip(cfg.ensemble.members, member_names(cfg)):
        member = C.load(name, [*cfg.ensemble.member_set, *extra], run=run)
        if member.is_ensemble:
            raise UserError(
                f"config '{cfg.name}': ensemble.members lists '{name}', itself an ensemble; list its members instead"
            )
        for key in ("k", "seed", "split"):
            if getattr(member.cv, key) != getattr(cfg.cv, key):
                raise UserError(
                    f"config '{cfg.name}': member '{name}' has cv.{key}={getattr(member.cv, key)!r} but the "
                    f"ensemble has {getattr(cfg.cv, key)!r}; set the same cv.{key} in both (members must share folds)"
                )
        members.append(member)
    return members


def member_predictions(cfg: Config, runs: str | Path) -> list[Predictions]:
    return [Run.of(runs, name).predictions for name in member_names(cfg)]


def stack_sources(cfg: Config, runs: str | Path) -> list[Predictions]:
    """What the second stage of `cfg` reads: `stack.sources` when given, an ensemble's members, else its own."""
    run = Run.of(runs, cfg.name)
    if cfg.stack.sources:
        return run.prediction_sources(cfg.stack.sources)
    if cfg.is_ensemble:
        return member_predictions(cfg, runs)
    return run.prediction_sources([])


def weights(ens: EnsembleConfig, n: int) -> np.ndarray:
    w = np.asarray(ens.weights or [1.0] * n, dtype=np.float64)
    return w / w.sum()


def combine(frames: list[pd.DataFrame], ens: EnsembleConfig) -> pd.DataFrame:
    """Weighted mean of the members' wide predictions (probabilities or logits) over the images all of them have."""
    cols = list(LABELS)
    ids = pd.Index(frames[0]["image_id"].astype(str))
    for f in frames[1:]:
        ids = ids.intersection(pd.Index(f["image_id"].astype(str)), sort=False)
    arr = np.stack(
        [
            f.assign(image_id=f["image_id"].astype(str))
            .drop_duplicates("image_id")
            .set_index("image_id")
            .loc[ids, cols]
            .to_numpy(np.float64)
            for f in frames
        ]
    )
    w = weights(ens, len(frames))[:, None, None]
    if ens.combine == "logit":
        p = np.clip(arr, 1e-7, 1 - 1e-7)
        mean = 1 / (1 + np.exp(-(np.log(p / (1 - p)) * w).sum(0)))
    else:
        mean = (arr * w).sum(0)
    out = pd.DataFrame(mean, columns=cols)
    out.insert(0, "image_id", ids.to_numpy())
    return out
