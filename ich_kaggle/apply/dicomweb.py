"""A study pulled from a PACS over DICOMweb (QIDO-RS to list its series, WADO-RS to fetch them) into a folder.

DICOMweb is what PACS and vendor-neutral archives (Orthanc, dcm4chee, Google/Azure/AWS healthcare APIs) share over
plain HTTP, so `infer --dicomweb <url> --study <uid>` reaches a hospital's archive without DIMSE networking. The
client is `dicomweb-client` (maintained by the imaging-data-commons group). Series are fetched one at a time and
written as they arrive, so a study of thousands of slices never sits in memory; each instance is written as a
DICOM part-10 file named by its SOPInstanceUID, and `infer` then reads the folder like any other.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from ..core.errors import UserError

log = logging.getLogger(__name__)

# a DICOM UID is digits and dots, but anonymised sets use others (the competition's are `ID_<hex>`): any name that is
# safe in a URL path and as a file name is accepted
UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SERIES_UID = "0020000E"
N_INSTANCES = "00201209"  # NumberOfSeriesRelatedInstances
MODALITY = "00080060"


def _value(item: dict, tag: str):
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def shown(url: str) -> str:
    """The URL without a login in it (`https://user:password@host/...`), for messages and logs."""
    return re.sub(r"^(https?://)[^/@]*@", r"\1", url)


def _fail(url: str, what: str, e: Exception) -> UserError:
    import requests

    raw, url = url, shown(url)
    if isinstance(e, requests.HTTPError) and e.response is not None:
        code = e.response.status_code
        fix = (
            "check the login in the URL (https://user:password@host/...)"
            if code in (401, 403)
            else "check the address: it is the DICOMweb root, e.g. http://host:8042/dicom-web for Orthanc"
        )
        return UserError(f"{url}: {what} answered HTTP {code}; {fix}")
    if isinstance(e, requests.RequestException):
        return UserError(
            f"cannot reach {url} ({type(e).__name__}); check that the server runs and the address "
            "is its DICOMweb root, e.g. http://host:8042/dicom-web"
        )
    return UserError(f"{url}: {what} failed ({type(e).__name__}: {str(e).replace(raw, url)})")


def pull(url: str, study: str, dest: Path) -> list[Path]:
    """Every instance of `study` at the DICOMweb root `url`, written under dest/<SeriesInstanceUID>/; the files."""
    from dicomweb_client.api import DICOMwebClient

    if not url.startswith(("http://", "https://")):
        raise UserError(
            f"--dicomweb {shown(url)}: give the DICOMweb root as an http(s) URL, e.g. http://host:8042/dicom-web"
        )
    if not UID.match(study):
        raise UserError(f"--study {study!r} is not a StudyInstanceUID (digits and dots, e.g. 1.2.840.113619.2.55)")
    client = DICOMwebClient(url.rstrip("/"), timeout=(10, 120), permissive_uid=True)
    # its default retries any failure 5 times over 30 s; 3 tries over 1.5 s still ride out a busy server's 503
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)
    try:
        series = client.search_for_series(study_instance_uid=study, get_remaining=True)
    except Exception as e:
        raise _fail(url, "the series search (QIDO-RS)", e) from None
    if not series:
        raise UserError(
            f"{shown(url)} has no study {study}: check the StudyInstanceUID (the archive's study list "
            f"is at {shown(url).rstrip('/')}/studies)"
        )
    total = sum(int(_value(s, N_INSTANCES) or 0) for s in series) or None
    files: list[Path] = []
    with tqdm(total=total, desc="dicomweb", unit="file") as bar:
        for item in series:
            uid = str(_value(item, SERIES_UID) or "")
            if not UID.match(uid):
                log.warning("%s: a series without a valid SeriesInstanceUID (%r) is left out", study, uid)
                continue
            folder = dest / uid
            folder.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns about every anonymised UID (`ID_...`) it parses
                try:
                    for k, ds in enumerate(client.iter_series(study, uid)):
                        sop = str(ds.get("SOPInstanceUID", ""))
                        path = folder / (f"{sop}.dcm" if UID.match(sop) else f"instance{k:05d}.dcm")
                        ds.save_as(path, enforce_file_format=True)
                        files.append(path)
                        bar.update()
                except Exception as e:
                    raise _fail(url, f"fetching series {uid} (WADO-RS)", e) from None
    log.info("%s: %d files in %d series pulled from %s", study, len(files), len(series), shown(url))
    return files


@contextlib.contextmanager
def pulled(url: str, study: str) -> Iterator[Path]:
    """A temporary folder holding the pulled study, removed when the block ends (the outputs keep what matters)."""
    with tempfile.TemporaryDirectory(prefix="ich_kaggle-dicomweb-") as tmp:
        pull(url, study, Path(tmp))
        yield Path(tmp)
