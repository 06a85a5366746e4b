"""The former hand-written cache codec (planar predictor + bit packing), kept only as the baseline row of the codec
table in `make bench` (`bench.data.bench_codecs`); the cache itself uses `data.codec` (blosc2).

Residuals of the planar predictor (left + up - upleft), zigzag-mapped to uint16. Low bytes: in blocks of 16, each
block stored with 0, 2, 4 or 8 bits; high bytes: (index, byte) pairs of the few nonzero ones. `SMALL` deflates a
plain low-byte plane instead. Images with |HU| >= 8192 fall back to row deltas with int16 arithmetic.
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

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


class CacheError(Exception):
    """Bytes that are not in this format."""


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
    low = rows[order[counts[0] :]].view(np.uint8).reshape(-1, BLOCK)  # non-zero blocks, grouped by width
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
    values = np.concatenate(
        [
            np.stack([p2 & 3, (p2 >> 2) & 3, (p2 >> 4) & 3, p2 >> 6], axis=2).reshape(-1, BLOCK),
            np.stack([p4 & 15, p4 >> 4], axis=2).reshape(-1, BLOCK),
            p8.reshape(-1, BLOCK),
        ]
    )
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
    low = memoryview(data)[_HEAD.size : _HEAD.size + n_low]
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
