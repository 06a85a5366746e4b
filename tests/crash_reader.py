"""A header reader whose process dies on files named *crash*: a real worker death, as a segfault in a pixel
decoder or the out-of-memory killer causes, for the meta scan's tests (a module of its own: workers import it)."""

from __future__ import annotations

import os

from ich_kaggle.data import dicom


def scan_or_die(path: str) -> tuple[dicom.Parsed, str | None]:
    if "crash" in os.path.basename(path):
        os._exit(70)
    return dicom.scan(path)


def scan_or_raise(path: str) -> tuple[dicom.Parsed, str | None]:
    if "bug" in os.path.basename(path):
        raise RuntimeError("a reader bug")
    return dicom.scan(path)
