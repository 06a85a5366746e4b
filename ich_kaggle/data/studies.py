"""Any set of DICOM inputs -> studies and series of axial CT slices, in order, and what was skipped and why.

`infer`, `evaluate` and the web app take what a user has: single files, folders nested to any depth with any names
(a PACS export, a CD's DICOMDIR tree), `.zip` files. `collect` reads each file's header once (the project's strict
fast reader, pydicom where it must: `data.dicom.scan`), groups the slices by StudyInstanceUID and
SeriesInstanceUID and orders them along the slice normal exactly as `meta.csv` is ordered (`meta.order_slices`),
so a slice's neighbours (2.5D) and its place in the series (the second stage) are the ones the training saw.

What cannot be a slice of an axial head CT is listed with a reason and left out, never guessed at: files that are
not DICOM or do not decode, other modalities, localizers (scouts), sagittal/coronal reformats, multi-frame or
colour images, and series of one slice (no neighbours, no sequence to place it in).

Zips are extracted into a folder the caller gives (the job's folder in the web app): names with `..`, absolute
names and links are refused, as are archives whose declared size, entry count or compression ratio exceed the
limits below (zip bombs); the extracted bytes are counted as they are written, whatever the archive declares.
"""

from __future__ import annotations

import logging
import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from ..core.errors import UserError
from . import dicom
from .meta import header_row, order_slices

log = logging.getLogger(__name__)

MAX_ZIP_BYTES = 8 * 2**30  # extracted size of all zips together (a head CT study is 50-500 MB)
MAX_ZIP_ENTRIES = 100_000
MAX_ZIP_RATIO = 200  # uncompressed / compressed per entry; DICOM pixels compress ~2-4x, a bomb ~1000x
AXIAL_MIN_COS = 0.7  # |slice normal . patient z| below this (tilt over ~45 degrees): a sagittal or coronal image
SKIP_NAMES = {"DICOMDIR"}  # the index of a DICOM CD: not an image


@dataclass
class Collection:
    """Slices grouped by study and series, in order, and the inputs left out.

    `slices`: one row per usable slice, sorted by study, series, slice_rank, with image_id (the SOPInstanceUID),
    study_id, series_id, patient_id, path (absolute), z (position along the slice normal), slice_rank, series_len,
    instance_number and the other `meta.csv` columns: the frame `predict` reads images by.
    `skipped`: path, reason."""

    slices: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "reason"]))

    @property
    def studies(self) -> list[str]:
        return list(dict.fromkeys(self.slices["study_id"]))

    def series(self, study_id: str | None = None) -> list[str]:
        s = self.slices if study_id is None else self.slices[self.slices["study_id"] == study_id]
        return list(dict.fromkeys(s["series_id"]))


def _is_zip(path: Path) -> bool:
    return path.suffix.lower() == ".zip" or (
        path.is_file() and zipfile.is_zipfile(path) and not path.name.lower().endswith(".dcm")
    )


def safe_extract(archive: Path, dest: Path, budget: list[int] | None = None) -> list[Path]:
    """Extract `archive` under `dest` (refusing `..`, absolute names, links and bombs); returns the files written.

    `budget`: [bytes left] shared by several archives. Raises UserError naming the archive and the rule it broke."""
    budget = budget if budget is not None else [MAX_ZIP_BYTES]
    dest = dest.resolve()
    out: list[Path] = []
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{archive}: not a readable zip file ({e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise UserError(f"{archive}: {len(infos)} entries, more than the limit of {MAX_ZIP_ENTRIES}")
        declared = sum(i.file_size for i in infos)
        if declared > budget[0]:
            raise UserError(
                f"{archive}: {declared / 2**20:.0f} MB uncompressed, more than the "
                f"{budget[0] / 2**20:.0f} MB left of the limit"
            )
        for info in infos:
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
                raise UserError(
                    f"{archive}: unsafe name {info.filename!r} (absolute or with '..'); nothing of it was used"
                )
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UserError(f"{archive}: {info.filename!r} is a symbolic link; links are not extracted")
            if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO and info.file_size > 2**20:
                raise UserError(
                    f"{archive}: {info.filename!r} expands {info.file_size / info.compress_size:.0f}x "
                    f"(over {MAX_ZIP_RATIO}x): refused as a zip bomb"
                )
        for info in infos:
            if info.is_dir():
                continue
            target = dest.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
            if dest not in target.resolve().parents:
                raise UserError(f"{archive}: {info.filename!r} would be written outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    budget[0] -= len(chunk)
                    if budget[0] < 0:
                        raise UserError(
                            f"{archive}: extracts to more than the {MAX_ZIP_BYTES / 2**20:.0f} MB "
                            f"limit (it declared less): refused as a zip bomb"
                        )
                    dst.write(chunk)
            out.append(target)
    return out


def expand(paths: list[Path], extract_to: Path | None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every file under the given paths (zips extracted into `extract_to`), and the inputs that do not exist."""
    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    budget = [MAX_ZIP_BYTES]
    n_zip = 0

    def add(path: Path) -> None:
        nonlocal n_zip
        if _is_zip(path):
            if extract_to is None:
                raise UserError(f"{path}: a zip file needs a folder to extract into (extract_to)")
            n_zip += 1
            sub = Path(extract_to) / f"zip{n_zip}_{path.stem[:40]}"
            for f in sorted(safe_extract(path, sub, budget)):
                files.append(f)
        else:
            files.append(path)

    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, names in os.walk(p, followlinks=False):
                dirs.sort()
                for n in sorted(names):
                    f = Path(root) / n
                    if f.is_file():
                        add(f)
        elif p.is_file():
            add(p)
        else:
            missing.append((str(p), "not found"))
    return files, missing


def _is_localizer(path: Path, header: dict) -> bool:
    """ImageType holds LOCALIZER (scouts; the fast reader does not read ImageType, so pydicom reads that tag)."""
    import warnings

    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ImageType"], force=True)
        value = ds.get("ImageType")
    except Exception:
        return False
    if value is None:
        return False
    parts = [value.upper()] if isinstance(value, str) else [str(v).upper() for v in value]
    return "LOCALIZER" in parts or "SCOUT" in parts


def _axial_reason(h: dict) -> str | None:
    iop = h.get("ImageOrientationPatient")
    if not isinstance(iop, list) or len(iop) < 6:
        return None  # unknown orientation: ordered by position / instance number as meta.csv does
    v = np.asarray(iop[:6], dtype=np.float64)
    normal = np.cross(v[:3], v[3:])
    norm = float(np.linalg.norm(normal))
    if not np.isfinite(norm) or norm < 1e-6:
        return None
    cos = abs(normal[2]) / norm
    if cos < AXIAL_MIN_COS:
        return (
            f"not an axial image (slice normal {np.degrees(np.arccos(min(cos, 1.0))):.0f} degrees from the head's axis)"
        )
    return None


def collect(paths: list[Path], extract_to: Path | None = None) -> Collection:
    """Group DICOM files, folders at any depth and .zip files (extracted under `extract_to`) into ordered series.

    Raises UserError (one line) when no usable slice is left, naming the most common reason."""
    files, skipped = expand([Path(p) for p in paths], extract_to)
    rows = []
    for f in files:
        if f.name in SKIP_NAMES:
            skipped.append((str(f), "DICOMDIR index, not an image"))
            continue
        try:
            parsed, reason = dicom.scan(f)
        except dicom.SourceUnreadable as e:
            raise UserError(
                f"cannot read {e.filename} ({e.strerror}); fix its permissions or the disk and rerun"
            ) from None
        except dicom.DicomError as e:
            skipped.append((str(f), f"unreadable: {e.reason}"))
            continue
        except Exception as e:  # a reader bug costs one file
            skipped.append((str(f), f"unreadable: {type(e).__name__}: {e}"))
            continue
        h = parsed.header
        if reason is not None:
            skipped.append((str(f), reason))
            continue
        if h.get("Modality") is None:
            skipped.append((str(f), "no Modality tag; need a CT image"))
            continue
        reason = _axial_reason(h)
        if reason is None and _is_localizer(f, h):
            reason = "localizer (scout) image"
        if reason is not None:
            skipped.append((str(f), reason))
            continue
        if not h.get("PatientID"):
            h = {**h, "PatientID": "unknown"}
        row, reason = header_row(str(f.resolve()), "test", h)
        if row is None:
            skipped.append((str(f), reason))
            continue
        row["image_id"] = str(h.get("SOPInstanceUID") or f.stem)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if len(frame):
        dup = frame["image_id"].duplicated()
        for p in frame.loc[dup, "path"]:
            skipped.append((p, "duplicate SOPInstanceUID (the same slice given twice)"))
        frame = frame[~dup]
        sizes = frame.groupby("series_id")["image_id"].transform("size")
        for p in frame.loc[sizes < 2, "path"]:
            skipped.append((p, "series of one slice (needs at least 2 slices)"))
        frame = frame[sizes >= 2]
    skipped_frame = pd.DataFrame(skipped, columns=["path", "reason"])
    if not len(frame):
        top = skipped_frame["reason"].value_counts().index[0] if len(skipped_frame) else "no file found"
        raise UserError(
            f"no axial CT series in {', '.join(str(p) for p in paths[:3])}"
            f"{' ...' if len(paths) > 3 else ''} ({len(skipped_frame)} file(s) skipped, mostly: {top})"
        )
    slices = order_slices(frame.reset_index(drop=True))
    log.info(
        f"collect: {len(slices)} slices in {slices['series_id'].nunique()} series of "
        f"{slices['study_id'].nunique()} studies; {len(skipped_frame)} input(s) skipped"
    )
    return Collection(slices, skipped_frame)
