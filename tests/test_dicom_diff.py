"""The project's DICOM reader against pydicom, the reference: pydicom's own test files plus seeded mutations of the
mini set's real slices. Whatever the bytes, the reader raises only DicomError; for 2-D monochrome images it accepts
exactly what pydicom decodes and gives the same HU and header fields; `scan` (meta.csv) and `read_hu` (the cache)
agree. The counts are printed (`pytest -s`, or the captured output)."""

from __future__ import annotations

import io
import math
import re
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files

import dicom_mutations as dm
from dicom_mutations import mutants
from ich_kaggle.data import dicom

PER_KIND = 20  # mutants of each of the 18 kinds
BIG = 2_000_000  # pydicom test files above this size (multi-frame colour, big radiographs) cost seconds each


def reference_hu(data: bytes) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """(int16 HU, float32 HU, "") by pydicom alone, or (None, None, why not) for anything that is not one 2-D
    monochrome image with a finite rescale. Written from the DICOM rules, not from the reader's code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            if "PixelData" not in ds:
                return None, None, "no pixels"
            photometric = ds.get("PhotometricInterpretation")
            if ds.get("SamplesPerPixel") != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
                return None, None, "not monochrome"
            frames = ds.get("NumberOfFrames")
            if frames not in (None, "") and int(frames) not in (0, 1):
                return None, None, "multi-frame"
            px = ds.pixel_array
        except Exception as e:
            return None, None, f"pydicom: {type(e).__name__}"
        if px.ndim != 2 or px.size == 0:
            return None, None, "not 2-D"
        rescale = []
        for kw, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
            try:
                v = ds[kw].value if kw in ds else None
                x = default if v is None or v == "" else float(v)
            except Exception:
                return None, None, f"{kw} unusable"
            if not math.isfinite(x):
                return None, None, f"{kw} not finite"
            rescale.append(x)
        slope, intercept = rescale
    values = px.astype(np.float64)
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and intercept > -100:  # the RSNA forum's fix
        values = (values + 1000) % 4096
        intercept = -1000.0
    hu = values * slope + intercept
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16), hu.astype(np.float32), ""


TEXT_FIELDS = ("SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
NUMBER_FIELDS = ("InstanceNumber", "SliceThickness", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


def reference_header(data: bytes) -> dict[str, object]:
    """The fields meta.csv is made of, as pydicom reads them (None where absent, empty or unparseable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        out: dict[str, object] = {}
        for kw in TEXT_FIELDS + NUMBER_FIELDS:
            try:
                v = ds.get(kw)
                if v is None or v == "":
                    out[kw] = None
                elif kw in TEXT_FIELDS:
                    out[kw] = v if isinstance(v, str) else None
                else:
                    nums = [float(x) for x in (v if isinstance(v, pydicom.multival.MultiValue) else [v])]
                    ok = all(math.isfinite(x) for x in nums)
                    if kw.startswith(("Image", "Pixel")):  # vectors
                        out[kw] = nums if ok else None
                    else:  # single numbers: several values, or an IS with a fraction, are unusable, not guessed
                        ok = ok and len(nums) == 1 and (kw != "InstanceNumber" or nums[0].is_integer())
                        out[kw] = nums[0] if ok else None
            except Exception:
                out[kw] = None
    return out


class Crash(Exception):
    """The reader raised something other than its own rejection."""


def reader(path: Path, dtype: type) -> tuple[np.ndarray | None, str]:
    """(HU, "") or (None, the reader's rejection); any other exception becomes Crash."""
    try:
        return dicom.read_hu(path, require_ct=False, dtype=dtype), ""
    except dicom.DicomError as e:
        return None, e.reason
    except Exception as e:
        raise Crash(f"{type(e).__name__}: {e}") from e


def _reason_kind(reason: str) -> str:
    """A reason without its particulars ("truncated file: pixel data has 10 of 20 bytes" -> "truncated file")."""
    return re.split(r"[(:0-9]", reason, maxsplit=1)[0].strip()


def _corpus(mini_dir: Path) -> list[tuple[str, bytes]]:
    files = [Path(f) for f in get_testdata_files() if Path(f).is_file() and Path(f).stat().st_size < BIG]
    items = [("pydicom:" + f.name, f.read_bytes()) for f in sorted(files)]
    real = sorted((mini_dir / "stage_2_train").glob("*.dcm"))
    explicit = [p for p in real if dicom.read_header(p)["TransferSyntaxUID"].endswith(".1")]
    implicit = [p for p in real if not dicom.read_header(p)["TransferSyntaxUID"].endswith(".1")]
    slices = [p.read_bytes() for pair in zip(explicit[:4], implicit[:4]) for p in pair]
    items += [(f"real:{p.name}", p.read_bytes()) for p in real[:20]]
    items += [(f"mutant:{kind}", data) for kind, data in mutants(slices, PER_KIND, seed=13)]
    return items


def test_reader_agrees_with_pydicom(tmp_path, mini_dir):
    t0, c0 = time.perf_counter(), time.process_time()
    items = _corpus(mini_dir)
    counts: Counter = Counter()
    reasons: Counter = Counter()
    problems: list[str] = []
    path = tmp_path / "f.dcm"
    for name, data in items:
        path.write_bytes(data)
        group = name.split(":")[0] if not name.startswith("mutant:") else name
        ref16, ref32, why = reference_hu(data)
        counts["files"] += 1
        try:
            got16, reason = reader(path, np.int16)
        except Crash as e:
            problems.append(f"{name}: the reader raised {e}")
            continue
        if (ref16 is None) != (got16 is None):
            problems.append(
                f"{name}: pydicom {'rejects (' + why + ')' if ref16 is None else 'accepts'}, "
                f"reader {'rejects (' + reason + ')' if got16 is None else 'accepts'}"
            )
            continue
        try:  # the header scan (meta.csv) must give the verdict of the pixel reader (the cache)
            parsed, why_not = dicom.scan(path)
            scanned, scan_fast = why_not is None, parsed.fast
        except dicom.DicomError:
            parsed, scanned, scan_fast = None, False, False
        if got16 is None:
            counts["agreed: both reject"] += 1
            reasons[_reason_kind(reason)] += 1
            cached = False
        else:
            try:  # the cache's own call (CT only), in float32 for a second HU comparison
                got32, cached = dicom.read_hu(path, dtype=np.float32), True
            except dicom.DicomError:  # not a CT image (MR, ...): rejected by the cache, compared all the same
                got32, cached = dicom.read_hu(path, require_ct=False, dtype=np.float32), False
            if not (np.array_equal(got16, ref16) and np.array_equal(got32, ref32)):
                d16 = np.abs(got16.astype(np.int64) - ref16).max() if got16.shape == ref16.shape else "shape"
                d32 = np.abs(got32.astype(np.float64) - ref32).max() if got32.shape == ref32.shape else "shape"
                problems.append(f"{name}: HU differ from pydicom's (max |diff| int16 {d16}, float32 {d32})")
                continue
            counts["agreed: both accept, identical HU"] += 1
            h, ref_h = parsed.header if parsed else {}, reference_header(data)
            differ = [kw for kw in ref_h if h.get(kw) != ref_h[kw]]
            if differ:
                problems.append(
                    f"{name}: header fields differ from pydicom's: "
                    + ", ".join(f"{kw} {h.get(kw)!r} vs {ref_h[kw]!r}" for kw in differ)
                )
            counts[f"accepted via the {'fast path' if scan_fast else 'pydicom path'}"] += 1
        if scanned != cached:
            problems.append(
                f"{name}: scan {'accepts' if scanned else 'rejects'}, read_hu {'accepts' if cached else 'rejects'}"
            )
        counts[f"group {group}"] += 1
    lines = [f"differential reader test: {time.perf_counter() - t0:.1f}s ({time.process_time() - c0:.1f}s CPU)"]
    lines += [f"  {k}: {v}" for k, v in sorted(counts.items())]
    lines += ["  rejections by reason:"] + [f"    {k}: {v}" for k, v in reasons.most_common()]
    print("\n".join(lines))
    assert not problems, f"{len(problems)} disagreement(s):\n" + "\n".join(problems[:40])
    assert counts["agreed: both accept, identical HU"] >= 100 and counts["agreed: both reject"] >= 200
    assert counts["accepted via the fast path"] >= 20 and counts["accepted via the pydicom path"] >= 20


def _real(mini_dir: Path, syntax_end: str, stored: int) -> bytes:
    for p in sorted((mini_dir / "stage_2_train").glob("*.dcm")):
        h = dicom.read_header(p)
        if h["TransferSyntaxUID"].endswith(syntax_end) and h["BitsStored"] == stored:
            return p.read_bytes()
    raise AssertionError(f"no real slice with transfer syntax *{syntax_end} and BitsStored {stored}")


def _edit(data: bytes, **kw) -> bytes:
    """Set (bytes) or drop (None) elements given by mutation-module tag names; `tail` is appended."""
    s = dm.parse(data)
    tail = kw.pop("tail", b"")
    for name, value in kw.items():
        tag = getattr(dm, name)
        s.drop(tag) if value is None else s.set(tag, value)
    return dm.build(s) + tail


def _u32_pixels(data: bytes) -> bytes:
    px = np.frombuffer(dm.parse(data).pixels(), np.uint16).astype(np.uint32) << 20  # up to ~2**32
    return _edit(data, BITS=dm._u16(32), STORED=dm._u16(32), SIGNED=dm._u16(0), PIXELS=px.tobytes())


def _high_bits(data: bytes) -> bytes:
    px = np.frombuffer(dm.parse(data).pixels(), np.uint16) | np.uint16(0xF000)  # every pixel: bits 12-15 set
    return _edit(data, PIXELS=px.tobytes())


def _second_pixels(data: bytes) -> bytes:
    s = dm.parse(data)
    return dm.build(s) + dm.element(dm.PIXELS, b"OW", s.pixels()[::-1])


CASES = {  # the defects of issue 13: name -> (mutation, "accept" or words of the rejection)
    "InstanceNumber inf": (lambda d: _edit(d, INSTANCE=b"inf"), "accept"),
    "InstanceNumber 1e999": (lambda d: _edit(d, INSTANCE=b"1e999"), "accept"),
    "NumberOfFrames 1e999": (lambda d: _edit(d, FRAMES=b"1e999"), "cannot decode"),
    "NumberOfFrames 2 without Rows": (lambda d: _edit(d, FRAMES=b"2", ROWS=None), "multi-frame"),
    "NumberOfFrames -1": (lambda d: _edit(d, FRAMES=b"-1"), "multi-frame"),
    "intercept beyond int32": (lambda d: _edit(d, INTERCEPT=b"-3000000000"), "accept"),
    "uint32 pixels above 2**31": (_u32_pixels, "accept"),
    "Rows 0": (lambda d: _edit(d, ROWS=dm._u16(0)), "cannot decode"),
    "bits above BitsStored": (_high_bits, "accept"),
    "no PixelRepresentation": (lambda d: _edit(d, SIGNED=None), "cannot decode"),
    "no SamplesPerPixel": (lambda d: _edit(d, SAMPLES=None), "colour"),
    "no PhotometricInterpretation": (lambda d: _edit(d, PHOTOMETRIC=None), "colour"),
    "no BitsAllocated": (lambda d: _edit(d, BITS=None), "cannot decode"),
    "no BitsStored": (lambda d: _edit(d, STORED=None), "cannot decode"),
    "unparseable intercept": (lambda d: _edit(d, INTERCEPT=b"abc"), "RescaleIntercept"),
    "surplus pixel data": (lambda d: _edit(d, PIXELS=dm.parse(d).pixels() + bytes(4)), "accept"),
    "PixelData twice": (_second_pixels, "accept"),
    "BitsAllocated 12": (lambda d: _edit(d, BITS=dm._u16(12)), "cannot decode"),
    "undefined-length native pixels": (lambda d: dm.build(dm.parse(d), lengths={dm.PIXELS: 0xFFFFFFFF}), "reject"),
    "no transfer syntax": (lambda d: _edit(d, TS=None), "no transfer syntax"),
    "file meta without preamble": (lambda d: dm.build(dm.parse(d), preamble=False), "accept"),
    "bare dataset": (lambda d: dm.build(dm.parse(d), preamble=False, meta=False), "no transfer syntax"),
    "SpecificCharacterSet ISO_IR 192": (lambda d: _edit(d, CHARSET=b"ISO_IR 192", PATIENT="ID_é".encode()), "accept"),
    "empty value in ImagePositionPatient": (lambda d: _edit(d, IPP=b"1\\\\3"), "accept"),
}


@pytest.mark.parametrize("case", CASES)
def test_issue_cases(case, tmp_path, mini_dir):
    mutate, expect = CASES[case]
    base = _real(mini_dir, ".1", 12)  # explicit VR, BitsStored 12, unsigned: the commonest RSNA profile
    data = mutate(base)
    path = tmp_path / "ID_case.dcm"
    path.write_bytes(data)
    ref16, ref32, why = reference_hu(data)
    got, reason = reader(path, np.int16)
    if expect == "accept":
        assert ref16 is not None, why
        assert got is not None, reason
        np.testing.assert_array_equal(got, ref16)
        np.testing.assert_array_equal(dicom.read_hu(path, dtype=np.float32), ref32)
        assert dicom.scan(path)[1] is None
    else:
        assert ref16 is None and got is None
        assert expect == "reject" or expect in reason, reason
        try:
            assert dicom.scan(path)[1] is not None
        except dicom.DicomError:
            pass
    h = dicom.read_header(path) if got is not None else {}
    ref = pydicom.dcmread(io.BytesIO(data), force=True)
    if case.startswith("InstanceNumber"):
        assert "InstanceNumber" not in h  # unreadable: absent, the slice order falls back to positions
    if case == "bits above BitsStored":
        assert got.max() < 4096 - 1024  # the set high bits were cleared, as pydicom does
    if case == "PixelData twice":
        last = (np.frombuffer(dm.parse(base).pixels()[::-1], np.uint16) & 0xFFF).astype(np.int64) - 1024
        np.testing.assert_array_equal(got.ravel(), last)  # the last PixelData counts, as in pydicom
    if case == "intercept beyond int32":
        assert got.max() == -32768  # clipped to int16, no int32 overflow
    if case == "uint32 pixels above 2**31":
        assert dicom.read_hu(path).max() > 2**31
    if case.startswith("SpecificCharacterSet"):
        assert h["PatientID"] == "ID_é" == ref.PatientID
    if case == "empty value in ImagePositionPatient":
        assert "ImagePositionPatient" not in h  # not [1, 3]: positions would shift
