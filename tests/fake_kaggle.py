"""A fake Kaggle API server for tests: the real `kaggle` CLI talks to it instead of kaggle.com.

How the CLI is pointed here: `KAGGLE_API_ENVIRONMENT=LOCALHOST` makes kaggle 2.x call `http://localhost/api/v1/...`
(plain http), and `HTTP_PROXY` sends those requests to this server, which sees absolute URLs in the request line.
It answers the few endpoints that `kernels push/status/output`, `datasets create/version/status` and
`competitions submit` use (each can be told to refuse, as Kaggle does, with an error field or an HTTP error), records
every request, and shuts itself down after `max_seconds` so a hung client can never keep a test alive.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

API = "/api/v1/"


@dataclass
class Recorded:
    method: str
    path: str  # path part of the URL, e.g. /api/v1/kernels.KernelsApiService/SaveKernel
    headers: dict[str, str]
    body: bytes

    @property
    def endpoint(self) -> str:
        """`service/Method` for API calls, e.g. `kernels.KernelsApiService/SaveKernel`."""
        return self.path[len(API) :] if self.path.startswith(API) else self.path

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class FakeKaggle:
    """Context manager: `with FakeKaggle() as fk: subprocess.run([...], env=fk.env(base_env))`."""

    existing_datasets: set[str] = field(default_factory=set)  # "owner/slug" that GetDatasetStatus reports as ready
    kernel_error: str | None = None  # answer SaveKernel with this error field (the CLI still exits 0)
    dataset_error: str | None = None  # answer CreateDataset / CreateDatasetVersion with this error field
    dataset_polls: dict[str, list[str]] = field(default_factory=dict)  # ref -> statuses answered before READY
    kernel_statuses: list[str] = field(default_factory=lambda: ["COMPLETE"])  # GetKernelSessionStatus, in turn
    kernel_failure: str = ""  # failureMessage of that answer
    kernel_output: dict[str, bytes] = field(default_factory=dict)  # output files of the kernel's last run
    kernel_log: str = ""
    submit_error: str | None = None  # answer CreateSubmission with HTTP 403 and this message
    submissions: list[dict[str, Any]] = field(default_factory=list)  # CreateSubmission bodies
    tokens: dict[str, str] = field(default_factory=dict)  # access token -> user name (IntrospectToken)
    gpu_quota: tuple[float, float] | None = None  # (hours used, allowed) this week: GetAcceleratorQuotaStatistics
    max_seconds: float = 60.0
    requests: list[Recorded] = field(default_factory=list)
    uploads: dict[str, bytes] = field(default_factory=dict)  # blob token -> uploaded bytes
    blob_names: dict[str, str] = field(default_factory=dict)  # blob token -> file name announced by the client

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._deadline = 0.0

    # --- lifecycle ---
    def __enter__(self) -> "FakeKaggle":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._server.timeout = 0.2  # handle_request() returns when idle so the deadline is checked
        self._deadline = time.monotonic() + self.max_seconds
        self._thread = threading.Thread(target=self._serve, name="fake-kaggle", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._server is not None
        while time.monotonic() < self._deadline:
            self._server.handle_request()
        self._server.server_close()

    def __exit__(self, *exc: object) -> None:
        self._deadline = 0.0
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a `kaggle` subprocess: local API, proxied here, no bypass for localhost."""
        env = dict(os.environ if base is None else base)
        for key in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "KAGGLE_API_TOKEN"):
            env.pop(key, None)
        env.update({"KAGGLE_API_ENVIRONMENT": "LOCALHOST", "HTTP_PROXY": self.url, "http_proxy": self.url})
        return env

    # --- what the client sent ---
    def calls(self, endpoint: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    def dataset_files(self, ref: str, dest: Path) -> Path:
        """The last uploaded version of dataset `ref` as a kernel mounts it, in `dest`: each file as uploaded, each
        sub-folder's archive (`--dir-mode zip` sends `<folder>.zip`, its entries relative to the folder) unpacked
        into a folder of that name, as Kaggle's backend does (kaggle-cli pull request #111)."""
        owner, slug = ref.split("/")
        bodies = [
            c.json()
            for c in self.calls("datasets.DatasetApiService/CreateDataset")
            + self.calls("datasets.DatasetApiService/CreateDatasetVersion")
        ]
        matching = [b for b in bodies if b.get("ownerSlug") == owner and slug in (b.get("slug"), b.get("datasetSlug"))]
        assert matching, f"dataset {ref} was never uploaded"
        files = matching[-1].get("files") or matching[-1].get("body", {}).get("files") or []
        dest.mkdir(parents=True)
        for entry in files:
            name, data = self.blob_names[entry["token"]], self.uploads[entry["token"]]
            if name.endswith(".zip"):
                zipfile.ZipFile(io.BytesIO(data)).extractall(dest / name[: -len(".zip")])
            else:
                (dest / name).write_bytes(data)
        return dest

    # --- answers ---
    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any] | bytes]:
        if method == "PUT" and path.startswith("/upload/"):
            token = path.rsplit("/", 1)[-1]
            with self._lock:
                self.uploads[token] = body
            return 200, {}
        if method == "GET" and path.startswith("/files/"):
            name = path[len("/files/") :]
            if name in self.kernel_output:
                return 200, self.kernel_output[name]
        if method != "POST" or not path.startswith(API):
            return 404, {"code": 404, "message": f"fake kaggle: no route for {method} {path}"}
        endpoint = path[len(API) :]
        data = json.loads(body or b"{}")
        if endpoint == "kernels.KernelsApiService/SaveKernel":
            slug = data.get("slug") or ""
            if self.kernel_error:
                return 200, {"error": self.kernel_error}
            return 200, {
                "ref": f"/code/{slug}",
                "url": f"http://localhost/code/{slug}",
                "versionNumber": 1,
                "kernelId": 7,
            }
        if endpoint == "security.OAuthService/IntrospectToken":
            user = self.tokens.get(str(data.get("token")))
            return 200, {"active": True, "username": user} if user else {"active": False}
        if endpoint == "kernels.KernelsApiService/GetAcceleratorQuotaStatistics":
            if self.gpu_quota is None:
                return 200, {}
            used, allowed = self.gpu_quota
            return 200, {"gpuQuota": {"timeUsed": f"{used * 3600:.0f}s", "totalTimeAllowed": f"{allowed * 3600:.0f}s"}}
        if endpoint == "datasets.DatasetApiService/GetDatasetStatus":
            ref = f"{data.get('ownerSlug')}/{data.get('datasetSlug')}"
            if ref in self.existing_datasets:
                with self._lock:
                    polls = self.dataset_polls.get(ref) or []
                    status = polls.pop(0) if polls else "READY"
                return 200, {"status": status}
            return 404, {"code": 404, "message": f"dataset {ref} not found"}
        if endpoint == "blobs.BlobApiService/StartBlobUpload":
            with self._lock:
                token = f"blob{len(self.blob_names) + 1}"
                self.blob_names[token] = str(data.get("name"))
            return 200, {"token": token, "createUrl": f"http://localhost/upload/{token}"}
        if endpoint == "datasets.DatasetApiService/CreateDataset":
            ref = f"{data.get('ownerSlug')}/{data.get('slug')}"
            if self.dataset_error:
                return 200, {"status": "error", "error": self.dataset_error}
            if ref in self.existing_datasets:
                return 200, {"status": "error", "error": "The requested slug is already in use"}
            with self._lock:
                self.existing_datasets.add(ref)
            return 200, {"ref": ref, "url": f"http://localhost/datasets/{ref}", "status": "ok"}
        if endpoint == "datasets.DatasetApiService/CreateDatasetVersion":
            ref = f"{data.get('ownerSlug')}/{data.get('datasetSlug')}"
            if self.dataset_error:
                return 200, {"status": "error", "error": self.dataset_error}
            if ref not in self.existing_datasets:
                return 200, {"status": "error", "error": f"dataset {ref} does not exist"}
            return 200, {"ref": ref, "url": f"http://localhost/datasets/{ref}", "status": "ok"}
        if endpoint == "kernels.KernelsApiService/GetKernelSessionStatus":
            with self._lock:
                status = self.kernel_statuses.pop(0) if len(self.kernel_statuses) > 1 else self.kernel_statuses[0]
            return 200, {"status": status, "failureMessage": self.kernel_failure if status == "ERROR" else ""}
        if endpoint == "kernels.KernelsApiService/ListKernelSessionOutput":
            files = [{"fileName": n, "url": f"http://localhost/files/{n}"} for n in self.kernel_output]
            return 200, {"files": files, "log": self.kernel_log}
        if endpoint == "competitions.CompetitionApiService/StartSubmissionUpload":
            with self._lock:
                token = f"blob{len(self.blob_names) + 1}"
                self.blob_names[token] = str(data.get("fileName"))
            return 200, {"token": token, "createUrl": f"http://localhost/upload/{token}"}
        if endpoint == "competitions.CompetitionApiService/CreateSubmission":
            if self.submit_error:
                return 403, {"code": 403, "message": self.submit_error}
            with self._lock:
                self.submissions.append(data)
            return 200, {"message": "Successfully submitted to RSNA Intracranial Hemorrhage Detection", "ref": 1}
        return 404, {"code": 404, "message": f"fake kaggle: unknown endpoint {endpoint}"}


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                handler.rfile.readline()
                break
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        return b"".join(chunks)
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _handler_for(fake: FakeKaggle) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _handle(self) -> None:
            path = urlsplit(self.path).path  # proxied requests carry the absolute URL
            body = _read_body(self)
            with fake._lock:
                fake.requests.append(Recorded(self.command, path, dict(self.headers.items()), body))
            status, payload = fake.answer(self.command, path, body)
            raw = isinstance(payload, bytes)  # a file download
            out = payload if raw else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_POST = do_PUT = do_GET = _handle

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

    return Handler
