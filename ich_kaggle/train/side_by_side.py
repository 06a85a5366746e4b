"""Folds side by side: one training process per GPU, each seeing only its own device (CUDA_VISIBLE_DEVICES).

Used by `make recipe` on a machine with several GPUs: every fold of every member is an independent job, so folds on
separate GPUs need no communication and scale with the number of devices (torchrun splits one fold's batches over
GPUs instead, for a fold too big for one). Each job is the ordinary `python -m ich_kaggle train` command: it resumes
from last.pt, skips a finished fold and holds the fold's lock, so a rerun after a crash continues where it stopped.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..core.errors import UserError

log = logging.getLogger(__name__)
POLL_S = 2.0


@dataclass(frozen=True)
class Job:
    """One fold of one config, as the train command takes it."""

    config: str  # a shipped config name or a YAML path
    fold: int
    overrides: list[str] = field(default_factory=list)
    name: str = ""  # the run folder's name (passed as --run: a RUN-named ensemble's member trains where it is read)

    def command(self, data: str | Path, work: str | Path, runs: str | Path) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "ich_kaggle",
            "train",
            "--config",
            self.config,
            "--fold",
            str(self.fold),
            "--data",
            str(data),
            "--work",
            str(work),
            "--runs",
            str(runs),
        ]
        cmd += ["--run", self.name] if self.name else []
        return cmd + (["--set", *self.overrides] if self.overrides else [])


def visible_gpus() -> list[str]:
    """The CUDA device ids this process may use (CUDA_VISIBLE_DEVICES when set, else every device)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in listed.split(",") if d.strip()] if listed else []
    return ids[: torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def run_jobs(
    jobs: list[Job], devices: list[str], data: str | Path, work: str | Path, runs: str | Path, log_dir: Path
) -> None:
    """Run `jobs` with at most one per device at a time; each job's output goes to `log_dir/<name>_fold<k>.log`.
    A failed job does not stop the others; at the end one line names every failure and its log."""
    if not devices:
        raise ValueError("run_jobs needs at least one device")
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, failed = deque(jobs), {}, []
    log.info(
        f"training {len(jobs)} fold(s) side by side on {len(devices)} device(s) ({', '.join(devices)}); "
        f"logs in {log_dir}"
    )
    bar = tqdm(total=len(jobs), desc="folds side by side", unit="fold")
    try:
        while pending or running:
            for device in devices:
                if device not in running and pending:
                    job = pending.popleft()
                    path = log_dir / f"{job.name or Path(job.config).stem}_fold{job.fold}.log"
                    out = open(path, "w")
                    env = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
                    proc = subprocess.Popen(
                        job.command(data, work, runs), stdout=out, stderr=subprocess.STDOUT, env=env
                    )
                    running[device] = (proc, job, out, path)
                    log.info(f"{job.name} fold {job.fold} started on device {device} (pid {proc.pid})")
            time.sleep(POLL_S if running else 0)
            for device, (proc, job, out, path) in list(running.items()):
                if proc.poll() is None:
                    continue
                out.close()
                del running[device]
                bar.update()
                if proc.returncode != 0:
                    failed.append((job, path))
                    log.warning(f"{job.name} fold {job.fold} failed (exit {proc.returncode}); see {path}")
                else:
                    log.info(f"{job.name} fold {job.fold} done on device {device}")
    finally:
        for proc, _, out, _ in running.values():  # interrupted: stop the children (they resume from last.pt)
            proc.terminate()
            out.close()
        bar.close()
    if failed:
        what = ", ".join(f"{job.name} fold {job.fold} ({path})" for job, path in failed)
        raise UserError(
            f"{len(failed)} of {len(jobs)} fold(s) failed: {what}; read the log, fix, and rerun the same "
            f"command (finished folds are kept)"
        )
