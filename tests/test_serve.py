"""The web app as a user meets it: the server on a free loopback port with a real bundle, driven by the system's
Chromium (Playwright pointed at /usr/bin/chromium; nothing downloaded): a study of the real mini set uploaded as a
zip of nested folders gives the per-subtype table of `infer`; bad uploads give their message and leave nothing
behind. Set UPDATE_SCREENSHOT=1 to rewrite docs/images/serve.png from the result page."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import warnings
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from ich_kaggle.core.labels import LABELS

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STUDY = "ID_1f6d1e8aeb"
# end to end (a browser, a server, a trained bundle): `make test-fast` leaves them out
pytestmark = pytest.mark.slow  # the mini set's whole test study (32 slices)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    """(base URL, jobs folder) of `serve` running in a thread of this process (the model loaded once)."""
    import uvicorn

    from ich_kaggle.serve import app, jobs

    root = tmp_path_factory.mktemp("serve") / "jobs"
    run = app.runner(tiny_bundle)
    queue = jobs.Jobs(root, run)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app.create_app(queue), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}/", root, run
    srv.should_exit = True
    thread.join(10)
    queue.close(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements.txt)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1000, "height": 1000})
    page.goto(server[0])
    yield page
    page.close()


@pytest.fixture(scope="module")
def study_zip(mini_dir, tmp_path_factory) -> Path:
    """The study as a user might zip it: nested folders with meaningless names, and a stray text file."""
    path = tmp_path_factory.mktemp("upload") / "my scan.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("export/README.txt", "exported by a viewer")
        for k, f in enumerate(sorted((mini_dir / "stage_2_test").iterdir())):
            if _in_study(f):
                z.write(f, f"export/DICOM/S{k % 3}/IM{k:04d}")
    return path


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def upload(page, files) -> None:
    page.set_input_files("#files", files)
    page.click("#send")


def test_a_study_zip_gives_the_subtype_table(page, server, study_zip, tmp_path):
    url, root, run = server
    assert "Not a diagnosis" in page.inner_text("#disclaimer")
    before = set(leftovers(root))
    upload(page, str(study_zip))
    page.wait_for_selector("table.subtypes", timeout=120_000)
    rows = page.eval_on_selector_all(
        "table.subtypes tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    assert page.inner_text("#studies h3") == f"Study {STUDY}"
    (job,) = set(leftovers(root)) - before
    truth = pd.read_csv(root / job / "out" / "studies.csv").iloc[0]
    assert [r[0] for r in rows] == list(LABELS)
    for subtype, probability, positive, _ in rows:
        assert float(probability) == pytest.approx(truth[subtype], abs=5e-4)
        assert (positive == "yes") == bool(truth[f"{subtype}_positive"])
    assert len(pd.read_csv(root / job / "out" / "slices.csv")) == 32
    assert set(run.bundle.kept_models) == {"tiny"}  # the fold models stay loaded for the next upload
    assert "README.txt: not a DICOM file" in page.inner_text("#notes")
    links = page.eval_on_selector_all("#downloads a", "as => as.map(a => a.href)")
    assert {u.rsplit("/", 1)[1] for u in links} >= {"slices.csv", "series.csv", "studies.csv", "report.html"}
    csv = page.request.get(next(u for u in links if u.endswith("/studies.csv")))
    assert csv.ok and csv.text().startswith("study_id")
    page.wait_for_function("document.getElementById('report').contentDocument?.readyState === 'complete'")
    images = page.frame_locator("#report").locator("img")
    assert images.count() >= 2 and images.evaluate_all("im => im.every(i => i.complete && i.naturalWidth > 0)")
    shot = ROOT / "docs" / "images" / "serve.png" if os.environ.get("UPDATE_SCREENSHOT") else tmp_path / "serve.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def zip_of(tmp_path: Path, name: str, members: dict[str, bytes]) -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for member, data in members.items():
            z.writestr(member, data)
    return path


def test_bad_uploads_show_their_message_and_leave_nothing(page, server, mini_dir, tmp_path):
    _, root, _ = server
    dicom = next((mini_dir / "stage_2_test").iterdir()).read_bytes()
    cases = [
        (
            zip_of(tmp_path, "evil.zip", {"ok/a.dcm": dicom, "../../escaped.dcm": dicom}),
            "unsafe name '../../escaped.dcm'",
        ),
        (tmp_path / "notes.txt", "nothing in the upload is a DICOM file: notes.txt"),
        (zip_of(tmp_path, "bomb.zip", {"a.dcm": b"\0" * (64 << 20)}), "refused as a zip bomb"),
    ]
    (tmp_path / "notes.txt").write_text("not an image")
    before = leftovers(root)
    for path, says in cases:
        page.goto(server[0])
        upload(page, str(path))
        page.wait_for_selector("#message:not(.hidden)", timeout=30_000)
        assert says in page.inner_text("#message"), path.name
        assert page.is_hidden("#result")
    assert leftovers(root) == before  # refused uploads keep no folder
    assert not list(root.parent.rglob("escaped.dcm"))


def test_dicom_files_without_a_series_say_why_in_the_page(page, mini_dir):
    """DICOM files sent as files (no zip) that hold no series to score: the mini set's 11 single slices of 11
    studies. The upload is accepted, the job fails, and the page shows the reason."""
    singles = [str(f) for f in sorted((mini_dir / "stage_2_test").iterdir()) if not _in_study(f)]
    assert len(singles) == 11
    upload(page, singles)
    page.wait_for_selector("#message:not(.hidden)", timeout=60_000)
    text = page.inner_text("#message")
    assert "no axial CT series in the upload" in text and "series of one slice" in text, text


def _in_study(path: Path) -> bool:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (
            pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID == STUDY
        )


def test_no_ct_series_fails_the_job_with_its_reason(server, tmp_path):
    """A DICOM upload that is no head CT (an MR image) is accepted, then the job says why nothing was scored."""
    import httpx
    from pydicom.data import get_testdata_file

    url, _, _ = server
    mr = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    r = httpx.post(url + "jobs", files=[("files", ("mr.dcm", mr, "application/dicom"))], timeout=30)
    assert r.status_code == 200, r.text
    for _ in range(300):
        job = httpx.get(url + "jobs/" + r.json()["id"]).json()
        if job["state"] in ("done", "failed"):
            break
        time.sleep(0.1)
    assert job["state"] == "failed" and "Modality MR" in job["message"], job
    assert str(tmp_path.parent) not in job["message"] and "the upload" in job["message"]  # no server path shown


def test_limits_and_forms(tiny_bundle, tmp_path):
    """What a browser never sends but a script may: a body over the size limit, a body that is not a form, ids and
    file names that try to leave the job's folder, a foreign Host header."""
    from starlette.testclient import TestClient

    from ich_kaggle.serve import app, jobs, uploads

    root = tmp_path / "jobs"
    queue = jobs.Jobs(root, app.runner(tiny_bundle))
    client = TestClient(app.create_app(queue, uploads.Limits(max_upload_bytes=1 << 20)))
    big = client.post("/jobs", files=[("files", ("a.dcm", b"\0" * (2 << 20), "application/dicom"))])
    assert big.status_code == 413 and "larger than 1 MiB" in big.json()["error"]
    plain = client.post("/jobs", content=b"abc", headers={"content-type": "text/plain"})
    assert plain.status_code == 400 and "multipart/form-data" in plain.json()["error"]
    assert client.get("/jobs/..%2F..%2Fetc").status_code == 404
    assert client.get("/jobs/" + "0" * 32 + "/files/../../status.json").status_code == 404
    assert leftovers(root) == []
    on_loopback = TestClient(app.create_app(queue, hosts=list(app.LOOPBACK)))  # as `serve` on 127.0.0.1 makes it
    assert on_loopback.get("/", headers={"host": "evil.example:8000"}).status_code == 400  # DNS rebinding
    assert on_loopback.get("/", headers={"host": "localhost:8000"}).status_code == 200
    queue.close(timeout=5)
