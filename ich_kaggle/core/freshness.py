"""The manifests each stage's outputs must carry to be reused: one owner for "what made this file".

A stage writes `expected_*` beside its output; the stage itself and every later stage compare the manifest on disk
with the one these functions build from the current inputs (`core.manifest.differences`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from . import manifest as M
from .config import recorded_defaults, selected_folds, CVConfig, EnsembleConfig, StackConfig, TTAConfig
from .layout import Layout, Predictions, Run

IGNORED_FOR_RESUME = ("description", "data.num_workers", "data.source", "tta", "stack")  # never change a fold's weights

PREDICT_FORMAT = 1  # bump when predict's files change meaning
STACK_FORMAT = 3  # 2: early stopping on an inner split, curve.csv; 3: the first stage's folds (cv.split), per_fold


def _tta(tta: TTAConfig) -> dict:
    return {"transforms": list(tta.transforms), "average": tta.average}  # batch_size does not change a prediction


def prediction_fold(
    run: Run, fold: int, tta: TTAConfig, test_ids: list[str], oof_ids: list[str], embeddings: str = "full"
) -> dict:
    """One fold's test + OOF predictions: its checkpoint, the TTA, the images predicted, the embeddings kept
    (none, full, pca<d>: predict.stage.embedding_mode)."""
    return M.make(
        "predictions_fold",
        PREDICT_FORMAT,
        inputs={"checkpoint": M.identity(run.fold(fold).best)},
        settings={
            "tta": _tta(tta),
            "test_ids": M.digest(sorted(test_ids)),
            "oof_ids": M.digest(sorted(oof_ids)),
            "embeddings": embeddings,
        },
    )


def predictions(run: Run, folds: list[int], tta: TTAConfig) -> dict:
    """The fold-averaged test.csv / concatenated oof.csv: which folds, from which checkpoints, with which TTA."""
    return M.make(
        "predictions",
        PREDICT_FORMAT,
        inputs={f"fold{k}": M.identity(run.fold(k).best) for k in folds},
        settings={"folds": list(folds), "tta": _tta(tta)},
    )


def ensemble(members: list[Predictions], ens: EnsembleConfig) -> dict:
    """An ensemble's combined first stage: the members' prediction files and how they are combined."""
    inputs = {f"member{i}:{f.name}": M.identity(f) for i, m in enumerate(members) for f in (m.oof, m.test)}
    return M.make(
        "ensemble",
        PREDICT_FORMAT,
        inputs=inputs,
        settings={"members": list(ens.members), "combine": ens.combine, "weights": list(ens.weights)},
    )


def stacked(sources: list[Predictions], layout: Layout, stack: StackConfig, cv: CVConfig) -> dict:
    """The second stage: the first-stage files it read, the folds (cv: k, seed, split, which folds) and series it
    used, its settings. With stack.embedding_space=per_fold it reads each fold model's own files too."""
    folds = selected_folds(cv)
    inputs: dict = {"folds": M.identity(layout.folds_csv), "meta": M.identity(layout.meta_csv)}
    per_fold = stack.use_embeddings and stack.embedding_space == "per_fold"
    for i, src in enumerate(sources):
        mixture = stack.use_embeddings and not per_fold  # per_fold reads only each fold model's own files
        files = [src.oof, src.test] + ([src.oof_embeddings, src.test_embeddings] if mixture else [])
        if per_fold:
            files += [
                f
                for k in folds
                for f in (src.oof_fold(k), src.test_fold(k), src.oof_fold_embeddings(k), src.test_fold_embeddings(k))
            ]
        inputs.update({f"source{i}:{f.name}": M.identity(f) for f in files})
    # embedding_stage adds a second stack beside this one (with its own manifest); threads and the time budget change
    # the speed, not what is fitted, unless the budget binds (the curve says so)
    skip = ("sources", "embedding_stage", "threads", "max_seconds")
    settings = {k: v for k, v in dataclasses.asdict(stack).items() if k not in skip}
    if not stack.use_embeddings:
        settings.pop("embedding_space")  # does not change a probability-level stack
    settings["cv"] = {"k": cv.k, "seed": cv.seed, "split": cv.split, "folds": folds}
    return M.make("stack", STACK_FORMAT, inputs=inputs, settings=settings)


def stale_reason(output: Path, expected: dict) -> str | None:
    """None when `output` is fresh, else what differs, in one line."""
    diffs = M.check(output, expected)
    return M.describe(diffs) if diffs else None


def chain_reason(output: Path) -> str | None:
    """None when `output` exists and its whole chain holds (see `core.manifest.chain`), else what broke, in one line."""
    if not output.exists():
        return f"{output} is missing"
    diffs = M.chain(output)
    return M.describe(diffs) if diffs else None


def _comparable(cfg_dict: dict) -> dict:
    """A config as flat dotted keys without those that never change a fold's weights (tuples as YAML writes them)."""
    flat = pd.json_normalize(json.loads(json.dumps(cfg_dict, default=str)), sep=".").iloc[0].to_dict()
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in IGNORED_FOR_RESUME)}


def config_differences(trained: dict, now: dict) -> list[str]:
    """The settings (dotted keys) that differ between the config a fold was trained with and the current one. A key
    the trained config lacks (added since the fold was trained) counts as what the fold used: its default, or its
    behaviour before it existed (`config.recorded_defaults`)."""
    old, new, before = _comparable(trained), _comparable(now), _comparable(recorded_defaults(trained).to_dict())
    return sorted(k for k in set(old) | set(new) if str(old.get(k, before.get(k))) != str(new.get(k)))


def fold_split_digest(table: pd.DataFrame, fold: int) -> str:
    """What a fold trains and validates on, as a digest of its image ids: a rebuilt folds.csv shows up here."""
    val = table["fold"] == fold
    return M.digest(
        [
            "val",
            *sorted(table.loc[val, "image_id"].astype(str)),
            "train",
            *sorted(table.loc[~val, "image_id"].astype(str)),
        ]
    )
