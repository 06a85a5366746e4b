"""`make preprocess`: every readable slice -> a lossless int16 HU file, so windows and window jitter apply at load time.

Format (`<cache>/<last 2 chars of id>/<image_id>.hu`): an 18-byte header, then the residuals of the planar
predictor (left + up - upleft), zigzag-mapped to uint16. Low bytes: in blocks of 16, each block stored with
0, 2, 4 or 8 bits, whatever its largest value needs (air and soft tissue mostly need 2-4). High bytes: 0 for
~99.8% of CT pixels, so only (index, byte) pairs of the others are kept (a dense deflated plane when more than
1/64 are nonzero). Decoding: unpack, a 256-entry table to float32 residuals, one `cv2.integral` (the exact
inverse of the predictor). `SMALL` deflates a plain low-byte plane instead: 14% smaller, 5x slower to write.
Images with |HU| >= 8192 fall back to row deltas with int16 arithmetic.

Measured on the real mini set (every third of its 659 slices, 512 px) in one process, as CPU time of that
process (the 2-core box was shared, load ~7; `python -m ich_kaggle bench --what cache` prints the same figures):

    format                          DICOM->cache/s  decode/s  bytes/image  full 874k cache
    FAST (default, packed)                 ~550        ~400      158 kB        ~138 GB
    SMALL (low plane deflated)             ~140        ~420      136 kB        ~119 GB
    plain low plane (tried, dropped)       ~1,050      ~630      265 kB        ~232 GB
    16-bit PNG, cv2 level 1                 ~62        ~145      190 kB        ~166 GB
    compressed npz                          ~23        ~265      219 kB        ~191 GB
    raw .npy int16                       ~2,100      ~4,500      524 kB        ~458 GB

(DICOM->cache here is read + HU + encode without the file write; `bench`, with the atomic write and the
decode reading the file, measured 364 and 552/s for FAST. For scale: reading a 512 kB file ran ~9,000/s and
the DICOM->HU step ~2,800/s.) FAST beats 300 DICOM->cache/s per core and, ~6x over, the 65 decodes/s per
worker that 16 workers need to feed a GPU at 1,000 images/s, at under a third of the raw DICOMs' size.
HU are exact whenever RescaleSlope/Intercept are integers (every RSNA file); otherwise rounded to 1 HU.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import struct
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ..core.io import atomic_open, write_csv
from ..core.layout import Layout
from . import dicom
from . import meta as meta_mod

MAGIC = b"IHU2"
_HEAD = struct.Struct("<4sBBHHII")  # magic, flags, reserved, rows, cols, len(low), len(high)
FLAG_LOW_DEFLATED = 1
FLAG_ROW_DELTA = 2
FLAG_HIGH_SPARSE = 4
FLAG_LOW_PACKED = 8
BLOCK = 16  # values per bit-width block of the packed low-byte plane (the code assumes 16)
SPARSE_FRACTION = 64  # high bytes stored as (index, byte) pairs while at most 1/64 of them are nonzero
PLANAR_LIMIT = 8192  # |HU| below this keeps planar residuals inside int16
FAST, SMALL = 0, 1
SUFFIX = ".hu"
CHUNK = 64
IN_PROCESS_BELOW = 1024  # a process pool costs seconds to start
STALE_TMP_S = 600  # temp files older than this were left by a killed run (a concurrent run may own newer ones)


class CacheError(Exception):
    """A cache file that is not in this format (e.g. cut short by a disk error)."""


def _residuals(hu: np.ndarray) -> tuple[np.ndarray, int]:
    """Prediction residuals (int16) and the flag saying which predictor made them."""
    if hu.min(initial=0) >= -PLANAR_LIMIT and hu.max(initial=0) < PLANAR_LIMIT:
        # planar predictor left + up - upleft: residuals stay within int16, and cv2.integral inverts it
        d = np.diff(hu, axis=0, prepend=np.zeros((1, hu.shape[1]), np.int16))
        return np.diff(d, axis=1, prepend=np.zeros((hu.shape[0], 1), np.int16)), 0
    # extreme values: horizontal deltas (int16 wrap-around is undone exactly by an int16 cumsum)
    return np.diff(hu, axis=1, prepend=np.zeros((hu.shape[0], 1), np.int16)), FLAG_ROW_DELTA


def _pack_low(u: np.ndarray) -> bytes:
    """Low bytes in blocks of BLOCK values, each stored with 0, 2, 4 or 8 bits (what its largest value needs)."""
    pad = -len(u) % BLOCK
    blocks = (np.concatenate([u, np.zeros(pad, u.dtype)]) if pad else u).reshape(-1, BLOCK)
    # OR of each block's 16 values (the thresholds are powers of two, so OR decides like max), 4 per uint64 lane
    lanes = blocks.view(np.uint64).reshape(-1, BLOCK // 4)
    bits = lanes[:, 0] | lanes[:, 1] | lanes[:, 2] | lanes[:, 3]
    bits |= bits >> 32
    bits |= bits >> 16
    bits &= 0xFFFF
    code = (bits > 0).astype(np.uint8) + (bits > 3) + (bits > 15)  # 0: all zero, 1: 2 bits, 2: 4 bits, 3: 8 bits
    order = np.argsort(code, kind="stable")
    counts = np.bincount(code, minlength=4)
    rows = blocks.astype(np.uint8).view(f"V{BLOCK}").ravel()  # one opaque item per block: a cheap gather
    low = rows[order[counts[0]:]].view(np.uint8).reshape(-1, BLOCK)  # non-zero blocks, grouped by width
    b2, b4, b8 = np.split(low, [counts[1], counts[1] + counts[2]])
    p2 = b2[:, 0::4] | (b2[:, 1::4] << 2) | (b2[:, 2::4] << 4) | (b2[:, 3::4] << 6)
    p4 = b4[:, 0::2] | (b4[:, 1::2] << 4)
    c = np.concatenate([code, np.zeros(-len(code) % 4, np.uint8)]).reshape(-1, 4)
    codes = c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)
    return codes.tobytes() + p2.tobytes() + p4.tobytes() + b8.tobytes()


def _unpack_low(data: bytes | memoryview, n: int) -> np.ndarray:
    """Inverse of `_pack_low`: n low bytes (uint8)."""
    n_blocks = -(-n // BLOCK)
    n_codes = -(-n_blocks // 4)
    packed = np.frombuffer(data, dtype=np.uint8)
    c = packed[:n_codes]
    code = np.stack([c & 3, (c >> 2) & 3, (c >> 4) & 3, c >> 6], axis=1).ravel()[:n_blocks]
    counts = np.bincount(code, minlength=4)
    sizes = [counts[1] * BLOCK // 4, counts[2] * BLOCK // 2, counts[3] * BLOCK]
    if n_codes + sum(sizes) != len(packed):
        raise CacheError("packed pixel plane has the wrong length")
    p2, p4, p8 = np.split(packed[n_codes:], [sizes[0], sizes[0] + sizes[1]])
    p2, p4 = p2.reshape(-1, BLOCK // 4), p4.reshape(-1, BLOCK // 2)
    values = np.concatenate([
        np.stack([p2 & 3, (p2 >> 2) & 3, (p2 >> 4) & 3, p2 >> 6], axis=2).reshape(-1, BLOCK),
        np.stack([p4 & 15, p4 >> 4], axis=2).reshape(-1, BLOCK),
        p8.reshape(-1, BLOCK),
    ])
    out = np.zeros((n_blocks, BLOCK), dtype=np.uint8)
    where = np.concatenate([np.flatnonzero(code == 1), np.flatnonzero(code == 2), np.flatnonzero(code == 3)])
    out.view(f"V{BLOCK}").ravel()[where] = values.view(f"V{BLOCK}").ravel()
    return out.ravel()[:n]


def encode(hu: np.ndarray, level: int = FAST) -> bytes:
    """int16 (H, W) HU -> bytes (lossless)."""
    hu = np.ascontiguousarray(hu, dtype=np.int16)
    if hu.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {hu.shape}")
    d, flags = _residuals(hu)
    u = ((d << 1) ^ (d >> 15)).view(np.uint16).ravel()  # zigzag: small |residual| -> small unsigned
    if level == SMALL:
        low = u.astype(np.uint8).tobytes()  # the low byte of every residual, deflated below
    else:
        low = _pack_low(u)
        flags |= FLAG_LOW_PACKED
    idx = np.flatnonzero(u > 255)
    if len(idx) <= u.size // SPARSE_FRACTION:  # the usual case: a few hundred large residuals
        high = struct.pack("<I", len(idx)) + idx.astype("<u4").tobytes() + (u[idx] >> 8).astype(np.uint8).tobytes()
        flags |= FLAG_HIGH_SPARSE
    else:
        comp = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
        high = comp.compress((u >> 8).astype(np.uint8).tobytes()) + comp.flush()
    if level == SMALL:
        comp = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY)
        low = comp.compress(low) + comp.flush()
        flags |= FLAG_LOW_DEFLATED
    return _HEAD.pack(MAGIC, flags, 0, hu.shape[0], hu.shape[1], len(low), len(high)) + low + high


def decode(data: bytes) -> np.ndarray:
    """bytes from `encode` -> int16 (H, W) HU."""
    if len(data) < _HEAD.size:
        raise CacheError("file shorter than its header")
    magic, flags, _, rows, cols, n_low, n_high = _HEAD.unpack_from(data)
    if magic != MAGIC or len(data) != _HEAD.size + n_low + n_high:
        raise CacheError("not an ich_kaggle HU cache file or cut short")
    low = memoryview(data)[_HEAD.size:_HEAD.size + n_low]
    if flags & FLAG_LOW_DEFLATED:
        low = zlib.decompress(low)
    low8 = _unpack_low(low, rows * cols) if flags & FLAG_LOW_PACKED else np.frombuffer(low, dtype=np.uint8)
    start = _HEAD.size + n_low
    if flags & FLAG_HIGH_SPARSE:
        (count,) = struct.unpack_from("<I", data, start)
        idx = np.frombuffer(data, dtype="<u4", count=count, offset=start + 4)
        high = np.frombuffer(data, dtype=np.uint8, count=count, offset=start + 4 + 4 * count)
    else:
        high_plane = np.frombuffer(zlib.decompress(memoryview(data)[start:]), dtype=np.uint8)
        idx = np.flatnonzero(high_plane)
        high = high_plane[idx]
    if flags & FLAG_ROW_DELTA:  # int16 wrap-around arithmetic: stay in integers
        u = low8.astype(np.uint16)
        u[idx] |= high.astype(np.uint16) << 8
        return np.cumsum(_unzigzag(u).reshape(rows, cols), axis=1, dtype=np.int16)
    # residuals as float32 straight from the low bytes (a 256-entry table), then the few wide ones
    d = cv2.LUT(low8.reshape(rows, cols), _UNZIGZAG_F32)
    wide = low8[idx].astype(np.uint16) | (high.astype(np.uint16) << 8)
    d.reshape(-1)[idx] = _unzigzag(wide)
    # 2-D prefix sum of the planar residuals; float32 is exact here (every partial sum is below 2**16)
    return cv2.integral(d, sdepth=cv2.CV_32F)[1:, 1:].astype(np.int16)


def _unzigzag(u: np.ndarray) -> np.ndarray:
    return ((u >> 1) ^ (np.uint16(0) - (u & 1))).view(np.int16)


_UNZIGZAG_F32 = _unzigzag(np.arange(256, dtype=np.uint16)).astype(np.float32)


def cache_path(layout: Layout, image_id: str) -> Path:
    """Where one slice is cached: 256-way sharded so no folder holds 874k files."""
    shard = image_id[-2:] if image_id[-2:].isalnum() else "xx"
    return layout.cache_dir / shard / f"{image_id}{SUFFIX}"


def load_hu(layout: Layout, image_id: str) -> np.ndarray:
    """The cached int16 HU image (H, W) of one slice; FileNotFoundError if it was never cached."""
    path = cache_path(layout, image_id)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode(data)
    except CacheError as e:
        raise CacheError(f"{path}: {e}; delete it and rerun `python -m ich_kaggle preprocess`") from None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def cache_one(src: str | Path, dst: Path, level: int = FAST) -> int:
    """DICOM -> cache file; returns the bytes written. Raises dicom.DicomError for unusable files."""
    hu = dicom.read_hu(src, dtype=np.int16)
    data = encode(hu, level)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(dst, data)
    return len(data)


def _cache_chunk(args: tuple[str, str, list[tuple[str, str]], int]) -> tuple[int, int, list[tuple[str, str]]]:
    data_dir, cache_dir, items, level = args
    layout = Layout(data=Path(data_dir), work=Path(cache_dir).parent)
    done = written = 0
    skipped = []
    for image_id, rel in items:
        try:
            written += cache_one(os.path.join(data_dir, rel), cache_path(layout, image_id), level)
            done += 1
        except dicom.DicomError as e:
            skipped.append((rel, e.reason))
        except OSError as e:
            skipped.append((rel, f"cannot write cache file ({e.strerror})"))
    return done, written, skipped


def _format_file(layout: Layout) -> Path:
    return layout.cache_dir / "FORMAT"


def format_ok(layout: Layout) -> bool:
    """Whether the cache folder was written in this module's format (an older one is re-cached, not misread)."""
    marker = _format_file(layout)
    return marker.exists() and marker.read_text().strip() == MAGIC.decode()


def cached_ids(layout: Layout) -> set[str]:
    """Image ids already in the cache (none if it holds another format); removes stale temp files of killed runs."""
    ids: set[str] = set()
    if not layout.cache_dir.is_dir() or not format_ok(layout):
        return ids
    stale_before = time.time() - STALE_TMP_S
    with os.scandir(layout.cache_dir) as shards:
        for shard in shards:
            if not shard.is_dir():
                continue
            with os.scandir(shard.path) as files:
                for f in files:
                    if f.name.endswith(SUFFIX):
                        ids.add(f.name[:-len(SUFFIX)])
                    elif f.name.endswith(".tmp") and f.stat().st_mtime < stale_before:
                        os.unlink(f.path)  # left by a killed run (a live writer keeps one for milliseconds)
    return ids


def _skipped_csv(layout: Layout) -> Path:
    return layout.cache_dir / "skipped.csv"


def _todo(layout: Layout, meta: pd.DataFrame, include_skipped: bool, splits: tuple[str, ...] | None,
          done: set[str] | None = None) -> pd.DataFrame:
    if splits is not None:
        meta = meta.loc[meta["split"].isin(splits)]
    done = cached_ids(layout) if done is None else done
    todo = meta.loc[~meta["image_id"].isin(done), ["image_id", "path"]]
    if not include_skipped and _skipped_csv(layout).exists():
        bad = pd.read_csv(_skipped_csv(layout), dtype=str)["path"]
        todo = todo.loc[~todo["path"].isin(bad)]
    return todo


def preprocess(layout: Layout, workers: int | None = None, level: int = FAST,
               splits: tuple[str, ...] | None = None) -> dict:
    """Cache every readable slice of meta.csv (train and test, or only `splits`); resumable.

    Returns {"cached", "existing", "skipped", "bytes_written", "seconds", "images_per_s"}.
    """
    layout.require_data()
    meta = meta_mod.load_meta(layout)
    if splits is not None:
        meta = meta.loc[meta["split"].isin(splits)]
    done_ids = cached_ids(layout)  # empty when the folder holds another format
    if not format_ok(layout):
        old = [p for p in layout.cache_dir.iterdir() if p.is_dir()] if layout.cache_dir.is_dir() else []
        if old:  # unreadable by this version: remove, so a killed re-run never mixes formats
            print(f"cache: {layout.cache_dir} holds another cache format; removing it and writing every slice again")
            for shard in old:
                shutil.rmtree(shard)
        with atomic_open(_format_file(layout)) as f:
            f.write(MAGIC.decode() + "\n")
    todo = _todo(layout, meta, include_skipped=True, splits=None, done=done_ids)
    existing = len(meta) - len(todo)
    items = list(todo.itertuples(index=False, name=None))
    workers = max(1, workers or os.cpu_count() or 1)
    chunks = [(str(layout.data), str(layout.cache_dir), items[i:i + CHUNK], level) for i in range(0, len(items), CHUNK)]
    layout.cache_dir.mkdir(parents=True, exist_ok=True)
    done = written = 0
    skipped: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    with tqdm(total=len(items), desc="cache", unit="img", mininterval=1.0) as bar:
        if workers == 1 or len(items) < IN_PROCESS_BELOW:
            results = map(_cache_chunk, chunks)
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("forkserver"))
            results = pool.map(_cache_chunk, chunks)
        try:
            for n, b, s in results:
                done += n
                written += b
                skipped += s
                bar.update(n + len(s))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    seconds = time.perf_counter() - t0
    listed = pd.DataFrame(skipped, columns=["path", "reason"])
    if _skipped_csv(layout).exists():  # keep what earlier runs found in files this run did not try
        earlier = pd.read_csv(_skipped_csv(layout), dtype=str)
        listed = pd.concat([earlier.loc[~earlier["path"].isin(todo["path"])], listed], ignore_index=True)
    write_csv(listed, _skipped_csv(layout))
    result = {"cached": done, "existing": existing, "skipped": len(skipped), "bytes_written": written,
              "seconds": round(seconds, 2), "images_per_s": round(done / seconds, 1) if seconds > 0 else 0.0}
    print(f"cache: {done} new, {existing} already cached, {len(skipped)} skipped, "
          f"{written / max(done, 1) / 1024:.0f} kB/image, {result['images_per_s']} img/s -> {layout.cache_dir}")
    for path, reason in skipped[:50]:
        print(f"  skipped {path}: {reason}")
    return result


def ensure(layout: Layout, workers: int | None = None, splits: tuple[str, ...] | None = None) -> dict | None:
    """Run `preprocess` only if some readable slice is not cached yet (known-unreadable ones do not count).

    `splits=("test",)` caches only the test slices (inference in a Kaggle kernel).
    """
    meta = meta_mod.load_meta(layout)
    if _todo(layout, meta, include_skipped=False, splits=splits).empty:
        return None
    return preprocess(layout, workers=workers, splits=splits)
