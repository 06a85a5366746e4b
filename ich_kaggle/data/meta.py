"""Header scan -> `meta.csv`: one row per readable slice with its patient/study/series and its place in the series.

Headers only (pixels are never decoded here), chunked over a process pool. Files that cannot give a CT slice
(truncated, not DICOM, colour, no pixels, no patient/series tags) go to `skipped.csv` (path, reason) and the scan
goes on. The slice order is computed by `order_slices`, a pure function over a header table, so it can also be
run on header tables from elsewhere (see `frame_from_headers`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..core.io import write_csv
from ..core.layout import Layout
from . import dicom

COLUMNS = [
    "image_id", "patient_id", "study_id", "series_id", "split", "path", "z", "slice_rank", "series_len",
    "rows", "cols", "pixel_spacing", "bits_stored", "pixel_representation", "intercept", "slope",
    "instance_number", "ipp_x", "ipp_y", "ipp_z", "window_center", "window_width", "bits_allocated",
    "slice_thickness", "modality", "transfer_syntax",
]
ID_COLUMNS = ["image_id", "patient_id", "study_id", "series_id", "split", "path"]
REQUIRED = {"PatientID": "patient_id", "StudyInstanceUID": "study_id", "SeriesInstanceUID": "series_id"}
CHUNK = 256
IN_PROCESS_BELOW = 4096  # a process pool costs ~1-3 s to start: smaller scans run in-process
WORKER_DIED = "the scan's worker process died reading this file (a crash or the out-of-memory killer); the rest went on"
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
        "image_id": Path(rel_path).stem, "patient_id": h["PatientID"], "study_id": h["StudyInstanceUID"],
        "series_id": h["SeriesInstanceUID"], "split": split, "path": rel_path,
        "rows": h.get("Rows"), "cols": h.get("Columns"), "pixel_spacing": _first(h.get("PixelSpacing")),
        "bits_stored": h.get("BitsStored"), "pixel_representation": h.get("PixelRepresentation"),
        "intercept": intercept, "slope": slope, "instance_number": h.get("InstanceNumber"),
        "ipp_x": ipp[0], "ipp_y": ipp[1], "ipp_z": ipp[2],
        "window_center": _first(h.get("WindowCenter")), "window_width": _first(h.get("WindowWidth")),
        "bits_allocated": h.get("BitsAllocated"), "slice_thickness": h.get("SliceThickness"),
        "modality": h.get("Modality"), "transfer_syntax": h.get("TransferSyntaxUID"),
    }
    row.update(zip(_IOP_ROW, iop))
    return row, None


Reader = Callable[[str], tuple[dicom.Parsed, str | None]]
Chunk = tuple[str, list[tuple[str, str]], Reader]
Result = tuple[list[dict[str, Any]], list[tuple[str, str]]]


def _scan_chunk(args: Chunk) -> Result:
    data_dir, items, reader = args
    rows, skipped = [], []
    for rel, split in items:
        try:
            parsed, reason = reader(os.path.join(data_dir, rel))
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


def list_dicoms(layout: Layout) -> list[tuple[str, str]]:
    """(path relative to the data folder, split) of every file in stage_2_train/ and stage_2_test/, sorted."""
    items: list[tuple[str, str]] = []
    for split, folder in (("train", layout.train_dir), ("test", layout.test_dir)):
        if folder.is_dir():
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it if e.is_file() and not e.name.startswith("."))
            items.extend((f"{folder.name}/{n}", split) for n in names)
    return items


def _pool(workers: int) -> ProcessPoolExecutor:
    # forkserver: safe even when the caller already runs threads (torch, tqdm monitor)
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("forkserver"))


def _pooled(chunks: list[Chunk], workers: int, collect: Callable[[Result], None]) -> None:
    """Run chunks on a process pool. A worker that dies (a crash in a decoder, the OOM killer) breaks the pool:
    the chunks then in flight (at most 2 per worker) are rerun file by file, the rest on a fresh pool, so only
    the culprit is lost."""
    pending = deque(chunks)
    while pending:
        in_flight: dict[Future, Chunk] = {}
        broken = False
        with _pool(workers) as ex:
            while (pending or in_flight) and not broken:
                try:
                    while pending and len(in_flight) < 2 * workers:  # bounded: a break strands few chunks
                        chunk = pending.popleft()
                        in_flight[ex.submit(_scan_chunk, chunk)] = chunk
                except BrokenProcessPool:
                    pending.appendleft(chunk)
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        collect(fut.result())
                        del in_flight[fut]
                    except BrokenProcessPool:
                        broken = True
        if in_flight:
            collect(_isolated(list(in_flight.values())))


def _isolated(chunks: list[Chunk]) -> Result:
    """The files of the chunks stranded by a dead worker, one at a time on a one-worker pool: when it dies again,
    the file in flight is the culprit, skipped; a fresh pool takes the rest."""
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    todo = deque((data_dir, item, reader) for data_dir, items, reader in chunks for item in items)
    while todo:
        with _pool(1) as ex:
            try:
                while todo:
                    data_dir, item, reader = todo[0]
                    r, s = ex.submit(_scan_chunk, (data_dir, [item], reader)).result()
                    todo.popleft()
                    rows += r
                    skipped += s
            except BrokenProcessPool:
                skipped.append((todo.popleft()[1][0], WORKER_DIED))
    return rows, skipped


def scan_files(data_dir: Path, items: list[tuple[str, str]], workers: int | None = None,
               desc: str = "headers", reader: Reader = dicom.scan) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scan headers in parallel -> (ordered meta frame, skipped frame with path, reason).

    `reader` (path -> (header, reason)) is the DICOM reader, a module-level function so workers can import it."""
    workers = max(1, workers or os.cpu_count() or 1)
    chunks = [(str(data_dir), items[i:i + CHUNK], reader) for i in range(0, len(items), CHUNK)]
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    with tqdm(total=len(items), desc=desc, unit="img", mininterval=1.0) as bar:

        def collect(result: Result) -> None:
            rows.extend(result[0])
            skipped.extend(result[1])
            bar.update(len(result[0]) + len(result[1]))

        if workers == 1 or len(items) < IN_PROCESS_BELOW:
            for chunk in chunks:
                collect(_scan_chunk(chunk))
        else:
            _pooled(chunks, min(workers, len(chunks)), collect)
    skipped.sort()
    frame = pd.DataFrame(rows, columns=COLUMNS[:6] + [c for c in COLUMNS[6:] if c not in ("z", "slice_rank", "series_len")] + _IOP_ROW)
    return order_slices(frame), pd.DataFrame(skipped, columns=["path", "reason"])


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
    df = frame.copy()
    if "instance_number" not in df:
        df["instance_number"] = np.nan
    df["instance_number"] = pd.to_numeric(df["instance_number"], errors="coerce")
    ipp = df[["ipp_x", "ipp_y", "ipp_z"]].to_numpy(dtype=np.float64, na_value=np.nan)
    iop = df[_IOP_ROW].to_numpy(dtype=np.float64, na_value=np.nan)
    df["z"] = slice_z(ipp, iop, df["instance_number"].to_numpy(dtype=np.float64, na_value=np.nan))
    df = df.sort_values(["series_id", "z", "instance_number", "image_id"], na_position="last", kind="mergesort")
    groups = df.groupby("series_id", sort=False)
    df["slice_rank"] = groups.cumcount().astype(np.int64)
    df["series_len"] = groups["image_id"].transform("size").astype(np.int64)
    sort_cols = ["study_id", "series_id", "slice_rank"] if "study_id" in df else ["series_id", "slice_rank"]
    df = df.sort_values(sort_cols, kind="mergesort").reset_index(drop=True)
    df = df.drop(columns=_IOP_ROW)
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
    df = pd.DataFrame({
        "image_id": headers["SOPInstanceUID"].astype(str), "patient_id": headers["PatientID"].astype(str),
        "study_id": headers["StudyInstanceUID"].astype(str), "series_id": headers["SeriesInstanceUID"].astype(str),
        "split": split,
    })
    df["path"] = f"stage_2_{split}/" + df["image_id"] + ".dcm"
    ipp = _parse_list_column(headers["ImagePositionPatient"], 3)
    df["ipp_x"], df["ipp_y"], df["ipp_z"] = ipp[:, 0], ipp[:, 1], ipp[:, 2]
    iop = _parse_list_column(headers["ImageOrientationPatient"], 6)
    for i, col in enumerate(_IOP_ROW):
        df[col] = iop[:, i]
    simple = {"Rows": "rows", "Columns": "cols", "BitsStored": "bits_stored", "BitsAllocated": "bits_allocated",
              "PixelRepresentation": "pixel_representation", "RescaleIntercept": "intercept",
              "RescaleSlope": "slope", "InstanceNumber": "instance_number", "Modality": "modality"}
    for src, dst in simple.items():
        if src in headers:
            df[dst] = headers[src].to_numpy()
    if "PixelSpacing" in headers:
        df["pixel_spacing"] = _parse_list_column(headers["PixelSpacing"], 2)[:, 0]
    return order_slices(df)


def build_meta(layout: Layout, out: str | Path | None = None, workers: int | None = None) -> pd.DataFrame:
    """Scan every DICOM of the data folder into meta.csv (+ skipped.csv); print what was skipped and why."""
    layout.require_data()
    out = Path(out) if out else layout.meta_csv
    skipped_path = layout.skipped_csv if out == layout.meta_csv else out.with_name(f"{out.stem}_skipped.csv")
    items = list_dicoms(layout)
    t0 = time.perf_counter()
    meta, skipped = scan_files(layout.data, items, workers=workers)
    write_csv(meta, out)
    write_csv(skipped, skipped_path)
    n_train = int((meta["split"] == "train").sum())
    print(f"meta: {len(meta)} slices ({n_train} train, {len(meta) - n_train} test) in {meta['series_id'].nunique()} series "
          f"of {meta['patient_id'].nunique()} patients, {time.perf_counter() - t0:.1f}s -> {out}")
    if len(skipped):
        print(f"skipped {len(skipped)} file(s) (listed in {skipped_path}):")
        for path, reason in skipped.head(50).itertuples(index=False):
            print(f"  {path}: {reason}")
        if len(skipped) > 50:
            print(f"  ... and {len(skipped) - 50} more")
    return meta


def read_meta(path: str | Path) -> pd.DataFrame:
    """Read a meta.csv with ids kept as strings."""
    return pd.read_csv(path, dtype={c: str for c in ID_COLUMNS})


def load_meta(layout: Layout) -> pd.DataFrame:
    """meta.csv of this layout, scanned first if it does not exist yet."""
    if layout.meta_csv.exists():
        return read_meta(layout.meta_csv)
    return build_meta(layout)
