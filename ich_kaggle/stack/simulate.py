"""Simulated first-stage predictions on real series structure, for the stacking tests and the competition-scale bench.

Series (slice count and z positions) are resampled from the real stage-1 test DICOM headers; hemorrhages are
contiguous runs of slices (a bleed spans neighbouring slices), and first-stage predictions are the true signal plus
independent per-slice noise: exactly the situation where looking at neighbouring slices pays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.labels import LABELS

# chance that a series has each subtype (roughly the competition's per-image rates scaled to series)
SUBTYPE_RATE = {
    "epidural": 0.02,
    "intraparenchymal": 0.18,
    "intraventricular": 0.12,
    "subarachnoid": 0.17,
    "subdural": 0.20,
}


def real_series_z(headers_csv: str | Path) -> list[np.ndarray]:
    """Sorted z positions of every series in a DICOM header table (ImagePositionPatient as pydicom writes it)."""
    h = pd.read_csv(headers_csv, usecols=["SeriesInstanceUID", "ImagePositionPatient"])
    z = h["ImagePositionPatient"].str.strip("[]").str.split(",").str[2].str.strip(" '\"").astype(float)
    frame = pd.DataFrame({"series": h["SeriesInstanceUID"], "z": z}).sort_values(["series", "z"])
    return [g.to_numpy() for _, g in frame.groupby("series", sort=True)["z"]]


def synthetic_series_z(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Fallback structure when the header table is absent: 20-60 slices, 5 mm apart."""
    return [np.arange(int(m)) * 5.0 for m in rng.integers(20, 61, size=n)]


@dataclass
class SimulatedStack:
    meta: pd.DataFrame  # image_id, patient_id, series_id, split, z, slice_rank, series_len
    folds: pd.DataFrame  # image_id, patient_id, series_id, fold + LABELS (train only)
    oof: pd.DataFrame  # image_id + LABELS probabilities (train)
    test: pd.DataFrame  # image_id + LABELS probabilities (test)
    test_truth: pd.DataFrame  # image_id + LABELS (test)


def smooth_noise(rank: np.ndarray, rho: float, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Unit-variance AR(1) noise along each series (rows sorted by series then rank): errors neighbours share."""
    white = rng.normal(size=shape)
    out = white.copy()
    for r in range(1, int(rank.max()) + 1 if len(rank) else 0):
        idx = np.flatnonzero(rank == r)
        out[idx] = rho * out[idx - 1] + np.sqrt(1 - rho * rho) * white[idx]
    return out


def simulate(
    n_series: int = 300,
    test_series: int = 0,
    k: int = 5,
    seed: int = 0,
    noise: float = 1.0,
    structure: list[np.ndarray] | None = None,
    shared_noise: float = 1.5,
    rho: float = 0.8,
) -> SimulatedStack:
    """Labels smooth over slices; first-stage logits = signal + N(0, noise) per slice + AR(1) noise shared with the
    neighbouring slices (sd `shared_noise`, correlation `rho`), which context cannot average away; folds by patient."""
    rng = np.random.default_rng(seed)
    total = n_series + test_series
    structure = structure or synthetic_series_z(200, rng)
    pick = rng.integers(0, len(structure), size=total)
    lens = np.array([len(structure[i]) for i in pick])
    n = int(lens.sum())
    series = np.repeat(np.arange(total), lens)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    rank = np.arange(n) - starts[series]
    z = np.concatenate([structure[i] for i in pick])

    y = np.zeros((n, len(LABELS)), dtype=np.int8)
    for j, label in enumerate(LABELS[1:], start=1):
        has = rng.random(total) < SUBTYPE_RATE[label]
        run = np.maximum(2, rng.geometric(1 / 8, size=total))
        centre = rng.random(total) * lens
        inside = has[series] & (np.abs(rank - centre[series]) < run[series] / 2)
        y[inside, j] = 1
    y[:, 0] = y[:, 1:].max(axis=1)

    # first stage: a per-series offset (scanner/patient) + per-slice noise around the true signal
    base = np.where(y == 1, 1.5, -3.5) + rng.normal(0, 0.5, size=(total, 1))[series]
    err = rng.normal(0, noise, size=y.shape) + shared_noise * smooth_noise(rank, rho, rng, y.shape)
    prob = 1 / (1 + np.exp(-(base + err)))

    ids = np.array([f"ID_{seed:02d}{i:08x}" for i in range(n)], dtype=object)
    sid = np.array([f"ID_s{seed:02d}{i:07x}" for i in range(total)], dtype=object)[series]
    # patients own one to three series (real data: ~1.03); folds go by patient
    patient_of_series = np.maximum(np.cumsum(rng.random(total) < 0.9) - 1, 0)
    pid = np.array([f"ID_p{seed:02d}{i:07x}" for i in range(total)], dtype=object)[patient_of_series[series]]
    is_test = series >= n_series
    fold_of_patient = rng.integers(0, k, size=total)
    meta = pd.DataFrame(
        {
            "image_id": ids,
            "patient_id": pid,
            "series_id": sid,
            "split": np.where(is_test, "test", "train"),
            "z": z,
            "slice_rank": rank,
            "series_len": lens[series],
        }
    )
    labels = pd.DataFrame(y, columns=list(LABELS))
    preds = pd.DataFrame(prob, columns=list(LABELS))
    tr = ~is_test
    folds = pd.concat(
        [
            meta.loc[tr, ["image_id", "patient_id", "series_id"]].reset_index(drop=True),
            pd.DataFrame({"fold": fold_of_patient[patient_of_series[series[tr]]]}),
            labels[tr].reset_index(drop=True),
        ],
        axis=1,
    )
    oof = pd.concat([meta.loc[tr, ["image_id"]].reset_index(drop=True), preds[tr].reset_index(drop=True)], axis=1)
    test = pd.concat(
        [meta.loc[is_test, ["image_id"]].reset_index(drop=True), preds[is_test].reset_index(drop=True)], axis=1
    )
    truth = pd.concat(
        [meta.loc[is_test, ["image_id"]].reset_index(drop=True), labels[is_test].reset_index(drop=True)], axis=1
    )
    return SimulatedStack(meta, folds, oof, test, truth)
