"""DICOM -> HU: the RSNA intercept fix, both header variants, compressed syntaxes, and broken files."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_factory import write_ct
from ich_kaggle.data import dicom
from ich_kaggle.data.windows import apply_windows, jitter, named


def test_corrupted_rsna_header_is_fixed(tmp_path):
    # BitsStored 12, unsigned, intercept 0 (> -100): the competition's broken variant
    raw = np.array([[0, 24, 1000, 3095], [3096, 4095, 2024, 1064]], dtype=np.uint16)
    path = write_ct(tmp_path / "ID_bad.dcm", raw, bits_stored=12, pixel_representation=0, intercept=0.0)
    # by hand: (raw + 1000) wrapped at 4096, then intercept -1000
    expected = np.array([[0, 24, 1000, 3095], [-1000, -1, 2024, 1064]], dtype=np.float32)
    hu = dicom.read_hu(path)
    assert hu.dtype == np.float32 and hu.shape == (2, 4)
    np.testing.assert_array_equal(hu, expected)
    np.testing.assert_array_equal(dicom.read_hu(path, dtype=np.int16), expected.astype(np.int16))
    assert dicom.rescale_params(dicom.read_header(path))[2] is True


def test_fix_not_applied_to_good_headers(tmp_path):
    raw = np.array([[0, 1024, 1064, 4095]], dtype=np.uint16)
    ok12 = write_ct(tmp_path / "ID_a.dcm", raw, bits_stored=12, pixel_representation=0, intercept=-1024.0)
    np.testing.assert_array_equal(dicom.read_hu(ok12), [[-1024, 0, 40, 3071]])
    signed = np.array([[-2000, 0, 1024, 1064]], dtype=np.int16)
    ok16 = write_ct(tmp_path / "ID_b.dcm", signed, bits_stored=16, pixel_representation=1, intercept=-1024.0)
    np.testing.assert_array_equal(dicom.read_hu(ok16), [[-3024, -1024, 0, 40]])
    slope2 = write_ct(tmp_path / "ID_c.dcm", signed, intercept=-1000.0, slope=2.0)
    np.testing.assert_array_equal(dicom.read_hu(slope2), [[-5000, -1000, 1048, 1128]])
    half = write_ct(tmp_path / "ID_d.dcm", np.array([[1, 2]], np.int16), intercept=0.0, slope=0.5)
    np.testing.assert_array_equal(dicom.read_hu(half), [[0.5, 1.0]])


@pytest.mark.parametrize("implicit", [False, True])
def test_implicit_explicit_and_odd_sizes(tmp_path, implicit):
    rng = np.random.default_rng(0)
    px = rng.integers(-2000, 3000, size=(37, 53)).astype(np.int16)
    path = write_ct(tmp_path / "ID_x.dcm", px, implicit=implicit, ipp=(-125.0, -100.5, 42.25), instance=7)
    np.testing.assert_array_equal(dicom.read_hu(path), px.astype(np.float32) - 1024)
    h = dicom.read_header(path)
    assert h["TransferSyntaxUID"] == ("1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1")
    assert (h["Rows"], h["Columns"], h["PatientID"], h["InstanceNumber"]) == (37, 53, "ID_p0", 7)
    assert h["ImagePositionPatient"] == [-125.0, -100.5, 42.25] and h["RescaleIntercept"] == -1024.0
    assert h["_has_pixels"] is True


def test_long_header_and_sequences_fall_back_correctly(tmp_path):
    px = np.arange(16, dtype=np.int16).reshape(4, 4)
    long_header = write_ct(tmp_path / "ID_long.dcm", px, extra_bytes=20000)  # beyond the first read
    with_seq = write_ct(tmp_path / "ID_seq.dcm", px, sequence=True, implicit=True)
    for path in (long_header, with_seq):
        np.testing.assert_array_equal(dicom.read_hu(path), px - 1024.0)
        assert dicom.read_header(path)["SeriesInstanceUID"] == "ID_r0"
        assert dicom.scan(path)[1] is None


def test_broken_files_give_reasons(tmp_path, mini_dir):
    real = sorted((mini_dir / "stage_2_train").glob("*.dcm"))[0].read_bytes()
    truncated = tmp_path / "ID_trunc.dcm"
    truncated.write_bytes(real[: len(real) // 2])
    cut_header = tmp_path / "ID_cuthead.dcm"
    cut_header.write_bytes(real[:700])
    text = tmp_path / "ID_text.dcm"
    text.write_text("ID,Label\nID_0_any,0\n")
    empty = tmp_path / "ID_empty.dcm"
    empty.write_bytes(b"")
    colour = write_ct(tmp_path / "ID_rgb.dcm", np.zeros((4, 4, 3), np.uint8), samples=3, photometric="RGB")
    no_pixels = write_ct(tmp_path / "ID_nopix.dcm", None)
    mr = write_ct(tmp_path / "ID_mr.dcm", np.zeros((4, 4), np.int16), modality="MR")
    expect = {
        truncated: "truncated",
        cut_header: "truncated",
        text: "not a DICOM",
        empty: "not a DICOM",
        colour: "colour",
        no_pixels: "no PixelData",
        mr: "not a CT",
    }
    for path, words in expect.items():
        with pytest.raises(dicom.DicomError) as err:
            dicom.read_hu(path)
        assert words in err.value.reason, (path.name, err.value.reason)
        try:
            reason = dicom.scan(path)[1]  # header-only check agrees with the pixel reader
        except dicom.DicomError as e:
            reason = e.reason
        assert reason is not None and words in reason, (path.name, reason)
    assert dicom.read_hu(mr, require_ct=False).shape == (4, 4)
    with pytest.raises(dicom.DicomError, match="cannot read"):
        dicom.read_hu(tmp_path / "missing.dcm")


def test_pydicom_colour_test_file_is_rejected():
    with pytest.raises(dicom.DicomError, match="colour"):
        dicom.read_hu(get_testdata_file("SC_rgb.dcm"))
    with pytest.raises(dicom.DicomError, match="colour"):
        dicom.read_hu(get_testdata_file("SC_rgb_rle.dcm"))


@pytest.mark.parametrize(
    "compressed,twin",
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ],
)
def test_compressed_equals_uncompressed_twin(compressed, twin):
    a, ha = dicom.read_pixels(get_testdata_file(compressed))
    b, hb = dicom.read_pixels(get_testdata_file(twin))
    assert ha["TransferSyntaxUID"] != hb["TransferSyntaxUID"]
    assert a.shape == b.shape and a.size > 0
    if compressed == "JPEG2000.dcm":  # lossy J2K: only close to its uncompressed source
        assert np.abs(a.astype(np.int64) - b).mean() < 0.05 * np.abs(b).mean()
    else:
        np.testing.assert_array_equal(a, b)


def test_jpeg_lossless_and_fast_path_match_pydicom():
    for name in ("JPGLosslessP14SV1_1s_1f_8b.dcm", "CT_small.dcm", "MR_small.dcm"):
        path = get_testdata_file(name)
        px, _ = dicom.read_pixels(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = pydicom.dcmread(path).pixel_array
        np.testing.assert_array_equal(px, ref)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = dicom.read_hu(get_testdata_file("CT_small.dcm"))
    np.testing.assert_array_equal(hu, ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept))


def test_apply_windows():
    hu = np.array([[-1000, 0, 40, 80], [1000, 2000, -20, 180]], dtype=np.int16)
    out = apply_windows(hu, named(["brain", "subdural", "bone"]))
    assert out.shape == (2, 4, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    # a * hu + b in one pass: exact up to float rounding (a pixel at the low end is 0 +- 1e-8)
    np.testing.assert_allclose(out[0, :, 0], [0, 0, 0.5, 1], atol=1e-6)  # brain: 40 +- 40
    np.testing.assert_allclose(out[1, 2:, 1], [0, 1], atol=1e-6)  # subdural: 80 +- 100
    np.testing.assert_allclose(out[1, 0, 2], (1000 - (600 - 1400)) / 2800, rtol=1e-6)
    np.testing.assert_array_equal(apply_windows(hu.astype(np.float32), named(["brain"])), out[..., :1])
    moved = jitter(named(["brain"]), np.random.default_rng(0), 10.0)[0]
    assert moved != named(["brain"])[0] and abs(moved[0] - 40) <= 10 and abs(moved[1] - 80) <= 10
    with pytest.raises(ValueError):
        apply_windows(hu, [(40, 0)])
