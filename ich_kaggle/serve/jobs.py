"""Uploads become jobs: one folder each, run one at a time by a single worker thread that holds the loaded model.

One at a time because one model on one device is the bottleneck anyway: two jobs side by side would only share the
same cores or GPU and double the memory. A job's folder holds everything of it (`upload/`, `out/`, `status.json`),
so deleting the folder deletes the job, and nothing of one job can be reached from another's id.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..core import io
from ..core.errors import UserError

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
# what a job runs: (input paths, output folder, progress) -> output folder; the loaded model is inside it
Runner = Callable[[list[Path], Path, Progress], Path]

ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Job:
    id: str
    folder: Path
    state: str = "receiving"  # receiving -> queued -> running -> done | failed
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    notes: list[str] = field(default_factory=list)  # files left out of the upload, and why
    created: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def upload(self) -> Path:
        return self.folder / "upload"

    @property
    def out(self) -> Path:
        return self.folder / "out"

    def public(self) -> dict:
        d = asdict(self)
        d.pop("folder")
        return d


class Jobs:
    """The jobs of one server: created per upload, queued, run in order by one background thread."""

    def __init__(self, root: Path, run: Runner):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._run = run
        self._jobs: dict[str, Job] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._loop, name="ich_kaggle-jobs", daemon=True)
        self._worker.start()

    def new(self) -> Job:
        job_id = uuid.uuid4().hex
        job = Job(job_id, self.root / job_id)
        job.upload.mkdir(parents=True)
        with self._lock:
            self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        if not ID.match(job_id):
            return None
        with self._lock:
            return self._jobs.get(job_id)

    def ahead_of(self, job: Job) -> int:
        """How many jobs run before this one (shown while it waits)."""
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.state in ("queued", "running") and j.created < job.created)

    def submit(self, job: Job) -> None:
        self._set(job, state="queued", stage="waiting for the model")
        self._queue.put(job)

    def drop(self, job: Job) -> None:
        """A refused upload leaves nothing behind: its folder and its id go."""
        with self._lock:
            self._jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)

    def close(self, timeout: float | None = None) -> None:
        self._queue.put(None)
        self._worker.join(timeout)

    def _set(self, job: Job, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(job, k, v)
            state = job.public()
        try:
            with io.atomic_open(job.folder / "status.json") as f:
                json.dump(state, f, indent=1)
        except OSError as e:  # the status in memory is what the page reads; the file is a record
            log.warning("cannot write %s: %s", job.folder / "status.json", e)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            self._set(job, state="running", stage="starting", fraction=0.0)

            def progress(stage: str, fraction: float, job: Job = job) -> None:
                self._set(job, stage=stage, fraction=max(0.0, min(1.0, float(fraction))))

            try:
                self._run([job.upload], job.out, progress)
                empty = no_study(job.out)
                if empty:
                    self._set(job, state="failed", message=empty, finished=time.time())
                else:
                    self._set(job, state="done", stage="done", fraction=1.0, finished=time.time())
            except UserError as e:  # said with the user's words, not the server's folders
                message = str(e).replace(str(job.upload), "the upload").replace(str(job.folder), "the job")
                self._set(job, state="failed", message=message, finished=time.time())
            except Exception as e:  # one bad upload never stops the server; the log keeps the traceback
                log.exception("job %s failed", job.id)
                self._set(
                    job, state="failed", message=f"internal error ({type(e).__name__}: {e})", finished=time.time()
                )


def no_study(out: Path) -> str | None:
    """The message for a job whose upload held no CT series the model can read, else None."""
    import pandas as pd

    studies = out / "studies.csv"
    if studies.exists() and len(pd.read_csv(studies)):
        return None
    return (
        "no axial CT series was found in the upload (other modalities, localizers, single slices and unreadable "
        "files are skipped): send a head CT study"
    )
