"""DICOM -> Hounsfield units, fast enough to scan 874k competition files.

Why a hand-written header walker: pydicom turns every element into a Python object, which caps a
header scan at a few hundred files/s per core. RSNA files are flat little-endian datasets (no sequences),
so walking the raw bytes for ~20 tags is several times faster; uncompressed pixels are then one
`np.frombuffer` away. Anything unusual (big endian, deflated, undefined-length sequences, compressed
pixels) falls back to pydicom, which also decodes JPEG lossless / JPEG 2000 / RLE via its pixel handlers.

Measured on the real mini set (659 files), CPU time of one process on a busy shared 2-core box:
header scan (`scan`) ~8,000 files/s against ~740/s for pydicom dcmread(stop_before_pixels) + reading the same
tags; `read_hu` ~2,600 slices/s against ~430/s for pydicom's pixel_array + rescale.

The corrupted RSNA variant (BitsStored 12, PixelRepresentation 0, RescaleIntercept > -100) is fixed as the
competition forum found: add 1000 to the raw pixels, subtract 4096 from values >= 4096, use intercept -1000.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
UNCOMPRESSED = {IMPLICIT_LE, EXPLICIT_LE}
PIXEL_DATA = 0x7FE00010
HEADER_BYTES = 8192  # RSNA headers are ~1 kB; read more only when needed

# tag -> (keyword, VR used to decode the value; implicit VR files carry no VR)
TAGS: dict[int, tuple[str, str]] = {
    0x00080018: ("SOPInstanceUID", "UI"),
    0x00080060: ("Modality", "CS"),
    0x00100020: ("PatientID", "LO"),
    0x00180050: ("SliceThickness", "DS"),
    0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00200013: ("InstanceNumber", "IS"),
    0x00200032: ("ImagePositionPatient", "DS"),
    0x00200037: ("ImageOrientationPatient", "DS"),
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280004: ("PhotometricInterpretation", "CS"),
    0x00280008: ("NumberOfFrames", "IS"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280030: ("PixelSpacing", "DS"),
    0x00280100: ("BitsAllocated", "US"),
    0x00280101: ("BitsStored", "US"),
    0x00280102: ("HighBit", "US"),
    0x00280103: ("PixelRepresentation", "US"),
    0x00281050: ("WindowCenter", "DS"),
    0x00281051: ("WindowWidth", "DS"),
    0x00281052: ("RescaleIntercept", "DS"),
    0x00281053: ("RescaleSlope", "DS"),
}
KEYWORDS = [kw for kw, _ in TAGS.values()]
MULTI = {"ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "WindowCenter", "WindowWidth"}
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_TAG_LEN = struct.Struct("<HHI")
_TAG_VR_LEN = struct.Struct("<HH2sH")


class DicomError(Exception):
    """A file that cannot become a CT image; `reason` is what the skipped list reports."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Fallback(Exception):
    """The fast walker met something it does not handle; use pydicom."""


@dataclass
class Parsed:
    """Header values plus where the pixels are (offset/length into the file bytes)."""

    header: dict[str, Any] = field(default_factory=dict)
    transfer_syntax: str = ""
    pixel_offset: int | None = None
    pixel_length: int | None = None  # None: encapsulated (compressed) or absent
    fast: bool = True  # parsed by the byte walker (False: by pydicom, pixel position unknown)


def _value(raw: bytes, vr: str) -> Any:
    if vr == "US":
        return struct.unpack_from("<H", raw)[0] if len(raw) >= 2 else None
    text = raw.decode("latin-1").strip("\x00 ")
    if vr == "DS" or vr == "IS":
        parts = [p.strip() for p in text.split("\\") if p.strip()]
        try:
            nums = [float(p) if vr == "DS" else int(float(p)) for p in parts]
        except ValueError:
            return None
        return nums
    return text


def _finish(values: dict[str, Any]) -> dict[str, Any]:
    """Single-valued numeric tags become scalars; multi-valued ones stay lists."""
    out: dict[str, Any] = {}
    for kw, v in values.items():
        if isinstance(v, list) and kw not in MULTI:
            v = v[0] if v else None
        if v == "" or v == []:
            v = None
        out[kw] = v
    return out


def _walk(buf: bytes, file_size: int) -> Parsed:
    """Parse file meta + dataset up to PixelData. Raises _Fallback or DicomError."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        if len(buf) >= 8 and buf[:2] == b"\x08\x00":  # preamble-less dataset: let pydicom try
            raise _Fallback
        raise DicomError("not a DICOM file (no DICM marker)")
    pos, n = 132, len(buf)
    ts = ""
    # group 0002 is always explicit VR little endian
    while pos + 8 <= n:
        group, elem, vr, length = _TAG_VR_LEN.unpack_from(buf, pos)
        if group != 0x0002:
            break
        if vr in LONG_VRS:
            length = struct.unpack_from("<I", buf, pos + 8)[0]
            pos += 12
        else:
            pos += 8
        if elem == 0x0010:
            ts = buf[pos:pos + length].decode("latin-1").strip("\x00 ")
        pos += length
    if not ts:
        raise _Fallback
    explicit = ts != IMPLICIT_LE
    if ts.startswith("1.2.840.10008.1.2.2") or ts.endswith(".99"):  # big endian / deflated
        raise _Fallback
    parsed = Parsed(transfer_syntax=ts)
    values: dict[str, Any] = {}
    while True:
        if pos + 8 > n:
            if n < file_size:
                raise _Fallback  # header longer than what was read
            if pos != n:  # the last element runs past the end of the file
                raise DicomError(f"truncated file: cut inside the header ({file_size} bytes)")
            break  # end of file without PixelData
        if explicit:
            group, elem, vr, length = _TAG_VR_LEN.unpack_from(buf, pos)
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise _Fallback  # not an explicit VR after all (mislabelled file): pydicom copes
            if vr in LONG_VRS:
                if pos + 12 > n:
                    raise _Fallback
                length = struct.unpack_from("<I", buf, pos + 8)[0]
                pos += 12
            else:
                pos += 8
        else:
            group, elem, length = _TAG_LEN.unpack_from(buf, pos)
            pos += 8
        tag = (group << 16) | elem
        if tag == PIXEL_DATA:
            parsed.pixel_offset = pos
            parsed.pixel_length = None if length == 0xFFFFFFFF else length
            break
        if tag > PIXEL_DATA:
            break
        if length == 0xFFFFFFFF:
            raise _Fallback  # undefined-length sequence before the pixels
        if tag in TAGS:
            if pos + length > n:
                raise _Fallback
            kw, tvr = TAGS[tag]
            values[kw] = _value(buf[pos:pos + length], tvr)
        pos += length
    parsed.header = _finish(values)
    return parsed


def _pydicom_parse(source: str | Path | bytes, with_pixels: bool):
    with warnings.catch_warnings():  # RSNA ids are not valid UIDs: pydicom warns on every access
        warnings.simplefilter("ignore")
        return _pydicom_parse_quiet(source, with_pixels)


def _pydicom_parse_quiet(source: str | Path | bytes, with_pixels: bool):
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fp = io.BytesIO(source) if isinstance(source, bytes) else source
            ds = pydicom.dcmread(fp, stop_before_pixels=not with_pixels, force=True)
        except Exception as e:  # pydicom raises many types for broken files
            raise DicomError(f"unreadable DICOM ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    values: dict[str, Any] = {}
    for kw in KEYWORDS:
        try:
            v = ds.get(kw)
        except Exception:
            v = None
        if v is None:
            continue
        if kw in MULTI or kw in ("SliceThickness", "InstanceNumber", "NumberOfFrames", "RescaleIntercept", "RescaleSlope"):
            try:
                seq = list(v) if hasattr(v, "__iter__") and not isinstance(v, str) else [v]
                v = [float(x) for x in seq]
                if kw in ("InstanceNumber", "NumberOfFrames"):
                    v = [int(x) for x in v]
            except (TypeError, ValueError):
                v = None
        elif isinstance(v, (int, float)):
            v = int(v)
        else:
            v = str(v)
        values[kw] = v
    parsed = Parsed(header=_finish(values))
    fm = getattr(ds, "file_meta", None)
    parsed.transfer_syntax = str(getattr(fm, "TransferSyntaxUID", "") or "") if fm is not None else ""
    return parsed, ds


def parse(path: str | Path, buf: bytes | None = None) -> tuple[Parsed, bytes]:
    """Header of `path` (reading only its first bytes unless `buf` holds the whole file)."""
    try:
        if buf is None:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                buf = f.read(HEADER_BYTES)
        else:
            size = len(buf)
    except OSError as e:
        raise DicomError(f"cannot read file ({e.strerror})") from None
    try:
        parsed = _walk(buf, size)
    except (_Fallback, struct.error):
        if len(buf) < size:
            with open(path, "rb") as f:
                buf = f.read()
        parsed, _ = _pydicom_parse(buf, with_pixels=False)
        parsed.fast = False
    parsed.header["TransferSyntaxUID"] = parsed.transfer_syntax
    parsed.header["_file_size"] = size
    return parsed, buf


def check(parsed: Parsed, require_ct: bool = True) -> str | None:
    """Why this header cannot give a CT image, or None. Shared by the header scan and the pixel reader."""
    h = parsed.header
    if h.get("Rows") is None or h.get("Columns") is None:
        return "missing tag Rows/Columns"
    if h.get("_has_pixels") is False:
        return "no PixelData element"
    spp = h.get("SamplesPerPixel") or 1
    photometric = (h.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    if spp != 1 or not photometric.startswith("MONOCHROME"):
        return f"colour image (SamplesPerPixel {spp}, PhotometricInterpretation {photometric}); need greyscale CT"
    if require_ct and h.get("Modality") not in (None, "CT"):
        return f"not a CT image (Modality {h.get('Modality')})"
    if (h.get("NumberOfFrames") or 1) > 1:
        return f"multi-frame image ({h.get('NumberOfFrames')} frames); need one slice per file"
    if parsed.pixel_offset is not None and parsed.pixel_length is not None:
        need = h["Rows"] * h["Columns"] * max(1, (h.get("BitsAllocated") or 16) // 8)
        have = min(parsed.pixel_length, h["_file_size"] - parsed.pixel_offset)
        if have < need:
            return f"truncated file: pixel data has {max(have, 0)} of {need} bytes"
    return None


def read_header(path: str | Path) -> dict[str, Any]:
    """The tags the pipeline uses (keyword -> value; lists for multi-valued tags), plus TransferSyntaxUID.

    `_has_pixels` says whether a PixelData element exists; missing tags are absent or None.
    """
    return scan(path)[0].header


def scan(path: str | Path) -> tuple[Parsed, str | None]:
    """Header plus the reason the file cannot give a CT slice (None when it can), without decoding pixels."""
    parsed, buf = parse(path)
    if parsed.fast:
        parsed.header["_has_pixels"] = parsed.pixel_offset is not None
    else:  # pydicom stopped before the pixels: look for them in the whole file
        if len(buf) < parsed.header["_file_size"]:
            with open(path, "rb") as f:
                buf = f.read()
        try:
            _, ds = _pydicom_parse(buf, with_pixels=True)
            parsed.header["_has_pixels"] = "PixelData" in ds
        except DicomError:
            parsed.header["_has_pixels"] = False
    return parsed, check(parsed)


def _dtype(h: dict[str, Any]) -> np.dtype:
    bits = h.get("BitsAllocated") or 16
    if bits not in (8, 16, 32):
        raise DicomError(f"unsupported BitsAllocated {bits}")
    signed = (h.get("PixelRepresentation") or 0) == 1
    return np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")


def read_pixels(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored pixel values (H, W) or (frames, H, W) and the header; no modality check, no rescale."""
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise DicomError(f"cannot read file ({e.strerror})") from None
    parsed, buf = parse(path, buf)
    h = parsed.header
    h["_has_pixels"] = True
    fast = parsed.pixel_offset is not None and parsed.transfer_syntax in UNCOMPRESSED and parsed.pixel_length is not None
    if fast:
        reason = check(parsed, require_ct=False) if (h.get("NumberOfFrames") or 1) == 1 else None
        if reason and reason.startswith(("truncated", "missing")):
            raise DicomError(reason)
        frames = h.get("NumberOfFrames") or 1
        dt = _dtype(h)
        count = frames * h["Rows"] * h["Columns"] * (h.get("SamplesPerPixel") or 1)
        if parsed.pixel_offset + count * dt.itemsize > len(buf):
            raise DicomError(f"truncated file: pixel data has {len(buf) - parsed.pixel_offset} of {count * dt.itemsize} bytes")
        px = np.frombuffer(buf, dtype=dt, count=count, offset=parsed.pixel_offset)
        spp = h.get("SamplesPerPixel") or 1
        shape = (h["Rows"], h["Columns"]) + ((spp,) if spp > 1 else ())
        px = px.reshape((frames,) + shape if frames > 1 else shape)
        stored = h.get("BitsStored") or dt.itemsize * 8
        if dt.kind == "i" and stored < dt.itemsize * 8:  # sign-extend from BitsStored
            shift = dt.itemsize * 8 - stored
            px = (px << shift) >> shift
        return px, h
    parsed2, ds = _pydicom_parse(buf, with_pixels=True)
    h = {**parsed2.header, "TransferSyntaxUID": parsed.transfer_syntax or parsed2.transfer_syntax,
         "_file_size": len(buf), "_has_pixels": "PixelData" in ds}
    if not h["_has_pixels"]:
        raise DicomError("no PixelData element")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            px = ds.pixel_array
        except Exception as e:
            ts = h["TransferSyntaxUID"] or "unknown transfer syntax"
            raise DicomError(f"cannot decode pixels ({ts}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return np.asarray(px), h


def rescale_params(h: dict[str, Any]) -> tuple[float, float, bool]:
    """(slope, intercept, corrupted): the RSNA fix applies when BitsStored 12, unsigned and intercept > -100."""
    slope = h.get("RescaleSlope")
    intercept = h.get("RescaleIntercept")
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    corrupted = h.get("BitsStored") == 12 and (h.get("PixelRepresentation") or 0) == 0 and intercept > -100
    return slope, intercept, corrupted


def to_hu(px: np.ndarray, h: dict[str, Any], dtype: type = np.float32) -> np.ndarray:
    """Stored values -> HU. dtype=np.int16 keeps integers exact when slope and intercept are integral."""
    slope, intercept, corrupted = rescale_params(h)
    if corrupted:
        px = px.astype(np.int32) + 1000
        px[px >= 4096] -= 4096
        intercept = -1000.0
    if dtype is np.int16 and slope == 1 and intercept.is_integer() and px.dtype in (np.int16, np.uint16):
        lo, hi = int(px.min(initial=0)), int(px.max(initial=0))
        if hi <= 32767 and -32768 <= lo + intercept and hi + intercept <= 32767:  # no overflow: stay in int16
            return px.view(np.int16) + np.int16(intercept) if px.dtype == np.uint16 else px + np.int16(intercept)
    if dtype is np.int16 and slope.is_integer() and intercept.is_integer():
        hu = px.astype(np.int32)
        if slope != 1:
            hu *= int(slope)
        hu += int(intercept)
        return np.clip(hu, -32768, 32767).astype(np.int16)
    hu = px.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if dtype is np.int16:
        return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    return hu.astype(dtype, copy=False)


def read_hu(path: str | Path, require_ct: bool = True, dtype: type = np.float32) -> np.ndarray:
    """One CT slice in Hounsfield units, (H, W). Raises DicomError(reason) for anything that is not one."""
    px, h = read_pixels(path)
    reason = check(Parsed(header=h), require_ct=require_ct)
    if reason:
        raise DicomError(reason)
    if px.ndim != 2:
        raise DicomError(f"unexpected pixel array shape {px.shape}")
    return to_hu(px, h, dtype=dtype)
