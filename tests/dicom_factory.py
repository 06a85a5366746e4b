"""Small DICOM files written with pydicom for the data-layer tests (header variants, broken files)."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _quiet(fn):
    """RSNA-style ids ("ID_...") are not valid UIDs: silence pydicom's validation warnings while writing."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)

    return wrapper


@_quiet
def write_ct(
    path: Path,
    pixels: np.ndarray | None,
    *,
    bits_stored: int = 16,
    pixel_representation: int = 1,
    intercept: float | None = -1024.0,
    slope: float | None = 1.0,
    implicit: bool = False,
    patient: str | None = "ID_p0",
    study: str = "ID_s0",
    series: str = "ID_r0",
    ipp: tuple[float, float, float] | None = (0.0, 0.0, 0.0),
    iop: tuple[float, ...] | None = (1, 0, 0, 0, 1, 0),
    instance: int | None = None,
    modality: str = "CT",
    samples: int = 1,
    photometric: str = "MONOCHROME2",
    extra_bytes: int = 0,
    sequence: bool = False,
) -> Path:
    """A single-frame little-endian DICOM; `pixels=None` writes no PixelData element."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_STORAGE
    ds.SOPInstanceUID = Path(path).stem
    ds.Modality = modality
    if patient is not None:
        ds.PatientID = patient
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    if instance is not None:
        ds.InstanceNumber = instance
    if ipp is not None:
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    if iop is not None:
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    if extra_bytes:
        ds.ImageComments = "x" * extra_bytes
    if sequence:
        item = Dataset()
        item.CodeValue = "123"
        ds.ReferencedImageSequence = [item]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if pixels is not None:
        pixels = np.asarray(pixels)
        ds.Rows, ds.Columns = pixels.shape[:2]
    else:
        ds.Rows, ds.Columns = 4, 4
    ds.PixelSpacing = ["0.488281", "0.488281"]
    ds.BitsAllocated = 8 if samples == 3 else 16
    ds.BitsStored = 8 if samples == 3 else bits_stored
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0 if samples == 3 else pixel_representation
    if samples == 3:
        ds.PlanarConfiguration = 0
    if intercept is not None:
        ds.RescaleIntercept = f"{intercept:g}"
    if slope is not None:
        ds.RescaleSlope = f"{slope:g}"
    if pixels is not None:
        dtype = np.uint8 if samples == 3 else (np.int16 if pixel_representation else np.uint16)
        ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)
