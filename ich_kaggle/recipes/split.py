"""Random (image-level) folds next to the default patient-grouped ones, to show what a random split hides.

Huang & Chen report both: a random 8:2 split scores higher than a patient split because slices of the same
patient (even of the same scan, a few millimetres apart) land on both sides. `cv.split: random` reproduces
that setting; it LEAKS patients across folds and its validation scores are optimistic. Keep `patient` (the
default) for anything you want to trust.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import Config
from ..paths import Layout


def random_folds(frame: pd.DataFrame, k: int, seed: int) -> pd.Series:
    """A fold per row, drawn per image (not per patient): equal fold sizes, fixed by (seed, image ids)."""
    ids = frame["image_id"].astype(str).to_numpy()
    order = np.argsort(ids, kind="stable")  # independent of the row order of folds.csv
    rng = np.random.default_rng([int(seed), int(k), 23])
    fold = np.empty(len(ids), dtype=np.int8)
    fold[order[rng.permutation(len(ids))]] = (np.arange(len(ids)) % k).astype(np.int8)
    return pd.Series(fold, index=frame.index, name="fold")


def apply_split(table: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """folds.csv's table with `fold` replaced by random folds when cfg.cv.split == 'random' (else unchanged)."""
    if cfg.cv.split == "patient":
        return table
    out = table.copy()
    out["fold"] = random_folds(out, cfg.cv.k, cfg.cv.seed)
    return out


def fold_table(cfg: Config, layout: Layout) -> pd.DataFrame:
    """The folds every stage should use for `cfg`: patient-grouped folds.csv, re-split at random if configured."""
    from ..data import folds

    return apply_split(folds.load_folds(layout, k=cfg.cv.k, seed=cfg.cv.seed), cfg)


def patients_in_several_folds(table: pd.DataFrame) -> list[str]:
    """Patients whose slices sit in more than one fold (always empty for a patient split)."""
    n = table.groupby(table["patient_id"].astype(str))["fold"].nunique()
    return sorted(n[n > 1].index)


__all__ = ["random_folds", "apply_split", "fold_table", "patients_in_several_folds"]
