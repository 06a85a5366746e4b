"""`stage_2_train.csv` (`ID_<image>_<subtype>,Label`, six rows per image, some rows duplicated) -> one row per image.

Vectorised end to end (one string partition, integer codes, one scatter) so the 4 M-row competition file parses
in seconds; every way the file can be wrong becomes one UserError line naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .io import write_csv

# Label order used everywhere (arrays, CSV columns, model logits).
LABELS: tuple[str, ...] = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
# The competition metric weighs `any` twice as much as each subtype.
LABEL_WEIGHTS: tuple[float, ...] = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)


def read_labels(csv_path: str | Path) -> pd.DataFrame:
    """stage_2_train.csv -> one row per image: `image_id` + the six LABELS columns (int8, 0/1), first-seen order."""
    return read_long(csv_path, "labels")


def read_long(csv_path: str | Path, values: str = "labels") -> pd.DataFrame:
    """The competition's long `ID,Label` form -> one row per image (`image_id` + LABELS), in first-seen order.

    values="labels": 0/1 (int8), as in stage_2_train.csv; values="probabilities": floats in [0, 1] (float64), as in
    a submission. Duplicated (image, subtype) rows must agree; every image needs all six subtypes.
    """
    path = Path(csv_path)
    what = "label file" if values == "labels" else "submission"
    if not path.is_file():
        raise UserError(
            f"{what} {path} {'is a folder' if path.is_dir() else 'not found'}; "
            + (
                "it is stage_2_train.csv of the competition download"
                if values == "labels"
                else "give the CSV file written by `make submit`"
            )
        )
    try:  # index_col=False: a trailing comma must not turn the ID column into the index
        raw = pd.read_csv(path, dtype={"ID": str}, index_col=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as e:
        raise UserError(f"{path}: not a readable CSV ({str(e).splitlines()[0]}); fix or regenerate the file") from None
    return parse_long(raw, path, values)


def _show(value) -> str:
    """A cell as the user wrote it (no numpy reprs such as np.float64(2.0) in messages)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return repr(value.item() if isinstance(value, np.generic) else value)


def parse_long(raw: pd.DataFrame, path: str | Path, values: str = "labels") -> pd.DataFrame:
    """`ID,Label` rows (a frame read from `path`) -> wide; see `read_long`."""
    if values not in ("labels", "probabilities"):
        raise ValueError(f"values must be 'labels' or 'probabilities', got {values!r}")
    if list(map(str, raw.columns[:2])) != ["ID", "Label"]:
        raise UserError(
            f"{path}: expected the header ID,Label (the competition's long format), "
            f"found {','.join(map(str, raw.columns[:8]))}"
        )
    raw = raw[["ID", "Label"]]
    if raw.empty:
        raise UserError(f"{path}: has no rows")
    if raw["ID"].isna().any():
        i = int(np.flatnonzero(raw["ID"].isna().to_numpy())[0])
        raise UserError(f"{path}: row {i + 2} has an empty ID ({int(raw['ID'].isna().sum())} such rows)")
    number = pd.to_numeric(raw["Label"], errors="coerce")
    if values == "labels":
        bad = number.isna() | ~number.isin([0, 1])
        want = "must be 0 or 1"
    else:
        bad = number.isna() | ~np.isfinite(number) | (number < 0) | (number > 1)
        want = "must be a probability in [0, 1]"
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        cell = raw["Label"].iloc[i]
        shown = "an empty cell" if pd.isna(cell) else _show(cell)
        raise UserError(
            f"{path}: Label {want}; row {i + 2} (ID {raw['ID'].iloc[i]}) has {shown}"
            + (f" ({int(bad.sum())} bad rows)" if bad.sum() > 1 else "")
        )
    img_codes, images, codes = _split_ids(raw["ID"].to_numpy(dtype=object), path)
    dtype = np.int8 if values == "labels" else np.float64
    vals = number.to_numpy(dtype=dtype)
    out = np.full((len(images), len(LABELS)), np.nan if values == "probabilities" else -1, dtype=dtype)
    out[img_codes, codes] = vals
    # duplicated (image, subtype) rows must agree: the scatter kept one of them, compare every row against it
    conflict = out[img_codes, codes] != vals
    if conflict.any():
        i = int(np.flatnonzero(conflict)[0])
        raise UserError(
            f"{path}: ID {raw['ID'].iloc[i]} appears twice with different values "
            f"({_show(vals[i])} and {_show(out[img_codes[i], codes[i]])}); keep one row"
        )
    missing = np.isnan(out) if values == "probabilities" else out < 0
    if missing.any():
        r, c = np.argwhere(missing)[0]
        raise UserError(
            f"{path}: image {images[r]} has no row for subtype {LABELS[c]} "
            f"({int(missing.any(axis=1).sum())} image(s) incomplete); the file is cut short or edited"
        )
    frame = pd.DataFrame(out, columns=list(LABELS))
    frame.insert(0, "image_id", np.asarray(images, dtype=object))
    frame["image_id"] = frame["image_id"].astype(str)
    return frame


def _split_ids(ids: np.ndarray, path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """`ID_<image>_<subtype>` -> (image codes in first-seen order, image ids, subtype codes), all in numpy.

    pandas' str.rpartition is a Python loop (~12 s on 4 M rows); this works on the bytes as a uint8 matrix.
    """
    nul = next((i for i, x in enumerate(ids) if isinstance(x, str) and "\0" in x), None)
    if nul is not None:  # numpy's bytes strip trailing NULs: found here, as `validate` finds them
        raise UserError(
            f"{path}: ID {ids[nul]!r} (row {nul + 2}) contains NUL bytes; IDs look like ID_12cadc6af_epidural"
        )
    try:
        raw = ids.astype("S")
    except UnicodeEncodeError:
        raise UserError(f"{path}: IDs must be ASCII like ID_12cadc6af_epidural") from None
    width = raw.dtype.itemsize
    b = raw.view(np.uint8).reshape(len(raw), width)
    n = np.char.str_len(raw).astype(np.int64)
    codes = np.full(len(raw), -1, dtype=np.int8)
    suffix = np.zeros(len(raw), dtype=np.int64)
    rows = np.arange(len(raw))
    for li, name in enumerate(LABELS):
        pat = np.frombuffer(f"_{name}".encode(), dtype=np.uint8)
        k = len(pat)
        cand = rows[(n > k) & (codes < 0)]
        for j in range(k):  # narrow the candidates one byte at a time: cheap single-column gathers
            cand = cand[b[cand, n[cand] - k + j] == pat[j]]
        codes[cand] = li
        suffix[cand] = k
    if (codes < 0).any():
        i = int(np.flatnonzero(codes < 0)[0])
        raise UserError(f"{path}: ID {ids[i]!r} (row {i + 2}) does not end in one of _{', _'.join(LABELS)}")
    keep = n - suffix
    lo, hi = int(keep.min()), int(keep.max())
    padded = -(-hi // 8) * 8
    img = np.zeros((len(raw), padded), dtype=np.uint8)
    img[:, :lo] = b[:, :lo]
    if hi > lo:  # ids of different lengths: copy the varying tail only where it belongs to the image id
        img[:, lo:hi] = np.where(np.arange(lo, hi) < keep[:, None], b[:, lo:hi], 0)
    words = pd.DataFrame(img.view(np.uint64))
    img_codes = words.groupby(list(words.columns), sort=False).ngroup().to_numpy()
    first = np.full(int(img_codes.max()) + 1, -1, dtype=np.int64)
    first[img_codes[::-1]] = np.arange(len(img_codes) - 1, -1, -1)
    images = [s[:k] for s, k in zip(ids[first].tolist(), keep[first].tolist())]
    return img_codes, images, codes


def to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """Wide (image_id + LABELS) -> the competition's long `ID,Label` form, image-major, LABELS order."""
    ids = wide["image_id"].astype(str).to_numpy()
    values = wide[list(LABELS)].to_numpy()
    long_ids = np.repeat(ids.astype(object), len(LABELS)) + np.tile(
        np.array([f"_{l}" for l in LABELS], dtype=object), len(ids)
    )
    return pd.DataFrame({"ID": long_ids, "Label": values.reshape(-1)})


def write_labels(wide: pd.DataFrame, path: str | Path) -> Path:
    """Write labels in the stage_2_train.csv form (atomically)."""
    return write_csv(to_long(wide), path)
