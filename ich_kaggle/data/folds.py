"""Patient-grouped K folds balanced on the rare labels.

Greedy multilabel stratified group assignment: patients are taken rarest label first (epidural before
subdural before `any`, patients without positives last; random order within a rarity class, fixed by the seed),
and each goes to the fold holding the fewest positives of its rarest label relative to that fold's target
(then of its next rarest label, ...), ties broken by fold size. Patients carrying several rare labels can
still leave a fold without one label, so a short local search (moves and swaps of single patients) then
makes every label carried by >= k patients reach every fold. No patient is ever split across folds.
"""

from __future__ import annotations

import logging
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.labels import LABELS
from ..core.errors import UserError, fix
from ..core.io import atomic_open, write_csv
from ..core.config import CVConfig
from ..core.layout import Layout
from ..core import labels as labels_mod
from ..core import scope
from . import meta as meta_mod

log = logging.getLogger(__name__)

FOLD_COLUMNS = ["image_id", "patient_id", "study_id", "series_id", "fold", *LABELS]


def assign_folds(frame: pd.DataFrame, k: int = CVConfig.k, seed: int = CVConfig.seed) -> pd.Series:
    """Fold (0..k-1) of each row of `frame` (needs patient_id + the six LABELS), constant within a patient."""
    if k < 2:
        raise UserError(f"k must be at least 2 folds, got {k}")
    patients, codes = np.unique(frame["patient_id"].astype(str).to_numpy(), return_inverse=True)
    if len(patients) < k:
        raise UserError(
            f"only {len(patients)} patient(s) with labels: cannot make {k} patient-grouped folds; use a smaller k"
        )
    y = frame[list(LABELS)].to_numpy(dtype=np.int64)
    counts = np.zeros((len(patients), len(LABELS)), dtype=np.int64)  # positive images per patient and label
    np.add.at(counts, codes, y)
    sizes = np.bincount(codes, minlength=len(patients)).astype(np.int64)
    has = counts > 0
    n_with = has.sum(axis=0)  # patients carrying each label
    # rarity rank of labels: fewest patients first (ties by label order); patients ordered by their rarest label
    label_rank = np.empty(len(LABELS), dtype=np.int64)
    label_rank[np.lexsort((np.arange(len(LABELS)), n_with))] = np.arange(len(LABELS))
    ranks = np.where(has, label_rank[None, :], len(LABELS))
    rarest_rank = ranks.min(axis=1)
    rng = np.random.default_rng(seed)
    shuffle = rng.permutation(len(patients))
    order = shuffle[np.argsort(rarest_rank[shuffle], kind="stable")]
    target_label = np.maximum(counts.sum(axis=0), 1) / k
    target_size = sizes.sum() / k
    fold_label = np.zeros((k, len(LABELS)), dtype=np.float64)
    fold_carriers = np.zeros((k, len(LABELS)), dtype=np.int64)  # patients per fold carrying each label
    fold_size = np.zeros(k, dtype=np.float64)
    assignment = np.empty(len(patients), dtype=np.int64)
    tie = rng.random(k) * 1e-9  # deterministic, seed-dependent tie-break among equal folds
    by_rarity = np.argsort(label_rank)
    for p in order:
        # lexicographic: fill of the patient's rarest label, then of its next rarest, ..., then fold size
        keys = [fold_size / target_size + tie]
        keys += [fold_label[:, lab] / target_label[lab] for lab in by_rarity[::-1] if has[p, lab]]
        f = int(np.lexsort(tuple(keys))[0])
        assignment[p] = f
        fold_label[f] += counts[p]
        fold_carriers[f] += has[p]
        fold_size[f] += sizes[p]
    _repair(assignment, has, sizes, fold_carriers, n_with, k)
    return pd.Series(assignment[codes].astype(np.int8), index=frame.index, name="fold")


def _repair(
    assignment: np.ndarray, has: np.ndarray, sizes: np.ndarray, fold_carriers: np.ndarray, n_with: np.ndarray, k: int
) -> None:
    """Local search so that every label carried by >= k patients reaches every fold.

    The greedy pass can leave a fold without a label when patients carrying several rare labels were placed
    for another label. Each step moves one carrier into the empty fold, or swaps it with a patient there
    (the most similar in size), and is taken only if it lowers the number of empty (fold, label) pairs.
    """
    needs = n_with >= k
    hasi = has.astype(np.int64)

    def empties(rows: np.ndarray) -> np.ndarray:
        return ((rows == 0) & needs).sum(axis=-1)

    for _ in range(4 * len(assignment)):
        empty = np.argwhere((fold_carriers == 0) & needs[None, :])
        if len(empty) == 0:
            return
        best = None  # (gain, -size change, p, q or -1, f_to)
        for f_to, lab in empty:
            for p in np.flatnonzero(has[:, lab]):
                f_from = assignment[p]
                if f_from == f_to:
                    continue
                before = empties(fold_carriers[f_from]) + empties(fold_carriers[f_to])
                after = empties(fold_carriers[f_from] - hasi[p]) + empties(fold_carriers[f_to] + hasi[p])
                cand = (before - after, -sizes[p], p, -1, f_to)
                if best is None or cand[:2] > best[:2]:
                    best = cand
                qs = np.flatnonzero(assignment == f_to)
                if len(qs):
                    new_from = fold_carriers[f_from] - hasi[p] + hasi[qs]
                    new_to = fold_carriers[f_to] + hasi[p] - hasi[qs]
                    gain = before - (empties(new_from) + empties(new_to))
                    change = np.abs(sizes[p] - sizes[qs])
                    i = int(np.lexsort((change, -gain))[0])
                    cand = (int(gain[i]), -int(change[i]), p, int(qs[i]), f_to)
                    if cand[:2] > best[:2]:
                        best = cand
        if best is None or best[0] <= 0:
            return
        _, _, p, q, f_to = best
        f_from = assignment[p]
        assignment[p] = f_to
        fold_carriers[f_from] -= hasi[p]
        fold_carriers[f_to] += hasi[p]
        if q >= 0:
            assignment[q] = f_from
            fold_carriers[f_to] -= hasi[q]
            fold_carriers[f_from] += hasi[q]


def labelled_frame(meta: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Readable train slices joined with their labels (slices without labels and labels without files drop out)."""
    train = meta.loc[meta["split"] == "train", ["image_id", "patient_id", "study_id", "series_id"]]
    return train.merge(labels, on="image_id", how="inner", validate="one_to_one")


def summary(folds: pd.DataFrame) -> pd.DataFrame:
    """Per fold: images, patients and positive images of each label."""
    g = folds.groupby("fold")
    table = g[list(LABELS)].sum()
    table.insert(0, "patients", g["patient_id"].nunique())
    table.insert(0, "images", g.size())
    return table


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def build_folds(
    layout: Layout, out: str | Path | None = None, k: int = CVConfig.k, seed: int = CVConfig.seed
) -> pd.DataFrame:
    """Write folds.csv: image_id, patient_id, study_id, series_id, fold + LABELS for labelled, readable train slices."""
    layout.require_data()
    labels = labels_mod.read_labels(layout.train_csv)
    meta = meta_mod.load_meta(layout)
    frame = labelled_frame(meta, labels)
    if frame.empty:
        raise UserError(
            f"{layout.train_csv}: none of its images is among the readable train DICOMs in {layout.train_dir}; "
            f"check that they come from the same download (or delete {layout.meta_csv} to rescan)"
        )
    frame["fold"] = assign_folds(frame, k=k, seed=seed)
    folds = frame[FOLD_COLUMNS].reset_index(drop=True)
    out = write_folds(layout, folds, k, seed, out)
    unlabelled = int((meta["split"] == "train").sum()) - len(folds)
    log.info(
        f"folds: {len(folds)} labelled train slices of {folds['patient_id'].nunique()} patients "
        f"in {k} folds (seed {seed})"
        + (f"; {unlabelled} train slice(s) without labels left out" if unlabelled else "")
        + f" -> {out}"
    )
    log.info(summary(folds).to_string())
    return folds


def write_folds(layout: Layout, folds: pd.DataFrame, k: int, seed: int, out: str | Path | None = None) -> Path:
    """folds.csv + the sidecar that says what made it (k, seed, the label file): built here or shipped (a kernel)."""
    out = Path(out) if out else layout.folds_csv
    scope.forget("folds")  # what this command resolved from the former folds.csv
    write_csv(folds, out)
    with atomic_open(_sidecar(out)) as f:
        json.dump({"k": k, "seed": seed, "images": len(folds), "labels": _labels_identity(layout)}, f)
    return out


def _stale(layout: Layout, k: int, seed: int) -> bool:
    """Whether folds.csv must be (re)built: missing, made from another label file, or lacking labelled train images
    that the data folder now has. Made with another (k, seed), it is not rebuilt behind the user's back (trained
    folds depend on it): one line says how to go on."""
    reason = stale_reason(layout, k, seed)
    if reason and reason != "is missing":
        log.info(f"{layout.folds_csv}: {reason}; rebuilding it")
    return reason is not None


def stale_reason(layout: Layout, k: int, seed: int) -> str | None:
    """Why folds.csv must be (re)built (see `_stale`), or None; reads only, so a stage with trained folds can stop
    instead of rebuilding the split under them."""
    path = layout.folds_csv
    if not path.exists() or not _sidecar(path).exists():
        return "is missing"
    try:
        info = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return "is missing"
    if not isinstance(info, dict):
        return "is missing"
    if info.get("k") != k or info.get("seed") != seed:
        old_set = f"--set cv.k={info.get('k')} cv.seed={info.get('seed')}"
        old_make = f'SET_EXTRA="cv.k={info.get("k")} cv.seed={info.get("seed")}"'
        rebuild = f"python -m ich_kaggle folds --data {layout.data} --k {k} --seed {seed}"
        raise UserError(
            f"{path} was made with k={info.get('k')}, seed={info.get('seed')} but this config asks for "
            f"cv.k={k}, cv.seed={seed}; use {fix(old_set, old_make)}, or rebuild it with "
            f"`{fix(rebuild, f'make folds DATA_DIR={layout.data} K={k} SEED={seed}')}` (folds "
            f"trained on the old split then refuse to resume)"
        )
    if info.get("labels", {}) != _labels_identity(layout):
        return f"was made from another {layout.train_csv.name} (replaced or edited since)"
    # only labelled train images that folds.csv lacks make it stale: new test DICOMs (meta.csv rewritten) do not,
    # and neither does a meta.csv without train rows (a kernel's, which predicts the test set only)
    train_ids = set(meta_mod.load_meta(layout).query("split == 'train'")["image_id"].astype(str))
    new = train_ids - set(pd.read_csv(path, usecols=["image_id"], dtype=str)["image_id"])
    if new and new & set(labels_mod.read_labels(layout.train_csv)["image_id"]):
        return f"lacks {len(new)} labelled train image(s) added since it was made"
    return None


def _labels_identity(layout: Layout) -> dict:
    """stage_2_train.csv as size + mtime, not path (the kernel sees it through a link)."""
    st = layout.train_csv.stat() if layout.train_csv.exists() else None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns} if st else {}


def read_folds(path: str | Path) -> pd.DataFrame:
    dtypes = {c: str for c in ("image_id", "patient_id", "study_id", "series_id")}
    dtypes.update({label: np.int8 for label in LABELS})
    dtypes["fold"] = np.int8
    return pd.read_csv(path, dtype=dtypes)


def load_folds(layout: Layout, k: int = CVConfig.k, seed: int = CVConfig.seed) -> pd.DataFrame:
    """folds.csv for (k, seed), (re)built when missing or stale (see `_stale`)."""
    if _stale(layout, k, seed):
        return build_folds(layout, k=k, seed=seed)
    return read_folds(layout.folds_csv)


def random_folds(frame: pd.DataFrame, k: int, seed: int) -> pd.Series:
    """A fold per row drawn per image, not per patient (`cv.split: random`, Huang & Chen's setting).

    It LEAKS patients: slices of one scan, millimetres apart, land on both sides, so its validation scores are
    optimistic. Equal fold sizes, fixed by (seed, image ids) whatever the row order of folds.csv.
    """
    ids = frame["image_id"].astype(str).to_numpy()
    order = np.argsort(ids, kind="stable")
    rng = np.random.default_rng([int(seed), int(k), 23])
    fold = np.empty(len(ids), dtype=np.int8)
    fold[order[rng.permutation(len(ids))]] = (np.arange(len(ids)) % k).astype(np.int8)
    return pd.Series(fold, index=frame.index, name="fold")


def fold_table(layout: Layout, cv: CVConfig) -> pd.DataFrame:
    """The folds every stage of an experiment uses: folds.csv for (cv.k, cv.seed), re-split per image when
    cv.split == 'random'. The one place that decides which image is in which fold; once per command (`core.scope`)."""
    key = ("folds", str(layout.work.resolve()), cv.k, cv.seed, cv.split)
    return scope.resolved(key, lambda: _fold_table(layout, cv))


def _fold_table(layout: Layout, cv: CVConfig) -> pd.DataFrame:
    table = load_folds(layout, k=cv.k, seed=cv.seed)
    if cv.split == "random":
        table = table.assign(fold=random_folds(table, cv.k, cv.seed))
    return table.assign(image_id=table["image_id"].astype(str))


def check_trainable(table: pd.DataFrame, folds: list[int], folds_csv: Path) -> None:
    """Every fold in `folds` leaves non-empty training and validation sets: checked before the first one trains."""
    sizes = table["fold"].value_counts()
    for fold in folds:
        n_val = int(sizes.get(fold, 0))
        if n_val == 0 or n_val == len(table):
            raise UserError(
                f"{folds_csv}: fold {fold} leaves an empty {'validation' if n_val == 0 else 'training'} set "
                f"(folds present: {sorted(int(f) for f in sizes.index)}); "
                f"use fewer folds ({fix('--set cv.k=...', 'SET_EXTRA=cv.k=...')}) or more data"
            )
