"""A synthetic mini-competition in the exact Kaggle layout, so the whole pipeline runs without a Kaggle account.

`stage_2_train/`, `stage_2_test/` (one DICOM per slice, named `<SOPInstanceUID>.dcm`, written in random order),
`stage_2_train.csv` (with a duplicated image, like the real file), `stage_2_sample_submission.csv` and
`stage_2_test_labels.csv`. The DICOMs carry realistic RSNA headers: both pixel-format variants, the corrupted
intercept variant, gantry tilt, implicit and explicit VR. Pixels are procedural head phantoms (`phantom.py`) with
3-D hemorrhages of the five subtypes; labels come from where the lesions were drawn. Some patients have two studies
(a follow-up scan of the same lesions), so only patient-grouped folds are leak-free.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..core.labels import LABELS
from ..core.errors import UserError, fix
from ..core.io import atomic_open, write_csv
from .phantom import SUBTYPES, Anatomy, Geometry, Lesion, Rendered, render, ventricle_masks
from .windows import apply_windows, named

STUDIES = 60  # 50 train + 10 test studies
SLICES = 30
SIZE = 128
TEST_FRACTION = 1 / 6
HEMORRHAGE_FRACTION = 0.4
FOLLOW_UP_FRACTION = 0.12  # share of studies that are a patient's second scan
SAMPLE_ORDER = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)  # Kaggle's row order
MARKER = ".synth.json"

# header variants: (BitsStored, PixelRepresentation, RescaleIntercept); 'corrupt12' is RSNA's broken intercept
VARIANTS = {"signed16": (16, 1, -1024.0), "unsigned12": (12, 0, -1024.0), "corrupt12": (12, 0, 0.0)}
VARIANT_CYCLE = [
    "signed16",
    "unsigned12",
    "corrupt12",
    "signed16",
    "unsigned12",
    "signed16",
    "unsigned12",
]  # 3+ studies: all three
WINDOW_HEADERS = [("30", "80"), ("40", "80"), (["36", "36"], ["80", "80"]), (["40", "40"], ["150", "150"])]


@dataclass
class Study:
    """Everything needed to render and write one study (one series), fixed by the plan's seed."""

    patient_id: str
    study_id: str
    series_id: str
    split: str  # train | test
    image_ids: list[str]  # in slice order (file names are these ids; disk order is random)
    geometry: Geometry
    anatomy: Anatomy
    lesions: list[Lesion] = field(default_factory=list)
    variant: str = "signed16"
    explicit_vr: bool = True
    window: tuple = ("40", "80")
    noise_seed: int = 0


def _hex_ids(rng: np.random.Generator, n: int, digits: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = f"ID_{int(rng.integers(0, 16**digits)):0{digits}x}"
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


def _surface_point(
    rng: np.random.Generator, inner: tuple[float, float, float], lateral: float, elev: tuple[float, float]
):
    """A point on the inner skull: azimuth near a side (lateral spread in radians), elevation as sin range."""
    phi = rng.choice([0.0, np.pi]) + rng.uniform(-lateral, lateral)
    se = rng.uniform(*elev)
    ce = np.sqrt(1 - se * se)
    return (inner[0] * ce * np.cos(phi), inner[1] * ce * np.sin(phi), inner[2] * se)


def _lesion(kind: str, rng: np.random.Generator, an: Anatomy) -> Lesion:
    a, b, c = an.axes
    inner = (a - an.skull, b - an.skull, c - an.skull)
    if kind == "epidural":
        return Lesion(
            kind,
            _surface_point(rng, inner, 1.0, (-0.1, 0.45)),
            radius=rng.uniform(18, 28),
            thickness=rng.uniform(8, 14),
            hu=rng.uniform(65, 85),
        )
    if kind == "subdural":
        return Lesion(
            kind,
            _surface_point(rng, inner, 1.2, (0.0, 0.55)),
            radius=rng.uniform(38, 60),
            thickness=rng.uniform(4, 9),
            hu=rng.uniform(55, 80),
            phase=rng.uniform(0, 6.28),
        )
    if kind == "intraparenchymal":
        for _ in range(50):  # keep the clot (and its edema) out of the ventricles
            fr, phi, h = rng.uniform(0.35, 0.62), rng.uniform(0, 2 * np.pi), rng.uniform(-0.05, 0.45)
            ring = np.sqrt(1 - h * h)
            center = (fr * inner[0] * ring * np.cos(phi), fr * inner[1] * ring * np.sin(phi), h * inner[2])
            radius = rng.uniform(7, 13)
            probe = [np.asarray([center[i] + d[i] * radius * 1.4 for d in _PROBE], np.float32) for i in range(3)]
            if not any(m.any() for m in ventricle_masks(probe, an)):
                break
        return Lesion(
            kind,
            center,
            radius=radius,
            hu=rng.uniform(62, 85),
            axes=tuple(rng.uniform(0.85, 1.3, 3).tolist()),
            phase=rng.uniform(0, 6.28),
        )
    if kind == "intraventricular":
        return Lesion(
            kind,
            (0.0, 0.0, 0.0),
            radius=float(rng.random() < 0.3),
            side=int(rng.choice([-1, 1])),
            level=rng.uniform(-10, 22),
            hu=rng.uniform(55, 75),
        )
    if kind == "subarachnoid":
        if rng.random() < 0.5:
            center = _surface_point(rng, inner, 1.4, (0.1, 0.6))
            return Lesion(kind, center, radius=rng.uniform(25, 40), hu=rng.uniform(50, 70))
        center = (rng.uniform(-8, 8), 10.0 + rng.uniform(-6, 6), -0.18 * c)
        return Lesion(kind, center, radius=rng.uniform(22, 32), hu=rng.uniform(50, 70))
    raise ValueError(kind)


_PROBE = np.concatenate(
    [
        np.zeros((1, 3)),
        np.eye(3),
        -np.eye(3),
        np.array([[s1, s2, s3] for s1 in (-1, 1) for s2 in (-1, 1) for s3 in (-1, 1)]) / np.sqrt(3),
    ]
)


def _geometry(rng: np.random.Generator, an: Anatomy, slices: int, size: int) -> Geometry:
    c = an.axes[2]
    tilt = rng.uniform(8, 25) if rng.random() < 0.4 else 0.0
    return Geometry(
        size=size,
        slices=slices,
        spacing=rng.uniform(220, 255) / size,
        dz=1.57 * c / max(slices - 1, 1),
        tilt_deg=tilt,
        yaw_deg=rng.uniform(-8, 8),
        head_center=(rng.uniform(-8, 8), rng.uniform(-15, 25), rng.uniform(40, 200)),
        first_offset=-0.55 * c,
        pan=(rng.uniform(-8, 8), rng.uniform(-8, 8)),
    )


def _anatomies(rng: np.random.Generator, n_patients: int) -> list[Anatomy]:
    """One head per patient: size, skull thickness, sulcal pattern, ventricle size."""
    return [
        Anatomy(
            axes=(rng.uniform(66, 76), rng.uniform(84, 96), rng.uniform(80, 90)),
            skull=rng.uniform(5.5, 8.0),
            sulci=int(rng.integers(12, 17)),
            sulcus_phase=rng.uniform(0, 6.28),
            sulcus_twist=rng.uniform(0.3, 0.9),
            vent_scale=rng.uniform(0.85, 1.25),
        )
        for _ in range(n_patients)
    ]


def _bleeds(rng: np.random.Generator, anatomies: list[Anatomy]) -> tuple[list[int], dict[int, list[Lesion]]]:
    """(the patients with a hemorrhage, in the order the subtypes were dealt, {patient: lesions}): subtypes cycle so
    that each appears in several studies; every other bleed has a second subtype."""
    n_patients = len(anatomies)
    bleeding = [int(p) for p in rng.permutation(n_patients)[: int(round(HEMORRHAGE_FRACTION * n_patients))]]
    kinds: dict[int, list[str]] = {p: [] for p in bleeding}
    order = list(rng.permutation(SUBTYPES))
    for i, p in enumerate(bleeding):
        kinds[p].append(order[i % len(order)])
        if i % 2 == 1:
            kinds[p].append(order[(i + 2) % len(order)])
    return bleeding, {p: [_lesion(k, rng, anatomies[p]) for k in ks] for p, ks in kinds.items()}


def _test_patients(
    rng: np.random.Generator, n_patients: int, bleeding: list[int], test_fraction: float | None
) -> set[int]:
    """The test split, by patient, with its share of bleeds."""
    n_test = max(1, int(round((TEST_FRACTION if test_fraction is None else test_fraction) * n_patients)))
    clean = [p for p in rng.permutation(n_patients).tolist() if p not in bleeding]
    n_test_hem = min(len(bleeding), int(round(n_test * HEMORRHAGE_FRACTION)))
    # bleeds 1..k of the subtype cycle: with k >= 4 the test set holds every subtype (primaries 1-4, seconds 3 and 0)
    test_hem = bleeding[1 : 1 + n_test_hem] if len(bleeding) > n_test_hem else bleeding[:n_test_hem]
    return set(test_hem) | set(clean[: n_test - n_test_hem])


def plan(
    seed: int = 0,
    studies: int | None = None,
    slices: int | None = None,
    size: int | None = None,
    test_fraction: float | None = None,
) -> list[Study]:
    """Every study of the competition (no pixels yet): ids, split, geometry, anatomy, lesions, header variant.
    `test_fraction` (default 1/6) is the share of patients in the test split: the demo raises it for steadier scores."""
    n = int(studies or STUDIES)
    slices = int(slices or SLICES)
    size = int(size or SIZE)
    if n < 2 or slices < 1 or size < 32:
        raise UserError(
            f"synthetic competition needs studies >= 2, slices >= 1 and size >= 32 (got {n}, {slices}, {size})"
        )
    rng = np.random.default_rng(seed)  # every draw below in a fixed order: a seed gives the same competition
    n_follow = int(round(FOLLOW_UP_FRACTION * n)) if n >= 6 else 0
    n_patients = n - n_follow
    taken: set[str] = set()
    patient_ids = _hex_ids(rng, n_patients, 8, taken)
    anatomies = _anatomies(rng, n_patients)
    bleeding, lesions = _bleeds(rng, anatomies)
    test = _test_patients(rng, n_patients, bleeding, test_fraction)
    follow_of = rng.choice(n_patients, size=n_follow, replace=False) if n_follow else np.array([], int)
    owners = list(range(n_patients)) + [int(p) for p in follow_of]  # follow-up scans last
    variants = [VARIANT_CYCLE[i] for i in rng.permutation(np.arange(n) % len(VARIANT_CYCLE))]
    explicit = rng.permutation(np.arange(n) % 2 == 0)
    out: list[Study] = []
    for i, p in enumerate(owners):
        les = lesions.get(p, [])
        if i >= n_patients:  # follow-up scan: same head and bleeds, a little resorbed
            les = [replace(l, radius=l.radius * 0.9, thickness=l.thickness * 0.85, hu=l.hu - 8.0) for l in les]
        study_id, series_id = _hex_ids(rng, 2, 10, taken)
        out.append(
            Study(
                patient_id=patient_ids[p],
                study_id=study_id,
                series_id=series_id,
                split="test" if p in test else "train",
                image_ids=_hex_ids(rng, slices, 9, taken),
                geometry=_geometry(rng, anatomies[p], slices, size),
                anatomy=anatomies[p],
                lesions=les,
                variant=variants[i],
                explicit_vr=bool(explicit[i]),
                window=WINDOW_HEADERS[int(rng.integers(len(WINDOW_HEADERS)))],
                noise_seed=int(rng.integers(2**31)),
            )
        )
    return out


def render_study(study: Study) -> Rendered:
    """Ground truth of one study in slice order: int16 HU exactly as stored in its DICOMs, lesion masks, labels."""
    return render(study.geometry, study.anatomy, study.lesions, study.noise_seed)


def generate(
    seed: int = 0, studies: int | None = None, slices: int | None = None, size: int | None = None
) -> Iterator[tuple[Study, Rendered]]:
    """(study, arrays) pairs before anything is written: the ground truth tests compare the files against."""
    for study in plan(seed, studies, slices, size):
        yield study, render_study(study)


def stored_pixels(hu: np.ndarray, variant: str) -> np.ndarray:
    """HU -> the raw pixel values a file of this header variant stores (inverse of the reader's rescale + fix)."""
    hu = hu.astype(np.int32)
    if variant == "signed16":
        return (hu + 1024).astype(np.int16)
    if variant == "unsigned12":
        return np.clip(hu + 1024, 0, 4095).astype(np.uint16)
    if variant == "corrupt12":  # reader: (raw + 1000) wrapping at 4096, intercept -1000  =>  raw = HU mod 4096
        return np.mod(hu, 4096).astype(np.uint16)
    raise ValueError(variant)


def _ds(values) -> list[str]:
    return [f"{v:.6f}" for v in values]


def _series_dataset(study: Study):
    """The header every slice of a series shares; `write_slices` fills in the per-slice elements."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    g = study.geometry
    bits, pixel_rep, intercept = VARIANTS[study.variant]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if study.explicit_vr else ImplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPInstanceUID = study.image_ids[0]
    ds.Modality = "CT"
    ds.PatientID = study.patient_id
    ds.StudyInstanceUID = study.study_id
    ds.SeriesInstanceUID = study.series_id
    ds.StudyID = ""
    ds.ImagePositionPatient = _ds(g.positions()[0])
    ds.ImageOrientationPatient = _ds(g.orientation())
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = g.size
    ds.PixelSpacing = _ds([g.spacing, g.spacing])
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = pixel_rep
    ds.WindowCenter, ds.WindowWidth = study.window
    ds.RescaleIntercept = f"{intercept:.0f}"
    ds.RescaleSlope = "1"
    ds.add_new(0x7FE00010, "OW", b"")
    return ds


def write_slices(folder: Path, study: Study, hu: np.ndarray, order) -> None:
    """Slices of one study as RSNA-style CT DICOMs `<SOPInstanceUID>.dcm`, written in the given (random) order.

    No private tags; RSNA's anonymised 'ID_...' UIDs are not valid UI values (the real files have them too),
    so pydicom's value validation is off while building them.
    """
    from pydicom import config
    from pydicom.uid import generate_uid

    positions = study.geometry.positions()
    dtype = "<u2" if VARIANTS[study.variant][1] == 0 else "<i2"
    raw = stored_pixels(hu, study.variant).astype(dtype)
    with config.disable_value_validation():
        ds = _series_dataset(study)
        for k in order:
            image_id = study.image_ids[k]
            ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[image_id])
            ds.SOPInstanceUID = image_id
            ds.ImagePositionPatient = _ds(positions[k])
            ds.PixelData = raw[k].tobytes()
            ds.save_as(folder / f"{image_id}.dcm", enforce_file_format=True)


def _long(image_ids: list[str], labels: np.ndarray) -> pd.DataFrame:
    cols = [LABELS.index(s) for s in SAMPLE_ORDER]
    ids = [f"{i}_{s}" for i in image_ids for s in SAMPLE_ORDER]
    return pd.DataFrame({"ID": ids, "Label": labels[:, cols].reshape(-1).astype(np.int64)})


# `make demo`'s competition: 96 studies of 16 slices, 37 % of patients in the test split: 31 test studies (~500 test
# images), 65 train studies
DEMO = {"seed": 0, "studies": 96, "slices": 16, "test_fraction": 0.37}


def _params(seed: int, studies: int | None, slices: int | None, size: int | None, test_fraction: float | None) -> dict:
    """What the marker file records: a folder with the same parameters is this competition already."""
    params = {
        "seed": seed,
        "studies": int(studies or STUDIES),
        "slices": int(slices or SLICES),
        "size": int(size or SIZE),
        "version": 1,
    }
    if test_fraction is not None:
        if not 0.0 < test_fraction < 1.0:
            raise UserError(f"synthetic competition needs 0 < test_fraction < 1 (got {test_fraction})")
        params["test_fraction"] = float(test_fraction)
    return params


def _already_written(out: Path, params: dict) -> bool:
    """True when `out` holds this competition; stops where it holds anything else (never overwritten)."""
    marker = out / MARKER
    if marker.exists():
        return json.loads(marker.read_text()) == params  # ours: the same one, or another of ours to rewrite
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give `{fix('synth --out', 'make synth DATA_DIR=')}` a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(
            f"{out} exists and was not written by `synth`; choose an empty or new folder for the synthetic competition"
        )
    return False


Labels = dict[str, list[tuple[list[str], np.ndarray]]]  # split -> (image ids, labels) per study


def _write_studies(folder: Path, studies: list[Study], rng: np.random.Generator) -> Labels:
    """Every study's DICOMs under `folder`/stage_2_{train,test}, files landing on disk in random order."""
    labels: Labels = {"train": [], "test": []}
    for study in tqdm(studies, desc="synth studies", unit="study", leave=False, disable=None):
        r = render_study(study)
        split_dir = folder / ("stage_2_train" if study.split == "train" else "stage_2_test")
        write_slices(split_dir, study, r.hu, rng.permutation(len(study.image_ids)))
        labels[study.split].append((study.image_ids, r.labels))
    return labels


def _write_label_files(folder: Path, labels: Labels, rng: np.random.Generator) -> None:
    """stage_2_train.csv (rows shuffled, a few duplicated as in the real file), stage_2_test_labels.csv and
    stage_2_sample_submission.csv (every label 0.5)."""
    for split in ("train", "test"):
        ids = [i for chunk, _ in labels[split] for i in chunk]
        lab = np.concatenate([l for _, l in labels[split]]) if labels[split] else np.zeros((0, len(LABELS)), np.int8)
        perm = rng.permutation(len(ids))
        long = _long([ids[i] for i in perm], lab[perm])
        if split == "train":
            long = pd.concat([long, long.iloc[6:12]], ignore_index=True)  # the real stage_2_train.csv has duplicates
            write_csv(long, folder / "stage_2_train.csv")
        else:
            write_csv(long, folder / "stage_2_test_labels.csv")
            write_csv(long.assign(Label=0.5), folder / "stage_2_sample_submission.csv")


def write_competition(
    out: str | Path,
    seed: int = 0,
    studies: int | None = None,
    slices: int | None = None,
    size: int | None = None,
    test_fraction: float | None = None,
) -> Path:
    """Write the synthetic competition to `out` (atomically: built beside it, then moved in place).

    Rerunning with the same parameters is instant; a folder that holds other data is never overwritten.
    """
    out = Path(out)
    params = _params(seed, studies, slices, size, test_fraction)
    if _already_written(out, params):
        return out
    tmp = out.parent / f".{out.name}.synth-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "stage_2_train").mkdir(parents=True)
    (tmp / "stage_2_test").mkdir()
    rng = np.random.default_rng([seed, 1])  # file order and label-row order: apart from the plan's draws
    labels = _write_studies(tmp, plan(seed, studies, slices, size, test_fraction), rng)
    _write_label_files(tmp, labels, rng)
    with atomic_open(tmp / MARKER) as f:
        json.dump(params, f)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def preview_png(data_dir: str | Path, out_png: str | Path, per_row: int = 3) -> Path:
    """A grid of windowed slices read back through the toolkit's DICOM reader: one row per subtype plus a normal row,
    `per_row` studies each (brain window), and the first example again in the subdural window. Titles are the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.io import atomic_path
    from . import dicom
    from ..core.labels import read_labels

    data_dir = Path(data_dir)
    labels = read_labels(data_dir / "stage_2_train.csv")
    rows = []
    for path in sorted((data_dir / "stage_2_train").glob("*.dcm")):
        h = dicom.read_header(path)
        ipp, iop = np.asarray(h["ImagePositionPatient"]), np.asarray(h["ImageOrientationPatient"])
        rows.append(
            {
                "image_id": path.stem,
                "series": h["SeriesInstanceUID"],
                "z": float(ipp @ np.cross(iop[:3], iop[3:])),
                "path": path,
            }
        )
    frame = pd.DataFrame(rows).merge(labels, on="image_id")
    frame["rank"] = frame.groupby("series")["z"].rank(method="first")
    picks: list[tuple[str, list[pd.Series]]] = []
    for kind in ("none", *SUBTYPES):
        if kind == "none":
            mask = (frame["any"] == 0) & (frame.groupby("series")["any"].transform("max") == 0)
            cand = frame[mask & (frame["rank"].between(8, 16) | (frame["rank"] == frame["rank"].median()))]
        else:
            cand = frame[frame[kind] == 1]
        examples = []
        for _, grp in cand.groupby("series"):
            grp = grp.sort_values("z")
            examples.append(grp.iloc[len(grp) // 2])  # the middle of the lesion's run of slices
            if len(examples) == per_row:
                break
        picks.append((kind, examples))
    fig, axes = plt.subplots(len(picks), per_row + 1, figsize=(2.6 * (per_row + 1), 2.8 * len(picks)))
    for r, (kind, examples) in enumerate(picks):
        for col in range(per_row + 1):
            ax = axes[r, col]
            ax.axis("off")
            if not examples or col >= len(examples) and col < per_row:
                continue
            src = examples[col] if col < per_row else examples[0]
            (window,) = named(["subdural" if col == per_row else "brain"])
            img = apply_windows(dicom.read_hu(src["path"]), [window])[..., 0]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            positive = [l for l in LABELS[1:] if src[l] == 1]
            title = ", ".join(positive) if positive else "no hemorrhage"
            ax.set_title(title + (" (subdural w.)" if col == per_row else ""), fontsize=7)
    fig.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return Path(out_png)
