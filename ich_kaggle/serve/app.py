"""The web app: one page to upload a head CT, a job status to poll, the report and the CSVs of each job.

Starlette (an ASGI toolkit) served by uvicorn: both maintained, small, and enough for a page, four JSON/file
routes and a streamed upload. The model is loaded once, when the server starts; each upload is a job (see `jobs`)
whose files stay in its own folder. Routes take a job id only in the 32-hex form the server made, and a file name
only from the job's output folder, so no request can name a path of its own.
"""

from __future__ import annotations

import logging
import math
import tempfile
from importlib import resources
from pathlib import Path

import pandas as pd
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..core.labels import LABELS
from . import uploads
from .jobs import Job, Jobs, Runner

log = logging.getLogger(__name__)

DOWNLOADS = ("studies.csv", "series.csv", "slices.csv", "report.html")
HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
# a job's files are data: the report has no script, so none may run in it, whatever a DICOM header held
FILE_HEADERS = {
    **HEADERS,
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; "
    "style-src 'unsafe-inline'; frame-ancestors 'self'",
}


def page() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def table(out: Path) -> list[dict]:
    """studies.csv as the page shows it: per study, per subtype, the probability, whether it is above the bundle's
    threshold (fixed on the training OOF) and how many slices are above the slice threshold."""
    studies = pd.read_csv(out / "studies.csv", dtype={"study_id": str})
    rows = []
    for _, r in studies.iterrows():
        subtypes = []
        for label in LABELS:
            above = r.get(f"{label}_slices")
            subtypes.append(
                {
                    "subtype": label,
                    "probability": _plain(r[label]),
                    "positive": bool(r.get(f"{label}_positive", 0)),
                    "slices_above": 0 if pd.isna(above) or above == "" else len(str(above).split(";")),
                }
            )
        rows.append(
            {
                "study": r["study_id"],
                "series": _plain(r.get("n_series")),
                "slices": _plain(r.get("n_slices")),
                "subtypes": subtypes,
            }
        )
    return rows


def _plain(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def create_app(jobs: Jobs, limits: uploads.Limits = uploads.Limits(), hosts: list[str] | None = None) -> Starlette:
    """The app. `hosts`: the Host headers answered (others get 400): on loopback, only loopback names, so a web page
    elsewhere cannot reach the server through a DNS name that resolves to 127.0.0.1 (DNS rebinding)."""

    async def index(request: Request) -> Response:
        return HTMLResponse(page(), headers=HEADERS)

    async def upload(request: Request) -> Response:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limits.max_upload_bytes + (1 << 16):
            return _error(
                uploads.Rejected(
                    f"the upload is larger than {limits.max_upload_bytes // uploads.MiB} MiB: "
                    "send fewer studies at a time (or start the server with a larger "
                    "--max-upload-mb)",
                    status=413,
                )
            )
        job = jobs.new()
        try:
            receiver = uploads.MultipartReceiver(request.headers.get("content-type", ""), job.upload, limits)
            try:
                async for chunk in request.stream():
                    receiver.feed(chunk)
            finally:
                files = receiver.close()
            got = await run_in_threadpool(uploads.prepare, files, job.upload, limits)  # unzipping takes a while
        except uploads.Rejected as e:
            jobs.drop(job)
            return _error(e)
        except Exception:
            jobs.drop(job)
            raise
        job.notes = got.dropped
        jobs.submit(job)
        log.info("job %s: %d DICOM files received", job.id, len(got.files))
        return JSONResponse({"id": job.id, "files": len(got.files), "dropped": got.dropped}, headers=HEADERS)

    async def status(request: Request) -> Response:
        job = _job(request)
        if job is None:
            return _missing()
        body = job.public()
        body["ahead"] = jobs.ahead_of(job) if job.state == "queued" else 0
        if job.state == "done":
            body["studies"] = table(job.out)
            body["files"] = [f"jobs/{job.id}/files/{name}" for name in DOWNLOADS if (job.out / name).exists()]
        return JSONResponse(body, headers=HEADERS)

    async def file(request: Request) -> Response:
        job = _job(request)
        name = request.path_params["name"]
        if job is None or job.state != "done":
            return _missing()
        out = job.out.resolve()
        path = (out / name).resolve()
        if out not in path.parents or not path.is_file():  # report assets below out/ only, never a path above it
            return _missing()
        download = path.suffix == ".csv"
        return FileResponse(
            path,
            headers=FILE_HEADERS,
            filename=path.name if download else None,
            content_disposition_type="attachment" if download else "inline",
        )

    def _job(request: Request) -> Job | None:
        return jobs.get(request.path_params["job_id"])

    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=hosts)] if hosts else []
    return Starlette(
        routes=[
            Route("/", index),
            Route("/jobs", upload, methods=["POST"]),
            Route("/jobs/{job_id}", status),
            Route("/jobs/{job_id}/files/{name:path}", file),
        ],
        middleware=middleware,
    )


def _error(e: uploads.Rejected) -> Response:
    return JSONResponse({"error": str(e)}, status_code=e.status, headers=HEADERS)


def _missing() -> Response:
    return JSONResponse(
        {"error": "no such job or file (jobs last as long as the server runs)"}, status_code=404, headers=HEADERS
    )


def runner(model: str | Path) -> Runner:
    """Load the bundle once; every job runs `infer` with it, and its fold models, loaded by the first job, stay."""
    from ..apply.infer import infer
    from ..bundle import load

    bundle = load(model)
    bundle.kept_models = {}

    def run(paths: list[Path], out: Path, progress) -> Path:
        return infer(bundle, paths, out, progress=progress)

    run.bundle = bundle  # type: ignore[attr-defined]
    return run


def serve(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    jobs_dir: str | Path | None = None,
    limits: uploads.Limits = uploads.Limits(),
) -> None:
    """Load the model, then serve until interrupted. Jobs go to `jobs_dir`, kept; without it, to a temporary folder
    removed when the server stops (scans should not linger in /tmp)."""
    import shutil

    import uvicorn

    run = runner(model)  # a bad bundle stops here, before anything is created
    root = Path(jobs_dir) if jobs_dir else Path(tempfile.mkdtemp(prefix="ich_kaggle-serve-"))
    jobs = Jobs(root, run)
    log.info("jobs are kept in %s%s", root, "" if jobs_dir else " until the server stops (--jobs DIR keeps them)")
    if host not in LOOPBACK:
        log.warning("serving on %s: anyone who can reach this address can upload scans and read results", host)
    log.info("open http://%s:%d/ (Ctrl-C stops the server)", host if ":" not in host else f"[{host}]", port)
    try:
        hosts = [*LOOPBACK, "[::1]"] if host in LOOPBACK else None
        uvicorn.run(create_app(jobs, limits, hosts), host=host, port=port, log_level="warning")
    finally:
        jobs.close(timeout=5)
        if not jobs_dir:
            shutil.rmtree(root, ignore_errors=True)
