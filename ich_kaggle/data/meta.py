"""Header scan -> `meta.csv`: one row per readable slice with its patient/study/series and its place in the series.

Headers only (pixels are never decoded here), chunked over a process pool. Files that cannot give a CT slice
(truncated, not DICOM, colour, no pixels, no patient/series tags, a symlink loop) go to `skipped.csv` (path, reason)
and the scan goes on. meta.csv is kept fresh by its manifest (the digest of the DICOM listing, `data.inputs`):
`load_meta` rescans only the files added or changed since (and drops removed ones), then re-ranks every series.
The slice order is computed by `order_slices`, a pure function over a header table, so it can also be run on
header tables from elsewhere (see `frame_from_headers`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core import manifest, scope
from ..core.errors import UserError
from ..core.io import cannot_write, write_csv
from ..core.layout import Layout
from . import dicom, inputs, pool

log = logging.getLogger(__name__)

COLUMNS = [
    "image_id",
    "patient_id",
    "study_id",
    "series_id",
    "split",
    "path",
    "z",
    "slice_rank",
    "series_len",
    "rows",
    "cols",
    "pixel_spacing",
    "bits_stored",
    "pixel_representation",
    "intercept",
    "slope",
    "instance_number",
    "ipp_x",
    "ipp_y",
    "ipp_z",
    "window_center",
    "window_width",
    "bits_allocated",
    "slice_thickness",
    "modality",
    "transfer_syntax",
]
ID_COLUMNS = ["image_id", "patient_id", "study_id", "series_id", "split", "path"]
REQUIRED = {"PatientID": "patient_id", "StudyInstanceUID": "study_id", "SeriesInstanceUID": "series_id"}
CHUNK = 256
VERSION = 2  # of meta.csv's columns and header checks: a meta.csv of another version is rescanned in full
IN_PROCESS_BELOW = 4096  # a process pool costs ~1-3 s to start: smaller scans run in-process
WORKER_DIED = pool.WORKER_DIED
_IOP_ROW = ["iop0", "iop1", "iop2", "iop3", "iop4", "iop5"]


def _first(v: Any) -> Any:
    if isinstance(v, list):
        return v[0] if v else None
    return v


def _vec(v: Any, n: int) -> list[float]:
    if isinstance(v, list) and len(v) >= n:
        return [float(x) for x in v[:n]]
    return [np.nan] * n


def header_row(rel_path: str, split: str, h: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """A meta row (with raw iop0..5 for `order_slices`) from a header dict, or the reason to skip it."""
    for tag in REQUIRED:
        if not h.get(tag):
            return None, f"missing tag {tag}"
    ipp = _vec(h.get("ImagePositionPatient"), 3)
    iop = _vec(h.get("ImageOrientationPatient"), 6)
    slope, intercept, _ = dicom.rescale_params(h)
    row = {
        "image_id": Path(rel_path).stem,
        "patient_id": h["PatientID"],
        "study_id": h["StudyInstanceUID"],
        "series_id": h["SeriesInstanceUID"],
        "split": split,
        "path": rel_path,
        "rows": h.get("Rows"),
        "cols": h.get("Columns"),
        "pixel_spacing": _first(h.get("PixelSpacing")),
        "bits_stored": h.get("BitsStored"),
        "pixel_representation": h.get("PixelRepresentation"),
        "intercept": intercept,
        "slope": slope,
        "instance_number": h.get("InstanceNumber"),
        "ipp_x": ipp[0],
        "ipp_y": ipp[1],
        "ipp_z": ipp[2],
        "window_center": _first(h.get("WindowCenter")),
        "window_width": _first(h.get("WindowWidth")),
        "bits_allocated": h.get("BitsAllocated"),
        "slice_thickness": h.get("SliceThickness"),
        "modality": h.get("Modality"),
        "transfer_syntax": h.get("TransferSyntaxUID"),
    }
    row.update(zip(_IOP_ROW, iop))
    return row, None


Reader = Callable[[str], tuple[dicom.Parsed, str | None]]
Result = tuple[list[dict[str, Any]], list[tuple[str, str]]]


def _scan_items(data_dir: str, reader: Reader, items: list[tuple[str, str]]) -> Result:
    """(meta rows, skipped (path, reason)) of the (path, split) items: a chunk of the scan, in a pool worker."""
    rows, skipped = [], []
    for rel, split in items:
        try:
            parsed, reason = reader(os.path.join(data_dir, rel))
        except dicom.SourceUnreadable as e:  # never recorded as a bad DICOM: the stage stops, a rerun retries it
            raise UserError(
                f"cannot read {e.filename} ({e.strerror}); fix its permissions or the disk, then rerun "
                f"(nothing was recorded as a bad DICOM)"
            ) from None
        except dicom.DicomError as e:
            reason = e.reason
        except Exception as e:  # a reader bug costs one file, never a scan of 874k: skipped, with the error named
            reason = f"reader error ({type(e).__name__}: {e})"
        else:
            if reason is None:
                row, reason = header_row(rel, split, parsed.header)
                if row is not None:
                    rows.append(row)
        if reason is not None:
            skipped.append((rel, reason))
    return rows, skipped


def scan_files(
    data_dir: Path,
    items: list[tuple[str, str]],
    workers: int | None = None,
    desc: str = "headers",
    reader: Reader | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scan headers in parallel -> (meta rows with z, not yet ranked; skipped frame with path, reason).

    `reader` (path -> (header, reason)) is the DICOM reader, a module-level function so workers can import it."""
    reader = reader or dicom.scan  # looked up per call, not bound at import
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []

    def collect(result: Result) -> None:
        rows.extend(result[0])
        skipped.extend(result[1])

    pool.run(
        partial(_scan_items, str(data_dir), reader),
        items,
        chunk=CHUNK,
        workers=max(1, workers or os.cpu_count() or 1),
        in_process_below=IN_PROCESS_BELOW,
        collect=collect,
        crashed=lambda item: ([], [(item[0], WORKER_DIED)]),
        desc=desc,
    )
    skipped.sort()
    frame = pd.DataFrame(
        rows, columns=COLUMNS[:6] + [c for c in COLUMNS[6:] if c not in ("z", "slice_rank", "series_len")] + _IOP_ROW
    )
    return add_z(frame), pd.DataFrame(skipped, columns=["path", "reason"])


def slice_z(ipp: np.ndarray, iop: np.ndarray, instance: np.ndarray | None = None) -> np.ndarray:
    """Position along the series normal: dot(IPP, row_cos x col_cos).

    Falls back to IPP[2] where the orientation is missing or degenerate, then to InstanceNumber, else NaN.
    """
    ipp = np.asarray(ipp, dtype=np.float64).reshape(-1, 3)
    iop = np.asarray(iop, dtype=np.float64).reshape(-1, 6)
    normal = np.cross(iop[:, :3], iop[:, 3:])
    z = np.einsum("ij,ij->i", ipp, normal)
    bad = ~np.isfinite(z) | (np.linalg.norm(np.nan_to_num(normal), axis=1) < 1e-6)
    z[bad] = ipp[bad, 2]
    if instance is not None:
        inst = np.asarray(instance, dtype=np.float64)
        missing = ~np.isfinite(z)
        z[missing] = inst[missing]
    return z


def order_slices(frame: pd.DataFrame) -> pd.DataFrame:
    """Add z, slice_rank (0..n-1 within series) and series_len; drop iop0..5. Sorted by study, series, rank.

    Needs image_id, series_id, ipp_x/y/z, iop0..5 and optionally instance_number. Ties in z (duplicate
    positions) and missing positions are broken by InstanceNumber, then image_id, so the order is stable.
    """
    return rank_slices(add_z(frame))


def add_z(frame: pd.DataFrame) -> pd.DataFrame:
    """Add z (a property of each slice alone, so rows scanned at different times combine) and drop iop0..5."""
    df = frame.copy()
    if "instance_number" not in df:
        df["instance_number"] = np.nan
    df["instance_number"] = pd.to_numeric(df["instance_number"], errors="coerce")
    ipp = df[["ipp_x", "ipp_y", "ipp_z"]].to_numpy(dtype=np.float64, na_value=np.nan)
    iop = df[_IOP_ROW].to_numpy(dtype=np.float64, na_value=np.nan)
    df["z"] = slice_z(ipp, iop, df["instance_number"].to_numpy(dtype=np.float64, na_value=np.nan))
    return df.drop(columns=_IOP_ROW)


def rank_slices(frame: pd.DataFrame) -> pd.DataFrame:
    """(Re)compute slice_rank and series_len from z over all rows; sorted by study, series, rank."""
    df = frame.drop(columns=[c for c in ("slice_rank", "series_len") if c in frame])
    df["instance_number"] = pd.to_numeric(df["instance_number"], errors="coerce")
    df = df.sort_values(["series_id", "z", "instance_number", "image_id"], na_position="last", kind="mergesort")
    groups = df.groupby("series_id", sort=False)
    df["slice_rank"] = groups.cumcount().astype(np.int64)
    df["series_len"] = groups["image_id"].transform("size").astype(np.int64)
    sort_cols = ["study_id", "series_id", "slice_rank"] if "study_id" in df else ["series_id", "slice_rank"]
    df = df.sort_values(sort_cols, kind="mergesort").reset_index(drop=True)
    order = [c for c in COLUMNS if c in df] + [c for c in df if c not in COLUMNS]
    return df[order]


def _parse_list_column(s: pd.Series, n: int) -> np.ndarray:
    """pydicom's str() of a MultiValue ("['1.0', '0.0']" or "[1.0, 0.0]") -> (N, n) float array."""
    clean = s.astype("string").str.replace(r"[\[\]'\" ]", "", regex=True)
    parts = clean.str.split(",", expand=True)
    out = np.full((len(s), n), np.nan)
    if parts.shape[1] >= n:
        out[:] = parts.iloc[:, :n].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return out


def frame_from_headers(headers: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """A meta-style frame (z, slice_rank, series_len, ...) from a table of DICOM headers written by pydicom
    (columns named by DICOM keyword, e.g. the shared `stage_1_test_dicom_headers.csv.gz`)."""
    df = pd.DataFrame(
        {
            "image_id": headers["SOPInstanceUID"].astype(str),
            "patient_id": headers["PatientID"].astype(str),
            "study_id": headers["StudyInstanceUID"].astype(str),
            "series_id": headers["SeriesInstanceUID"].astype(str),
            "split": split,
        }
    )
    df["path"] = f"stage_2_{split}/" + df["image_id"] + ".dcm"
    ipp = _parse_list_column(headers["ImagePositionPatient"], 3)
    df["ipp_x"], df["ipp_y"], df["ipp_z"] = ipp[:, 0], ipp[:, 1], ipp[:, 2]
    iop = _parse_list_column(headers["ImageOrientationPatient"], 6)
    for i, col in enumerate(_IOP_ROW):
        df[col] = iop[:, i]
    simple = {
        "Rows": "rows",
        "Columns": "cols",
        "BitsStored": "bits_stored",
        "BitsAllocated": "bits_allocated",
        "PixelRepresentation": "pixel_representation",
        "RescaleIntercept": "intercept",
        "RescaleSlope": "slope",
        "InstanceNumber": "instance_number",
        "Modality": "modality",
    }
    for src, dst in simple.items():
        if src in headers:
            df[dst] = headers[src].to_numpy()
    if "PixelSpacing" in headers:
        df["pixel_spacing"] = _parse_list_column(headers["PixelSpacing"], 2)[:, 0]
    return order_slices(df)


def build_meta(layout: Layout, out: str | Path | None = None, workers: int | None = None) -> pd.DataFrame:
    """Scan every DICOM of the data folder into meta.csv (+ skipped.csv), a full rescan; print what was skipped."""
    layout.require_data()
    out = Path(out) if out else layout.meta_csv
    if out == layout.meta_csv:
        return _refresh(layout, workers, reuse=False)
    t0 = time.perf_counter()
    listing, unreadable = inputs.list_inputs(layout)
    meta, skipped = _scan(layout, listing, unreadable, workers)
    skipped_path = out.with_name(f"{out.stem}_skipped.csv")
    _write(meta, out)
    _write(skipped, skipped_path)
    _report(meta, skipped, out, skipped_path, time.perf_counter() - t0)
    return meta


def load_meta(layout: Layout, workers: int | None = None) -> pd.DataFrame:
    """meta.csv of this layout; scanned first where DICOMs were added, removed or changed since it was made.

    Without the DICOM folders (a work folder copied elsewhere) an existing meta.csv is used as it is. Once per
    command (`core.scope`).
    """
    return scope.resolved(("meta", str(layout.work.resolve())), lambda: _load_meta(layout, workers))


def _load_meta(layout: Layout, workers: int | None) -> pd.DataFrame:
    has_dicoms = layout.train_dir.is_dir() or layout.test_dir.is_dir()
    if layout.meta_csv.exists() and not has_dicoms:
        return read_meta(layout.meta_csv)
    layout.require_data()
    listing, unreadable = inputs.list_inputs(layout)
    if layout.meta_csv.exists() and manifest.is_fresh(layout.meta_csv, _expected(listing)):
        return read_meta(layout.meta_csv)
    return _refresh(layout, workers, reuse=True, listing=(listing, unreadable))


def read_meta(path: str | Path) -> pd.DataFrame:
    """Read a meta.csv with ids kept as strings."""
    return pd.read_csv(path, dtype={c: str for c in ID_COLUMNS})


def _expected(listing: pd.DataFrame) -> dict:
    return manifest.make("meta", VERSION, inputs={"dicoms": inputs.digest(listing)})


def _previous(layout: Layout) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None:
    """(meta, skipped, listing) of the last scan, or None where there is none of this version to build on."""
    found = manifest.read(layout.meta_csv)
    if (
        found is None
        or found.get("version") != VERSION
        or not layout.meta_inputs.exists()
        or not layout.skipped_csv.exists()
    ):
        return None
    try:
        return (
            read_meta(layout.meta_csv),
            pd.read_csv(layout.skipped_csv, dtype=str),
            inputs.read_listing(layout.meta_inputs),
        )
    except (OSError, ValueError):
        return None


def _refresh(
    layout: Layout, workers: int | None, reuse: bool, listing: tuple[pd.DataFrame, list[tuple[str, str]]] | None = None
) -> pd.DataFrame:
    """Write meta.csv, skipped.csv and their manifest; with `reuse`, rescan only what changed since the last scan."""
    t0 = time.perf_counter()
    files, unreadable = listing if listing is not None else inputs.list_inputs(layout)
    previous = _previous(layout) if reuse else None
    if previous is None:
        if reuse and layout.meta_csv.exists():
            log.info(f"meta: {layout.meta_csv} was made by another version (no manifest); rescanning every DICOM")
        todo, kept_meta, kept_skipped = files, None, None
    else:
        old_meta, old_skipped, old_files = previous
        new = inputs.changed(files, old_files)
        todo = files.loc[new]
        kept = set(files.loc[~new, "path"])
        n_changed = int(todo["path"].isin(old_files["path"]).sum())
        n_removed = len(set(old_files["path"]) - set(files["path"]))
        log.info(
            f"meta: {len(todo) - n_changed} DICOM(s) added, {n_changed} changed, {n_removed} removed since "
            f"{layout.meta_csv} was made; scanning {len(todo)}"
        )
        kept_meta = old_meta.loc[old_meta["path"].isin(kept)]
        kept_skipped = old_skipped.loc[old_skipped["path"].isin(kept)]
    meta, skipped = _scan(layout, todo, unreadable, workers, kept_meta, kept_skipped)
    scope.forget("meta", "folds")  # what this command resolved from the former meta.csv
    _write(meta, layout.meta_csv)
    _write(skipped, layout.skipped_csv)
    _write(files, layout.meta_inputs)
    try:
        manifest.write(layout.meta_csv, _expected(files))  # last: an interrupted refresh leaves meta.csv stale
    except OSError as e:
        raise cannot_write(manifest.path_of(layout.meta_csv), e) from None
    _report(meta, skipped, layout.meta_csv, layout.skipped_csv, time.perf_counter() - t0)
    return meta


def _scan(
    layout: Layout,
    todo: pd.DataFrame,
    unreadable: list[tuple[str, str]],
    workers: int | None,
    kept_meta: pd.DataFrame | None = None,
    kept_skipped: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scan `todo`'s headers and rank every series over the new and the kept rows -> (meta, skipped)."""
    rows, skipped = scan_files(
        layout.data, list(todo[["path", "split"]].itertuples(index=False, name=None)), workers=workers
    )
    if kept_meta is not None and len(kept_meta):
        rows = (
            pd.concat([kept_meta, rows.astype({c: str for c in ID_COLUMNS})], ignore_index=True)
            if len(rows)
            else kept_meta
        )
    parts = [
        p
        for p in (kept_skipped, skipped, pd.DataFrame(unreadable, columns=["path", "reason"]))
        if p is not None and len(p)
    ]
    skipped = pd.concat(parts, ignore_index=True) if parts else skipped
    return rank_slices(rows), skipped.sort_values("path", kind="mergesort").reset_index(drop=True)


def _write(df: pd.DataFrame, path: Path) -> None:
    try:
        write_csv(df, path)
    except OSError as e:
        raise cannot_write(path, e) from None


def _report(meta: pd.DataFrame, skipped: pd.DataFrame, out: Path, skipped_path: Path, seconds: float) -> None:
    n_train = int((meta["split"] == "train").sum())
    log.info(
        f"meta: {len(meta)} slices ({n_train} train, {len(meta) - n_train} test) "
        f"in {meta['series_id'].nunique()} series "
        f"of {meta['patient_id'].nunique()} patients, {seconds:.1f}s -> {out}"
    )
    if len(skipped):
        log.info(f"skipped {len(skipped)} file(s) (listed in {skipped_path}):")
        for path, reason in skipped.head(50).itertuples(index=False):
            log.info(f"  {path}: {reason}")
        if len(skipped) > 50:
            log.info(f"  ... and {len(skipped) - 50} more")
