"""`make kaggle-plan`: what a config or ensemble costs on Kaggle's T4 x2 before any GPU second is spent.

Per member and fold: epochs, training images per epoch, hours and sessions (a fold longer than one 12-hour session
trains over resuming versions, `sessions.plan`); the inference kernel on the training kernels' outputs (test
slices x members x folds x TTA views at the inference rate), split into kernels that each end within a session;
the total in GPU-hours and, with credentials, in weeks of the remaining weekly quota (`kaggle quota`).
The rates are those of `rates.py`: ESTIMATES until `make kernel-gpu-check` measured them into kaggle_rates.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import Config, selected_folds
from ..core.errors import UserError
from . import rates, sessions
from .sessions import TEST_SLICES, InferKernel, split_inference  # noqa: F401

WEEKLY_GPU_HOURS = 30.0  # Kaggle's free weekly GPU quota (it varies a little week to week: `kaggle quota` says)
TRAINING_GPUS = 2  # a T4 x2 session bills its wall time (one quota hour per session hour, whatever the GPU count)


@dataclass(frozen=True)
class FoldLine:
    member: str
    fold: int
    estimate: sessions.Estimate
    sessions: int
    hours: float  # every session of the fold, with its own setup

    def describe(self) -> str:
        e = self.estimate
        return (
            f"train {self.member} fold {self.fold}: {e.epochs} epoch(s) x {e.train_images:,} images, "
            f"{self.hours:.1f} h in {self.sessions} session(s) at {e.train_images_per_s:.0f} img/s on T4 x2"
            + ("" if e.measured else " (estimate)")
        )


@dataclass
class KagglePlan:
    config: str
    folds: list[FoldLine] = field(default_factory=list)
    inference: list[InferKernel] = field(default_factory=list)
    measured: bool = False
    rate_lines: list[str] = field(default_factory=list)

    @property
    def training_hours(self) -> float:
        return sum(f.hours for f in self.folds)

    @property
    def inference_hours(self) -> float:
        return sum(k.hours for k in self.inference)

    @property
    def total_hours(self) -> float:
        return self.training_hours + self.inference_hours

    def lines(self, quota_left_h: float | None = None, quota_note: str = "") -> list[str]:
        out = [
            f"plan for {self.config} on Kaggle T4 x2 (a session ends at {sessions.SESSION_LIMIT_H:.0f} h, "
            f"{sessions.SESSION_LIMIT_H - sessions.SESSION_MARGIN_H:.1f} h usable):"
        ]
        out += [f"  rates: {r}" for r in self.rate_lines]
        out += [f"  {f.describe()}" for f in self.folds]
        split = (
            "" if len(self.inference) == 1 else f" (split into {len(self.inference)} kernels, each within a session)"
        )
        out += [f"  inference{split}:"] + [f"    {k.describe()}" for k in self.inference]
        out.append(
            f"  total: {self.training_hours:.1f} h training + {self.inference_hours:.1f} h inference = "
            f"{self.total_hours:.1f} GPU-hours = {self.total_hours / WEEKLY_GPU_HOURS:.1f} week(s) of "
            f"{WEEKLY_GPU_HOURS:.0f} h free quota"
            + ("" if self.measured else " [ESTIMATES: make kernel-gpu-check measures the rates]")
        )
        if quota_left_h is not None:
            weeks = self.total_hours / WEEKLY_GPU_HOURS
            now = "fits" if self.total_hours <= quota_left_h else "does not fit"
            out.append(
                f"  quota: {quota_left_h:.1f} h of GPU left this week: the plan {now} in it "
                f"({weeks:.1f} week(s) of quota in all)"
            )
        elif quota_note:
            out.append(f"  quota: {quota_note}")
        return out


def make_plan(cfg: Config, members: list[Config], folds_csv: Path | None = None) -> KagglePlan:
    """The plan of `cfg` (its `members`, [cfg] for a single config) over its selected folds."""
    out = KagglePlan(cfg.name)
    folds = selected_folds(cfg.cv)
    seen = set()
    for m in members:
        est = sessions.estimate(m, None, folds_csv)
        steps = sessions.plan(est, m)
        hours = est.hours + (steps.versions - 1) * est.setup_hours
        for k in selected_folds(m.cv):
            out.folds.append(FoldLine(m.name, k, est, steps.versions, hours))
        r = rates.rate(m.model.backbone, m.data.image_size)
        key = (m.model.backbone, m.data.image_size)
        if key not in seen:
            seen.add(key)
            out.rate_lines.append(f"{m.model.backbone} at {m.data.image_size} px: {r.describe()}")
    out.inference = split_inference(members, folds)
    out.measured = all(f.estimate.measured for f in out.folds) and all(
        rates.rate(m.model.backbone, m.data.image_size).measured for m in members
    )
    return out


def quota_left() -> tuple[float | None, str]:
    """(GPU hours left this week, '') from `kaggle quota` (kaggle >= 2.2.5), or (None, why not)."""
    from . import api

    try:
        client = api.client()
    except UserError as e:
        return None, f"unknown ({e})"
    if not hasattr(client, "quota_view"):
        return None, "unknown (this kaggle package has no `kaggle quota`; pip install kaggle==2.2.5)"
    try:
        response = api.call("kaggle quota", client.quota_view)
    except UserError as e:
        return None, f"unknown ({e})"
    gpu = getattr(response, "gpu_quota", None)
    if gpu is None:
        return None, "unknown (Kaggle answered no GPU quota)"
    used = gpu.time_used.total_seconds() / 3600
    total = gpu.total_time_allowed.total_seconds() / 3600
    return max(0.0, total - used), ""
