"""Which stage `submit` sends: the first stage, the probability stack, the embedding stack or a blend, by OOF loss.

Every fresh stage is scored on the same labelled images (those every candidate predicts); the blend (the mean of the
second stages' probabilities, with the first stage when there is only one second stage) is written to
`runs/<cfg>/blend/` and added as a candidate: chosen only when it measures better than every stage. Why a plain
mean and not fitted weights: the weights would be chosen on the same OOF rows that then judge them; a mean has
nothing to overfit.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import ensemble, freshness
from ..core.errors import UserError
from ..core.io import atomic_open, write_csv
from ..core.labels import LABELS
from ..core.layout import Run, Stacked
from ..core.metrics import read_long_or_wide, read_truth, score_frames

log = logging.getLogger(__name__)

STAGES = ("first_stage", "stacked", "stacked_embeddings", "blend")


@dataclass(frozen=True)
class Stage:
    name: str
    test: Path
    oof: Path


def _first_stage_manifest(cfg, run: Run) -> dict:
    from ..core.config import selected_folds

    if cfg.is_ensemble:
        return freshness.ensemble(ensemble.member_predictions(cfg, run.dir.parent), cfg.ensemble)
    return freshness.predictions(run, run.finished(selected_folds(cfg.cv)), cfg.tta)


def _second_stages(cfg, layout, run: Run) -> list[Stage]:
    """The fresh second stages: the probability stack and, with stack.embedding_stage, the embedding stack."""
    sources = ensemble.stack_sources(cfg, run.dir.parent)
    found: list[tuple[str, Stacked, object]] = [("stacked", run.stack, cfg.stack)]
    if cfg.stack.embedding_stage and not cfg.stack.use_embeddings:
        found.append(("stacked_embeddings", run.embedding_stack, cfg.stack.embedding_level()))
    out = []
    for name, files, scfg in found:
        if not files.test.exists():
            log.info(f"submit: no {name} stage ({files.test} missing; `make stack` fits it)")
            continue
        expected = freshness.stacked(sources, layout, scfg, cfg.cv)
        stale = next(
            filter(
                None,
                (
                    freshness.stale_reason(f, expected) if f.exists() else f"{f.name} is missing"
                    for f in (files.test, files.oof)
                ),
            ),
            None,
        )
        if stale:
            log.info(f"submit: {files.test} is stale ({stale}); left out (`make stack` refreshes it)")
            continue
        out.append(Stage(name, files.test, files.oof))
    return out


def _read(path: Path) -> pd.DataFrame:
    frame = read_long_or_wide(path)
    return frame.assign(image_id=frame["image_id"].astype(str)).drop_duplicates("image_id").set_index("image_id")


def oof_losses(stages: list[Stage], truth: pd.DataFrame) -> tuple[dict[str, float], pd.Index] | None:
    """OOF weighted log loss of each stage on the labelled images every stage predicts (None: none in common)."""
    frames = {s.name: _read(s.oof) for s in stages}
    ids = pd.Index(truth["image_id"].astype(str))
    for frame in frames.values():
        ids = ids.intersection(frame.index, sort=False)
    if not len(ids):
        return None
    t = truth.assign(image_id=truth["image_id"].astype(str)).drop_duplicates("image_id").set_index("image_id").loc[ids]
    t = t.reset_index()
    return {k: score_frames(t, f.loc[ids].reset_index())["weighted_log_loss"] for k, f in frames.items()}, ids


def _mean(paths: list[Path]) -> pd.DataFrame:
    """Mean probabilities over the images every file predicts."""
    frames = [_read(p) for p in paths]
    ids = frames[0].index
    for f in frames[1:]:
        ids = ids.intersection(f.index, sort=False)
    values = np.mean([f.loc[ids, list(LABELS)].to_numpy(np.float64) for f in frames], axis=0)
    out = pd.DataFrame(values, columns=list(LABELS))
    out.insert(0, "image_id", ids.to_numpy())
    return out


def blend_parts(stages: list[Stage]) -> list[Stage]:
    """What the blend averages: every second stage, plus the first stage when there is a single second stage."""
    second = [s for s in stages if s.name != "first_stage"]
    return stages if len(second) == 1 else second


def choose(stages: list[Stage], truth: pd.DataFrame | None, blend_dir: Stacked) -> tuple[Stage, dict[str, float]]:
    """The stage with the lowest OOF loss (with a blend among the candidates), and every candidate's loss.

    Without labels (or no OOF image in common) the last second stage listed wins: the embedding stack, else the
    probability stack, else the first stage. The blend is written to `blend_dir` whenever it is a candidate."""
    if truth is None or not all(s.oof.exists() for s in stages):
        return stages[-1], {}
    scored = oof_losses(stages, truth)
    if scored is None:
        return stages[-1], {}
    losses, ids = scored
    parts = blend_parts(stages)
    if len(parts) >= 2:
        blend_oof = _mean([s.oof for s in parts])
        t = truth.assign(image_id=truth["image_id"].astype(str)).drop_duplicates("image_id").set_index("image_id")
        on = blend_oof[blend_oof["image_id"].isin(ids)]
        losses["blend"] = score_frames(t.loc[on["image_id"]].reset_index(), on)["weighted_log_loss"]
        try:
            write_csv(_mean([s.test for s in parts]), blend_dir.test)  # kept either way: `make demo` scores it too
            write_csv(blend_oof, blend_dir.oof)
        except PermissionError:  # a read-only runs folder: the stages it holds are still candidates
            log.info(f"submit: {blend_dir.dir} cannot be written (read-only); the blend is left out")
            del losses["blend"]
        if "blend" in losses and losses["blend"] < min(losses[s.name] for s in stages):
            return Stage("blend", blend_dir.test, blend_dir.oof), losses
    best = min(stages, key=lambda s: losses[s.name])
    return best, losses


def _describe(losses: dict[str, float], chosen: str) -> str:
    """Every candidate's loss, second stages first (in STAGES order, then the first stage)."""
    order = [k for k in (*STAGES[1:], STAGES[0]) if k in losses]
    return "OOF weighted log loss: " + ", ".join(
        f"{k} {losses[k]:.5f}" + (" (chosen)" if k == chosen else "") for k in order
    )


def _why(losses: dict[str, float], chosen: str) -> str:
    if chosen == "first_stage" and "stacked" in losses:
        return "stacking did not lower the OOF loss; "
    return "the lowest OOF loss; "


def choose_stage(cfg, layout, run: Run) -> tuple[Path, Path]:
    """(test, oof) predictions to submit: of the first stage, each fresh second stage and their blend, the one with
    the lowest OOF weighted log loss against the training labels (all scored on the same images); each candidate's
    score and the choice are logged and kept in `run.choice`.

    Fresh means its manifest matches the current inputs (`core.freshness`): the first stage was made from the
    finished folds' current checkpoints with the config's TTA (an ensemble's: from its members' current
    predictions); a stack from the current first-stage files. A stale or missing stack is left out; the first stage
    must be fresh.
    """
    first = run.predictions
    if not first.test.exists():
        raise UserError(
            f"no test predictions in {first.dir}; run `make predict CONFIG={cfg.name}` (and `make stack`) first"
        )
    expected = _first_stage_manifest(cfg, run)
    for path in (first.test, first.oof):  # the OOF file chooses the stage and gives the expected score
        stale = freshness.stale_reason(path, expected) if path.exists() else f"{path.name} is missing"
        if stale:
            raise UserError(f"{path} is stale ({stale}); rerun `make predict CONFIG={cfg.name}` first")
    stages = [Stage("first_stage", first.test, first.oof), *_second_stages(cfg, layout, run)]
    train = read_truth(Path(layout.train_csv)) if Path(layout.train_csv).exists() else None
    chosen, losses = choose(stages, train, run.blend)
    if losses:
        log.info(
            f"submit: using the {chosen.name.replace('_', ' ')} ({chosen.test}): {_why(losses, chosen.name)}"
            f"{_describe(losses, chosen.name)}"
        )
    elif len(stages) > 1:
        log.info(
            f"submit: using the {chosen.name} stage ({chosen.test}); no OOF score to choose by (no training "
            f"labels in {layout.train_csv} or no OOF image in common)"
        )
    else:
        log.info(f"submit: using the first stage ({first.test}); no fresh second stage")
    choice = {
        "stage": chosen.name,
        "test": str(chosen.test),
        "oof": str(chosen.oof),
        "oof_log_loss": losses,
        "candidates": [s.name for s in stages] + (["blend"] if "blend" in losses else []),
    }
    try:
        with atomic_open(run.choice) as f:
            json.dump(choice, f, indent=1)
    except PermissionError:  # a read-only runs folder: the choice is printed above, the submission goes elsewhere
        log.info(f"submit: {run.dir} is read-only; the choice is not kept in {run.choice.name}")
    return chosen.test, chosen.oof
