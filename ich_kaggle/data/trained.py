"""Whether an experiment's finished folds are still the ones its current inputs would train.

Every stage that reads what trained folds made (predict, stack, submit, report, kernel-datasets) asks this first, as
`train` does: the labels or the data folder changed under folds.csv, folds.csv rebuilt, or the config edited after
training (train.lr, data.windows, a member's model.dropout) stops the stage with one line naming what differs and
the command that retrains. Recomputing would throw the trained folds away, so it never happens behind the user's back.
Reads only (the fold's config.yaml and done.json, no checkpoint): works in a read-only runs folder and without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..core import freshness
from ..core.config import Config, selected_folds
from ..core.errors import UserError
from ..core.layout import Layout, Run
from . import folds as folds_mod


def check(cfg: Config, layout: Layout, runs: str | Path, via: str | None = None) -> list[int]:
    """The finished folds of `cfg` (one config, not an ensemble); one line (UserError) when one of them was trained
    on another split or with another config than the current one. `via`: the ensemble `cfg` is a member of (the
    commands named then train through it)."""
    name = via or cfg.name
    run = Run.of(runs, cfg.name)
    finished = run.finished(selected_folds(cfg.cv))
    if not finished:
        return finished
    reason = folds_mod.stale_reason(layout, cfg.cv.k, cfg.cv.seed)
    if reason and reason != "is missing":
        raise UserError(
            f"{layout.folds_csv} {reason}, but fold(s) {finished} of {cfg.name} were trained on it: their "
            f"OOF images would leak; retrain them with `make train-all CONFIG={name} FORCE=1` (--force), "
            f"or restore {layout.train_csv}"
        )
    # no folds.csv and no labels to build it from (a kernel given the test set only): the config check alone
    buildable = layout.folds_csv.exists() or (layout.train_csv.exists() and layout.train_dir.is_dir())
    table = folds_mod.fold_table(layout, cfg.cv) if buildable else None
    for k in finished:
        files = run.fold(k)
        fix = f"`make train CONFIG={name} fold={k} FORCE=1` (--force)"
        try:
            trained = yaml.safe_load(files.config.read_text()) if files.config.is_file() else None
            done = json.loads(files.done.read_text())
        except (OSError, ValueError, yaml.YAMLError):
            raise UserError(
                f"{files.dir}: config.yaml or done.json is unreadable; retrain the fold with {fix}"
            ) from None
        if isinstance(trained, dict):
            diff = freshness.config_differences(trained, cfg.to_dict())
            if diff:
                now = freshness._comparable(cfg.to_dict())
                was = freshness._comparable(trained)
                shown = ", ".join(f"{key} {was.get(key)!r} -> {now.get(key)!r}" for key in diff[:3])
                more = ", ..." if len(diff) > 3 else ""
                raise UserError(
                    f"fold {k} of {cfg.name} was trained with another config ({shown}{more}); retrain "
                    f"it with {fix}, or restore those settings"
                )
        split = done.get("split") if isinstance(done, dict) else None
        if split is not None and table is not None and split != freshness.fold_split_digest(table, k):
            raise UserError(
                f"fold {k} of {cfg.name} was trained on other images than fold {k} of {layout.folds_csv} "
                f"has now (folds.csv rebuilt, or another data folder); retrain it with {fix}, or use the "
                f"data it was trained on"
            )
    return finished
