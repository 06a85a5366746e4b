"""Time on Kaggle: how long a fold trains on T4 x2 (`estimate`), how it fits 12-hour sessions (`plan`: one version or
several that resume), and how the inference kernel is split so each part ends within a session.

Rates are those of rates.py: ESTIMATES until `make kernel-gpu-check` measured them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.config import Config
from ..core.errors import UserError, fix
from . import rates
from .rates import INFERENCE_SPEEDUP, TWO_GPU_SCALING
from .train_run import CACHE_BYTES_PER_IMAGE, SCRATCH_KEEP

TEST_SLICES = 121_232  # stage_2_test
SESSION_LIMIT_H = 12.0  # Kaggle's limit on one GPU session (a run past it is killed)
SESSION_MARGIN_H = 0.5  # install, header checks, OOF and output saving

# Images per second of one T4 per backbone and size: measured (kaggle_rates.yaml) or estimated, see rates.py.
# A measured figure can also be given by hand: make kernel-train T4_IMAGES_PER_S=<train img/s of one T4>.
CACHE_IMAGES_PER_S = 250.0  # DICOM -> cache on Kaggle's 4 CPUs: an estimate from `make bench`'s per-core rate
# Disk a Kaggle session has outside /kaggle/working (~73 GB in all, ~20 GB of it the working folder): Kaggle's
# stated figures, not measured here. The training kernel caches the train images only where they fit (see
# train_run.choose_source, which judges the real free space); else it reads the DICOMs and caches nothing.
KAGGLE_SCRATCH_BYTES = 53e9
# stage_2_train.csv's images (752,803 slices); the labelled, readable ones make up folds.csv
COMPETITION_TRAIN_IMAGES = 752_803


def expected_source(cfg: Config, images: int) -> str:
    """Where the training kernel will read the images from, as `train_run.choose_source` decides on Kaggle."""
    if cfg.data.source == "dicom":
        return "dicom"
    fits = images * CACHE_BYTES_PER_IMAGE <= KAGGLE_SCRATCH_BYTES * (1 - SCRATCH_KEEP)
    return "cache" if fits else "dicom"


@dataclass(frozen=True)
class Estimate:
    train_images: int  # per epoch
    val_images: int
    epochs: int
    train_images_per_s: float  # on T4 x2
    hours: float  # setup + epochs x epoch_hours + final_hours
    source: str  # where the rate comes from
    infer_images_per_s: float = 0.0  # on T4 x2 (validation, OOF)
    measured: bool = False  # the rates come from kaggle_rates.yaml (or were given), not the estimates
    epoch_hours: float = 0.0  # one epoch: training and validation
    setup_hours: float = 0.0  # per session: caching the train images (none when read from the DICOMs)
    final_hours: float = 0.0  # the OOF predictions of best.pt, once at the end
    images: str = "cache"  # "cache" | "dicom": where the kernel reads the train images from

    def session_hours(self, epochs: int) -> float:
        """One kernel version that trains `epochs` epochs (and, to be safe, ends the fold)."""
        return self.setup_hours + epochs * self.epoch_hours + self.final_hours

    def describe(self) -> str:
        setup = (
            f"{self.setup_hours:.1f} h caching the train images per session"
            if self.images == "cache"
            else "no caching (images read from their DICOMs)"
        )
        return (
            f"estimated wall time on T4 x2: {self.hours:.1f} h for {self.epochs} epoch(s) x {self.train_images:,} "
            f"training images at {self.train_images_per_s:.0f} img/s, {self.epoch_hours:.1f} h per epoch with "
            f"{self.val_images:,} validation images at {self.infer_images_per_s:.0f} img/s, "
            f"{setup} [{self.source}]"
            + ("" if self.measured else "; rates are ESTIMATES until measured (make kernel-gpu-check)")
        )


def estimate(
    cfg: Config, epochs: int | None = None, folds_csv: Path | None = None, t4_images_per_s: float | None = None
) -> Estimate:
    """Wall time of one fold (or of `epochs` of it) on T4 x2 from the config's images per epoch and images/s."""
    if folds_csv is not None and folds_csv.is_file():
        with open(folds_csv) as f:
            n = sum(1 for _ in f) - 1
        where = f"{n:,} images in {folds_csv}"
    else:
        n = COMPETITION_TRAIN_IMAGES
        where = f"{n:,} competition train images"
    val = n // cfg.cv.k
    train = n - val
    if cfg.train.max_images_per_epoch:
        train = min(train, int(cfg.train.max_images_per_epoch))
    r = rates.rate(cfg.model.backbone, cfg.data.image_size)
    if t4_images_per_s:
        per_t4, source, measured = (
            float(t4_images_per_s),
            f"T4_IMAGES_PER_S={t4_images_per_s:g} as given; {where}",
            True,
        )
        per_t4_infer = per_t4 * INFERENCE_SPEEDUP
    else:
        per_t4, per_t4_infer, measured = r.train, r.infer, r.measured
        source = f"{r.describe()}; {where}"
    ips, infer_ips = per_t4 * TWO_GPU_SCALING, per_t4_infer * TWO_GPU_SCALING
    epochs = cfg.train.epochs if epochs is None else min(epochs, cfg.train.epochs)
    images = expected_source(cfg, n)
    epoch_s = train / ips + val / infer_ips
    final_s = val / infer_ips
    setup_s = n / CACHE_IMAGES_PER_S if images == "cache" else 0.0
    hours = (setup_s + epochs * epoch_s + final_s) / 3600
    return Estimate(
        train,
        val,
        epochs,
        ips,
        hours,
        source,
        infer_ips,
        measured,
        epoch_s / 3600,
        setup_s / 3600,
        final_s / 3600,
        images,
    )


@dataclass(frozen=True)
class Plan:
    """How a fold trains on Kaggle: in one version, or in `versions` versions of `epochs_per_run` epochs each,
    every one resuming from the previous one's output (make kernel-train RESUME=1)."""

    estimate: Estimate
    epochs_per_run: int | None  # None: the whole fold in one version
    versions: int
    given: bool = False  # EPOCHS_PER_RUN was set by hand

    def describe(self, fold: int) -> str:
        limit = SESSION_LIMIT_H - SESSION_MARGIN_H
        if self.versions == 1:
            run = f"EPOCHS_PER_RUN={self.epochs_per_run}: " if self.epochs_per_run else ""
            return f"{run}fits one {SESSION_LIMIT_H:.0f}-hour session ({limit:.1f} h usable)"
        k = self.epochs_per_run
        why = "as EPOCHS_PER_RUN asks" if self.given else f"more than one {SESSION_LIMIT_H:.0f}-hour session"
        return (
            f"{why}: {self.versions} kernel versions of up to {k} "
            f"epoch(s) each (EPOCHS_PER_RUN={k}, up to {self.estimate.session_hours(k):.1f} h of the "
            f"{limit:.1f} h usable); push this one, then once each version is complete (make kernel-status) "
            f"`make kernel-train fold={fold} RESUME=1` with the same settings, {self.versions - 1} more time(s)"
        )


def plan(est: Estimate, cfg: Config, epochs_per_run: int | None = None) -> Plan:
    """One version when the fold fits a session; else as many epochs per version as fit (each version resumes
    the previous one at an epoch boundary). Refuses a plan that cannot work: EPOCHS_PER_RUN too long for a session,
    or one epoch alone longer than a session."""
    limit = SESSION_LIMIT_H - SESSION_MARGIN_H
    epochs = est.epochs
    if epochs_per_run:
        k = min(int(epochs_per_run), epochs)
        if est.session_hours(k) > limit:
            raise UserError(
                f"fold of '{cfg.name}' cannot train EPOCHS_PER_RUN={epochs_per_run} epoch(s) within "
                f"Kaggle's {SESSION_LIMIT_H:.0f}-hour session ({est.session_hours(k):.1f} h; "
                f"{est.describe()}); leave {fix('--epochs-per-run', 'EPOCHS_PER_RUN')} unset to have the versions "
                f"planned, or lower it"
            )
        return Plan(est, k, -(-epochs // k), given=True)
    if est.session_hours(epochs) <= limit:
        return Plan(est, None, 1)
    k = int((limit - est.setup_hours - est.final_hours) // est.epoch_hours) if est.epoch_hours > 0 else epochs
    if k < 1:
        fit = int(est.train_images * (limit - est.setup_hours - est.final_hours) / max(est.epoch_hours, 1e-9))
        raise UserError(
            f"fold of '{cfg.name}' cannot end even one epoch within Kaggle's {SESSION_LIMIT_H:.0f}-hour "
            f"session: {est.describe()}; lower train.max_images_per_epoch (about {max(fit, 0):,} "
            f"training images per epoch fit) or pass a measured {fix('--t4-images-per-s', 'T4_IMAGES_PER_S=')}"
        )
    k = min(k, epochs)
    return Plan(est, k, -(-epochs // k))


@dataclass(frozen=True)
class InferKernel:
    members: list[str]
    folds: list[int]
    hours: float
    views: int

    def describe(self) -> str:
        return (
            f"infer {'+'.join(self.members)} folds {self.folds}: {TEST_SLICES:,} slices x {len(self.members)} "
            f"member(s) x {len(self.folds)} fold(s) x {self.views} view(s) = {self.hours:.1f} h"
        )


def inference_hours(member: Config, folds: int) -> float:
    """The inference kernel's time for one member's `folds` folds: every test slice through every TTA view."""
    r = rates.rate(member.model.backbone, member.data.image_size)
    views = len(member.tta.transforms)
    return TEST_SLICES * folds * views / (r.infer * TWO_GPU_SCALING) / 3600


def inference_setup_hours() -> float:
    """Caching the test slices once per inference kernel."""
    return TEST_SLICES / CACHE_IMAGES_PER_S / 3600


def split_inference(members: list[Config], folds: list[int]) -> list[InferKernel]:
    """One kernel when everything fits a session; else one per member; else a member's folds across kernels."""
    limit = SESSION_LIMIT_H - SESSION_MARGIN_H
    setup = inference_setup_hours()
    views = max(len(m.tta.transforms) for m in members)
    whole = setup + sum(inference_hours(m, len(folds)) for m in members)
    if whole <= limit:
        return [InferKernel([m.name for m in members], list(folds), whole, views)]
    kernels = []
    for m in members:
        per_fold = inference_hours(m, 1)
        if per_fold + setup > limit:
            raise UserError(
                f"one fold of '{m.name}' alone needs {per_fold + setup:.1f} h of inference, more than a "
                f"{SESSION_LIMIT_H:.0f}-hour session; use fewer tta.transforms or a smaller "
                f"data.image_size"
            )
        chunk = max(1, int((limit - setup) // per_fold))
        for i in range(0, len(folds), chunk):
            part = list(folds[i : i + chunk])
            kernels.append(InferKernel([m.name], part, setup + inference_hours(m, len(part)), len(m.tta.transforms)))
    return kernels
