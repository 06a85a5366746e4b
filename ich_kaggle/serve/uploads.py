"""What a browser sends, received into one job's folder and checked before any model sees it.

An upload is untrusted: it is streamed to disk under the job's folder (never to the system temp folder, as a
form library would spool it), under file names made here (the client's names and paths are never used as paths),
and counted as it arrives so that a too-large upload stops at the limit. Zips are extracted inside the job's folder
by `data.studies.safe_extract` (no absolute or `..` names, no links, bounded entries, ratio and bytes written), the
one extractor `infer` uses too. What is left in `upload/` are files that start like DICOM files: the grouping by
study and series is done from their headers later, so their names and layout do not matter.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from python_multipart.multipart import MultipartParser, parse_options_header

from ..core.errors import UserError
from ..data import studies

MiB = 1 << 20


class Rejected(Exception):
    """An upload that is refused as a whole; the message is shown to the user as it is."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """A head CT study is ~30-600 slices of ~0.5 MB: a few studies fit in 2 GiB. What a zip may expand to is
    `data.studies`' limit, the same for `infer` on the command line."""

    max_upload_bytes: int = 2048 * MiB


@dataclass
class Received:
    """The files of one upload after the checks: DICOM-looking files in `folder`, and what was left out and why."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def is_dicom(path: Path) -> bool:
    """The DICOM file format's marker: 'DICM' after a 128-byte preamble (part 10 files, what scanners export)."""
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def safe_name(name: str, index: int) -> str:
    """A file name made from the client's: its last component, letters, digits, '.', '-' and '_' only, prefixed with
    the file's position so two uploads named alike never collide."""
    base = PureWindowsPath(PurePosixPath(name).name).name  # browsers may send 'folder/a.dcm' or 'C:\\x\\a.dcm'
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:80] or "file"
    return f"{index:05d}_{base}"


class MultipartReceiver:
    """Streams a multipart/form-data body into `folder`: each file part becomes one file named by `safe_name`."""

    def __init__(self, content_type: str, folder: Path, limits: Limits):
        ctype, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary:
            raise Rejected("send the files as a multipart/form-data upload (the page's form does)")
        self.folder, self.limits = folder, limits
        self.files: list[Path] = []
        self.received = 0
        self._out = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._field,
                "on_header_value": self._value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done,
                "on_part_data": self._data,
                "on_part_end": self._part_end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.limits.max_upload_bytes:
            raise Rejected(
                f"the upload is larger than {self.limits.max_upload_bytes // MiB} MiB: send fewer studies "
                "at a time (or start the server with a larger --max-upload-mb)",
                status=413,
            )
        try:
            self._parser.write(chunk)
        except Exception as e:  # python-multipart raises its own errors on a malformed body
            raise Rejected(f"the upload is not a well-formed form ({e}); send it again from the page") from None

    def close(self) -> list[Path]:
        self._part_end()
        return self.files

    def _part_begin(self) -> None:
        self._headers = {}

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_done(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        filename = params.get(b"filename")
        if filename is None:  # a plain form field: nothing of it is needed
            return
        name = filename.decode("utf-8", "replace")
        if not name:
            return  # an empty file input sends a part with no name and no bytes
        path = self.folder / safe_name(name, len(self.files))
        self.files.append(path)
        self._out = open(path, "wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self._out.write(data[start:end])

    def _part_end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def prepare(files: list[Path], folder: Path, limits: Limits) -> Received:
    """Unzip the zips (checked first) and keep the files that start like DICOM; refuse an upload with none."""
    got = Received(folder)
    budget = [studies.MAX_ZIP_BYTES]  # shared by all the zips of the upload
    if not files:
        raise Rejected("no file was sent: choose a .zip of a study or its DICOM files")
    for path in files:
        shown = path.name.split("_", 1)[1]
        if is_zip(path):
            into = path.with_name(path.name + ".d")  # its own folder, inside the job's
            try:
                extracted = studies.safe_extract(path, into, budget)
            except UserError as e:  # the rule it broke, named with the user's file name, not the job's path
                raise Rejected(str(e).replace(str(path), shown)) from None
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as e:
                raise Rejected(
                    f"{shown}: not a zip that can be read here ({e}); zip the study folder again without a password"
                ) from None
            path.unlink()
            for member in extracted:
                if is_dicom(member):
                    got.files.append(member)
                else:
                    got.dropped.append(f"{shown}/{member.relative_to(into)}: not a DICOM file")
                    member.unlink()
        elif is_dicom(path):
            got.files.append(path)
        else:
            got.dropped.append(f"{shown}: not a DICOM file (no DICM marker) nor a .zip")
            path.unlink()
    if not got.files:
        raise Rejected(
            "nothing in the upload is a DICOM file: "
            + "; ".join(got.dropped[:3])
            + ("; ..." if len(got.dropped) > 3 else "")
            + ". Send a head CT study as a .zip or its .dcm files"
        )
    return got


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
