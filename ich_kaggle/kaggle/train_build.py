"""Training on Kaggle, on this side: the prepare and training kernel folders, the wall-time estimate and the plan
that splits a fold too long for one session into resuming versions, fetching a trained fold into runs/, and the state of every pushed kernel.

The GPU-less path: `make kernel-code` (upload the code dataset) -> `make kernel-prepare` (meta.csv + folds.csv on
Kaggle, once) -> `make kernel-train fold=N` per fold -> `make kernel-fetch fold=N` (local predict/stack/submit) or
`make kernel-from-folds` (the inference kernel on the training kernels' outputs). Kernel folders are written with
`build.py`'s helpers and pushed through `api.py`.
"""

from __future__ import annotations

import logging
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import __version__
from ..core.config import Config, CVConfig
from ..core.errors import UserError, fix
from ..core.io import atomic_open
from ..core.layout import COMPETITION, Layout, Run
from . import build
from .run import slugify
from .train_run import CACHE_BYTES_PER_IMAGE, FOLD_MANIFEST, PREPARE_MANIFEST, PREPARED_FILES, SCRATCH_KEEP

log = logging.getLogger(__name__)

TRAIN_TEMPLATE = Path(__file__).with_name("train_template.py")
PREPARE_SLUG = "ich-kaggle-prepare"
SESSION_LIMIT_H = 12.0  # Kaggle's limit on one GPU session (a run past it is killed)
SESSION_MARGIN_H = 0.5  # install, header checks, OOF and output saving

# Images per second on ONE T4 (fp16, channels_last) at 512 px, training / inference. ESTIMATES, not measurements
# (no T4 was available to this work): ResNet-50 mixed-precision training on one T4 is about 250 img/s at 224 px in
# NVIDIA's DeepLearningExamples (PyTorch ConvNets) tables; scaled by pixel count to 512 px (/5.2) that is ~48 img/s,
# and SE-ResNeXt-50's grouped convolutions and SE blocks run at about 0.6x ResNet-50's speed -> ~29 img/s. Inference
# runs about 3x the training rate. Two T4s under DDP are taken as 1.8x one. Other sizes scale by pixel count.
# Replace them with a measured figure: make kernel-train T4_IMAGES_PER_S=<train img/s of one T4 at the config's size>.
T4_TRAIN_IMAGES_PER_S_512 = {"se_resnext50_32x4d": 29.0, "se_resnext101_32x4d": 17.0, "resnet50": 48.0,
                             "resnet18": 140.0, "tu-tf_efficientnet_lite0": 110.0, "small_cnn": 2000.0}
DEFAULT_BACKBONE = "se_resnext50_32x4d"
INFERENCE_SPEEDUP = 3.0
TWO_GPU_SCALING = 1.8
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
    epoch_hours: float = 0.0  # one epoch: training and validation
    setup_hours: float = 0.0  # per session: caching the train images (none when read from the DICOMs)
    final_hours: float = 0.0  # the OOF predictions of best.pt, once at the end
    images: str = "cache"  # "cache" | "dicom": where the kernel reads the train images from

    def session_hours(self, epochs: int) -> float:
        """One kernel version that trains `epochs` epochs (and, to be safe, ends the fold)."""
        return self.setup_hours + epochs * self.epoch_hours + self.final_hours

    def describe(self) -> str:
        setup = (f"{self.setup_hours:.1f} h caching the train images per session" if self.images == "cache" else
                 "no caching (images read from their DICOMs)")
        return (f"estimated wall time on T4 x2: {self.hours:.1f} h for {self.epochs} epoch(s) x {self.train_images:,} "
                f"training images at {self.train_images_per_s:.0f} img/s, {self.epoch_hours:.1f} h per epoch with "
                f"{self.val_images:,} validation images at {self.train_images_per_s * INFERENCE_SPEEDUP:.0f} img/s, "
                f"{setup} [{self.source}]; an estimate, not a measurement")


def estimate(cfg: Config, epochs: int | None = None, folds_csv: Path | None = None,
             t4_images_per_s: float | None = None) -> Estimate:
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
    backbones = cfg.model.backbone.split("+")  # an ensemble of backbones runs each
    if t4_images_per_s:
        per_t4, source = float(t4_images_per_s), f"T4_IMAGES_PER_S={t4_images_per_s:g} as given"
    else:
        scale = (512 / cfg.data.image_size) ** 2
        rates = [T4_TRAIN_IMAGES_PER_S_512.get(b, T4_TRAIN_IMAGES_PER_S_512[DEFAULT_BACKBONE]) for b in backbones]
        per_t4 = scale / sum(1 / r for r in rates)
        source = (f"documented rate for {cfg.model.backbone} at {cfg.data.image_size} px, see "
                  f"ich_kaggle/kaggle/train_build.py; {where}")
    ips = per_t4 * TWO_GPU_SCALING
    epochs = cfg.train.epochs if epochs is None else min(epochs, cfg.train.epochs)
    images = expected_source(cfg, n)
    epoch_s = train / ips + val / (ips * INFERENCE_SPEEDUP)
    final_s = val / (ips * INFERENCE_SPEEDUP)
    setup_s = n / CACHE_IMAGES_PER_S if images == "cache" else 0.0
    hours = (setup_s + epochs * epoch_s + final_s) / 3600
    return Estimate(train, val, epochs, ips, hours, source, epoch_s / 3600, setup_s / 3600, final_s / 3600, images)


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
            run = (f"EPOCHS_PER_RUN={self.epochs_per_run}: " if self.epochs_per_run else "")
            return f"{run}fits one {SESSION_LIMIT_H:.0f}-hour session ({limit:.1f} h usable)"
        k = self.epochs_per_run
        why = "as EPOCHS_PER_RUN asks" if self.given else f"more than one {SESSION_LIMIT_H:.0f}-hour session"
        return (f"{why}: {self.versions} kernel versions of up to {k} "
                f"epoch(s) each (EPOCHS_PER_RUN={k}, up to {self.estimate.session_hours(k):.1f} h of the "
                f"{limit:.1f} h usable); push this one, then once each version is complete (make kernel-status) "
                f"`make kernel-train fold={fold} RESUME=1` with the same settings, {self.versions - 1} more time(s)")


def plan(est: Estimate, cfg: Config, epochs_per_run: int | None = None) -> Plan:
    """One version when the fold fits a session; else as many epochs per version as fit (each version resumes
    the previous one at an epoch boundary). Refuses a plan that cannot work: EPOCHS_PER_RUN too long for a session,
    or one epoch alone longer than a session."""
    limit = SESSION_LIMIT_H - SESSION_MARGIN_H
    epochs = est.epochs
    if epochs_per_run:
        k = min(int(epochs_per_run), epochs)
        if est.session_hours(k) > limit:
            raise UserError(f"fold of '{cfg.name}' cannot train EPOCHS_PER_RUN={epochs_per_run} epoch(s) within "
                            f"Kaggle's {SESSION_LIMIT_H:.0f}-hour session ({est.session_hours(k):.1f} h; "
                            f"{est.describe()}); leave {fix('--epochs-per-run', 'EPOCHS_PER_RUN')} unset to have the versions "
                            f"planned, or lower it")
        return Plan(est, k, -(-epochs // k), given=True)
    if est.session_hours(epochs) <= limit:
        return Plan(est, None, 1)
    k = int((limit - est.setup_hours - est.final_hours) // est.epoch_hours) if est.epoch_hours > 0 else epochs
    if k < 1:
        fit = int(est.train_images * (limit - est.setup_hours - est.final_hours) / max(est.epoch_hours, 1e-9))
        raise UserError(f"fold of '{cfg.name}' cannot end even one epoch within Kaggle's {SESSION_LIMIT_H:.0f}-hour "
                        f"session: {est.describe()}; lower train.max_images_per_epoch (about {max(fit, 0):,} "
                        f"training images per epoch fit) or pass a measured {fix('--t4-images-per-s', 'T4_IMAGES_PER_S=')}")
    k = min(k, epochs)
    return Plan(est, k, -(-epochs // k))


# --- kernel folders -----------------------------------------------------------------------------------------------
def prepare_id(username: str) -> str:
    return f"{username}/{PREPARE_SLUG}"


def train_slug(cfg_name: str, fold: int) -> str:
    return build.check_slug(f"ich-kaggle-{slugify(cfg_name)}-fold{int(fold)}", fix="use a config with a shorter name")


def _script(values: dict) -> str:
    script = build.embed_install(TRAIN_TEMPLATE.read_text(), {
        "CODE_DATASET": f"{values['username']}/{build.CODE_SLUG}", "MODEL_DATASET": "",
        "CONFIG_NAME": values["config_name"], "ICH_KAGGLE_VERSION": __version__})
    for key in ("MODE", "FOLD", "FOLDS", "K", "SEED", "CONFIG_YAML", "EPOCHS_PER_RUN"):
        script = script.replace(f'"__{key}__"', repr(values.get(key.lower())))
    compile(script, "kernel.py", "exec")
    return script


def _write_kernel(folder: Path, kernel_id: str, script: str, gpu: bool, kernel_sources: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_open(folder / build.KERNEL_FILE) as f:
        f.write(script)
    slug = kernel_id.split("/", 1)[1]
    meta = {"id": kernel_id, "title": build.title_for(slug), "code_file": build.KERNEL_FILE, "language": "python",
            "kernel_type": "script", "is_private": True, "enable_gpu": gpu, "enable_tpu": False,
            "enable_internet": False, "dataset_sources": [kernel_id.split("/")[0] + "/" + build.CODE_SLUG],
            "competition_sources": [COMPETITION], "kernel_sources": kernel_sources, "model_sources": []}
    if gpu:
        meta["machine_shape"] = build.MACHINE_SHAPE  # T4 x2; a CLI push without it lands on a P100
    build._write_json(folder / build.KERNEL_META, meta)
    return folder


def build_prepare_kernel(username: str | None, out: str | Path = "kernels", k: int = CVConfig.k,
                         seed: int = CVConfig.seed) -> Path:
    """kernels/ich-kaggle-prepare/: scans the competition's headers on Kaggle (CPU only), writes meta + folds."""
    user = build.check_username(username)
    script = _script({"username": user, "config_name": "", "mode": "prepare", "k": int(k), "seed": int(seed)})
    folder = _write_kernel(Path(out) / PREPARE_SLUG, prepare_id(user), script, gpu=False, kernel_sources=[])
    log.info(f"wrote {folder} ({prepare_id(user)}, k={k}, seed={seed})")
    return folder


def build_train_kernel(cfg: Config, fold: int, username: str | None, out: str | Path = "kernels",
                       resume: bool = False, epochs_per_run: int | None = None,
                       folds_csv: Path | None = None, t4_images_per_s: float | None = None) -> Path:
    """kernels/ich-kaggle-<config>-fold<N>/: trains one fold on T4 x2. Prints the wall-time estimate and the plan:
    one version, or several of EPOCHS_PER_RUN epochs each where the fold is longer than a session (refused only
    where one version cannot end an epoch). `resume` attaches this kernel's own output (its previous version)."""
    from ..core.config import selected_folds

    user = build.check_username(username)
    selected_folds(cfg.cv, fold)
    est = estimate(cfg, None, folds_csv, t4_images_per_s)
    steps = plan(est, cfg, epochs_per_run)
    log.info(f"{est.describe()}; {steps.describe(fold)}")
    epochs_per_run = steps.epochs_per_run
    slug = train_slug(cfg.name, fold)
    data = cfg.to_dict()
    data["augment"]["crop_scale"] = list(data["augment"]["crop_scale"])
    values = {"username": user, "config_name": cfg.name, "mode": "train", "fold": int(fold), "k": cfg.cv.k,
              "seed": cfg.cv.seed, "config_yaml": yaml.safe_dump(data, sort_keys=False),
              "epochs_per_run": epochs_per_run}
    kernel_id = f"{user}/{slug}"
    sources = [prepare_id(user)] + ([kernel_id] if resume else [])
    folder = _write_kernel(Path(out) / slug, kernel_id, _script(values), gpu=True, kernel_sources=sources)
    log.info(f"wrote {folder} ({kernel_id}{', resuming from its previous output' if resume else ''})")
    return folder


def infer_slug(cfg_name: str) -> str:
    return build.check_slug(f"ich-kaggle-{slugify(cfg_name)}-from-folds", fix="use a config with a shorter name")


def build_infer_kernel(cfg: Config, username: str | None, out: str | Path = "kernels",
                       folds: list[int] | None = None) -> Path:
    """kernels/ich-kaggle-<config>-from-folds/: the inference kernel on the training kernels' outputs (attached as
    kernel sources, no model dataset): TTA over their folds, first stage only, submission.csv."""
    from ..core.config import selected_folds

    user = build.check_username(username)
    folds = selected_folds(cfg.cv) if folds is None else [selected_folds(cfg.cv, k)[0] for k in folds]
    slug = infer_slug(cfg.name)
    sources = [prepare_id(user)] + [f"{user}/{train_slug(cfg.name, k)}" for k in folds]
    script = _script({"username": user, "config_name": cfg.name, "mode": "infer", "folds": folds})
    folder = _write_kernel(Path(out) / slug, f"{user}/{slug}", script, gpu=True, kernel_sources=sources)
    log.info(f"wrote {folder} ({user}/{slug}: folds {folds} from their training kernels)")
    return folder


def build_code_only(username: str | None, out: str | Path = "kernels") -> Path:
    """kernels/ich-kaggle-code/ alone (training needs no model dataset)."""
    names = build.KernelNames(build.check_username(username), "code", "ich-kaggle-code")
    return build.build_code_dataset(names, out)


# --- after the run ------------------------------------------------------------------------------------------------
def install_fold(downloaded: Path, cfg_name: str, fold: int, runs: str | Path) -> Path:
    """Move a fetched kernel output's runs/<config>/fold<N>/ into the local runs folder, manifest checked."""
    found = [p.parent for p in downloaded.rglob(FOLD_MANIFEST)
             if p.parent.parts[-2:] == (cfg_name, f"fold{int(fold)}")]
    if not found:
        raise UserError(f"no runs/{cfg_name}/fold{fold}/{FOLD_MANIFEST} in the kernel's output ({downloaded}); did "
                        f"its run finish? read its log there, or make kernel-status")
    manifest = json.loads((found[0] / FOLD_MANIFEST).read_text())
    missing = [n for n in manifest["files"] if not (found[0] / n).is_file()]
    if missing:
        raise UserError(f"{found[0]} lacks {', '.join(missing)} listed in {FOLD_MANIFEST}; fetch again (make kernel-fetch)")
    dest = Run.of(runs, cfg_name).fold(fold).dir
    dest.mkdir(parents=True, exist_ok=True)
    for name in manifest["files"] + [FOLD_MANIFEST]:
        shutil.copy2(found[0] / name, dest / name)
    state = "finished" if manifest.get("done") else "not finished yet (push again with RESUME=1)"
    log.info(f"fetched fold {fold} of {cfg_name} into {dest}: {', '.join(manifest['files'])}; {state}")
    return dest


def fetch_fold(cfg_name: str, fold: int, username: str | None, runs: str | Path = "runs",
               out: str | Path = "kernels") -> Path:
    from . import api

    user = build.check_username(username)
    slug = train_slug(cfg_name, fold)
    dest = Path(out) / "output" / slug
    if dest.exists():
        shutil.rmtree(dest)  # never mistake an earlier run's files for this one's
    dest.mkdir(parents=True)
    client = api.client()
    api.call(f"output of kernel {user}/{slug}", lambda: client.kernels_output(f"{user}/{slug}", str(dest), force=True),
             fix="check KAGGLE_USERNAME, CONFIG and fold, and that the run ended (make kernel-status)")
    return install_fold(dest, cfg_name, fold, runs)


def fetch_prepared(username: str | None, layout: Layout, out: str | Path = "kernels") -> Path:
    """The prepare kernel's meta.csv + folds.csv into the work folder, where `make kernel-datasets` (and every local
    stage) reads them: the inference kernel's model dataset can then be built without the competition's data."""
    from ..data import folds as folds_mod
    from . import api

    user = build.check_username(username)
    dest = Path(out) / "output" / PREPARE_SLUG
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    client = api.client()
    api.call(f"output of kernel {prepare_id(user)}", lambda: client.kernels_output(prepare_id(user), str(dest), force=True),
             fix="push it first (make kernel-prepare) and wait until it is complete (make kernel-status)")
    found = [p.parent for p in dest.rglob(PREPARE_MANIFEST)]
    missing = [n for n in PREPARED_FILES if not found or not (found[0] / n).is_file()]
    if missing:
        raise UserError(f"the output of {prepare_id(user)} in {dest} lacks {', '.join(missing)}; did its run finish "
                        f"(make kernel-status)? read its log there")
    work = layout.work
    work.mkdir(parents=True, exist_ok=True)
    for name in PREPARED_FILES + (PREPARE_MANIFEST,):
        shutil.copy2(found[0] / name, work / name)
    info = json.loads((found[0] / "folds.csv.json").read_text())  # adopted here: judged against this layout's labels
    folds_mod.write_folds(layout, folds_mod.read_folds(found[0] / "folds.csv"), info["k"], info["seed"])
    log.info(f"fetched {', '.join(PREPARED_FILES)} of {prepare_id(user)} into {work}")
    return work


def pushed_kernels(out: str | Path, username: str) -> list[str]:
    """Ids of the project's kernel folders under `out` owned by `username` (what `make kernel-*` wrote)."""
    ids = []
    for meta in sorted(Path(out).glob(f"*/{build.KERNEL_META}")):
        kid = str(json.loads(meta.read_text()).get("id", ""))
        if kid.startswith(f"{username}/"):
            ids.append(kid)
    return ids


def kernel_states(out: str | Path, username: str | None) -> dict[str, str]:
    """`make kernel-status`: each kernel's state on Kaggle (queued, running, complete, error, or not pushed)."""
    from . import api

    user = build.check_username(username)
    ids = pushed_kernels(out, user)
    if not ids:
        raise UserError(f"no kernel folder of {user} under {out}/; write one first (make kernel-prepare, make kernel-train)")
    client = api.client()
    states = {}
    for kid in ids:
        try:
            response = api.call(f"status of kernel {kid}", lambda: client.kernels_status(kid))
            state = getattr(response.status, "name", str(response.status)).lower()
            why = getattr(response, "failure_message", "") or ""
            states[kid] = state + (f" ({why})" if why else "")
        except UserError as e:
            states[kid] = "not pushed" if "404" in str(e) else f"unknown ({e})"
        log.info(f"{kid}: {states[kid]}")
    return states



def upload_code(folder: Path, message: str) -> str:
    """The code dataset to Kaggle: created the first time, a new version after that, then waited for."""
    from . import api

    ref = api.dataset_id(folder)
    if api.dataset_status(api.client(), ref) is None:
        api.create_datasets([folder])
    else:
        api.version_datasets([folder], message)
    api.wait_datasets([ref])
    return ref
