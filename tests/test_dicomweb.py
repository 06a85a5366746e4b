"""A study pulled from a real PACS: Orthanc with its DICOMweb plugin, started on loopback with a throwaway config,
holding a study of the real mini set uploaded through its REST API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from ich_kaggle.core.labels import LABELS

PLUGIN = "libOrthancDicomWeb.so"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all bound at once, so never the same one twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def dicomweb_plugin() -> Path | None:
    """Where Debian's orthanc-dicomweb put the plugin (`dpkg -L`), else the usual place."""
    try:
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True).stdout.split()
    except OSError:
        listed = []
    found = [Path(p) for p in listed if p.endswith(PLUGIN)] + [Path("/usr/share/orthanc/plugins") / PLUGIN]
    return next((p for p in found if p.exists()), None)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """The root URL of a fresh Orthanc (DICOMweb at <root>/dicom-web); stopped after the module."""
    import requests

    exe = shutil.which("Orthanc")
    plugin = dicomweb_plugin()
    if exe is None or plugin is None:
        pytest.skip(
            "Orthanc or its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; "
            ".ci/run installs them)"
        )
    tmp = tmp_path_factory.mktemp("orthanc")
    port, dicom_port = free_ports(2)
    config = {
        "Name": "ich_kaggle-test",
        "StorageDirectory": str(tmp / "db"),
        "IndexDirectory": str(tmp / "db"),
        "HttpPort": port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (tmp / "orthanc.json").write_text(json.dumps(config))
    log = open(tmp / "orthanc.log", "wb")
    proc = subprocess.Popen([exe, str(tmp / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            if proc.poll() is not None:
                break
            try:
                if requests.get(f"{root}/plugins/dicom-web", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        else:
            proc.poll()
        if proc.returncode is not None or not requests.get(f"{root}/plugins/dicom-web", timeout=2).ok:
            tail = (tmp / "orthanc.log").read_text(errors="replace")[-400:]
            pytest.skip(f"Orthanc with DICOMweb did not start on port {port}: {tail}")
        yield root
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def pacs_study(orthanc, mini_dir) -> tuple[str, list[Path]]:
    """(StudyInstanceUID, its files): the mini set's whole test study, stored in Orthanc through POST /instances."""
    import pydicom
    import requests

    by_study: dict[str, list[Path]] = {}
    for f in sorted((mini_dir / "stage_2_test").iterdir()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the competition's anonymised UIDs are not digits and dots
            uid = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID
        by_study.setdefault(str(uid), []).append(f)
    uid, files = max(by_study.items(), key=lambda kv: len(kv[1]))
    for f in files:
        requests.post(f"{orthanc}/instances", data=f.read_bytes(), timeout=10).raise_for_status()
    return uid, files


def test_pull_gives_the_study_pixel_for_pixel(orthanc, pacs_study, tmp_path):
    from ich_kaggle.apply import dicomweb
    from ich_kaggle.data import dicom, studies

    uid, files = pacs_study
    pulled = dicomweb.pull(f"{orthanc}/dicom-web", uid, tmp_path)
    assert len(pulled) == len(files)
    got = studies.collect([tmp_path])
    assert got.studies == [uid] and len(got.slices) == len(files) and got.skipped.empty
    original = {f.stem: f for f in files}  # the mini set's files are named by SOPInstanceUID
    for path in pulled[:3]:
        assert np.array_equal(dicom.read_hu(path), dicom.read_hu(original[path.stem]))


@pytest.mark.parametrize(
    "url, study, says",
    [
        ("{root}/dicom-web", "1.2.3.4", "has no study 1.2.3.4"),
        ("{root}/not-dicomweb", "1.2.3.4", "answered HTTP 404"),
        ("http://user:secret@127.0.0.1:{closed}/dicom-web", "1.2.3.4", "cannot reach http://127.0.0.1"),
        ("{root}/dicom-web", "1.2/../3", "is not a StudyInstanceUID"),
    ],
)
def test_pull_failures_are_one_line(orthanc, tmp_path, url, study, says):
    from ich_kaggle.apply import dicomweb
    from ich_kaggle.core.errors import UserError

    with pytest.raises(UserError, match=says) as e:
        dicomweb.pull(url.format(root=orthanc, closed=free_port()), study, tmp_path)
    assert "\n" not in str(e.value) and "secret" not in str(e.value)  # a login in the URL is never shown
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_infer_pulls_the_study_from_the_pacs(orthanc, pacs_study, tiny_bundle, tmp_path):
    """`infer --dicomweb <url> --study <uid>`: the study's every slice scored, as from its files on disk."""
    import pandas as pd

    from ich_kaggle.cli import main

    uid, files = pacs_study
    out = tmp_path / "out"
    assert (
        main(
            [
                "infer",
                "--model",
                str(tiny_bundle),
                "--out",
                str(out),
                "--dicomweb",
                f"{orthanc}/dicom-web",
                "--study",
                uid,
            ]
        )
        == 0
    )
    slices = pd.read_csv(out / "slices.csv")
    assert set(slices["sop_instance_uid"]) == {f.stem for f in files}
    assert list(pd.read_csv(out / "studies.csv")["study_id"]) == [uid]
    assert (out / "report.html").stat().st_size > 0
    local = tmp_path / "local"
    assert main(["infer", "--model", str(tiny_bundle), "--out", str(local), *map(str, files)]) == 0
    by_file = pd.read_csv(local / "slices.csv").set_index("sop_instance_uid")
    pulled = slices.set_index("sop_instance_uid").loc[by_file.index]
    assert np.allclose(pulled[list(LABELS)], by_file[list(LABELS)], atol=1e-6)


def test_infer_dicomweb_needs_its_study(tmp_path, capsys):
    from ich_kaggle.cli import main

    assert (
        main(["infer", "--model", str(tmp_path / "bundle"), "--out", str(tmp_path), "--dicomweb", "http://x/dicom-web"])
        == 2
    )
    assert "--dicomweb and --study go together" in capsys.readouterr().err
