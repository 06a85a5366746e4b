"""Training on Kaggle, inside the kernel: the prepare kernel's scan (meta.csv + folds.csv) and one fold's training.

Imported by the prepare and training kernel scripts (`train_template.py`) after they installed ich_kaggle from the
code dataset. Every fold of every config trains on the folds the prepare kernel wrote once, so they all agree.

The training kernel caches the images on the scratch disk (not /kaggle/working, which Kaggle keeps as the output and
caps at about 20 GB) where that cache fits, else reads every slice from its DICOM (`data.source=dicom`: always at
competition scale, whose ~175 GB of cache exceed a session's whole disk), trains into
/kaggle/working/runs/<config>/fold<N>/ (what `make kernel-fetch` downloads), and resumes from the same files of
the previous version's output when that is attached as a kernel source.
"""

from __future__ import annotations

import logging
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..core import config as config_mod
from ..core.config import Config, CVConfig
from ..core.errors import UserError
from ..core.io import atomic_open, write_csv
from ..core.layout import COMPETITION, FoldRun, Layout, Run
from ..engine.loop import STOP_ENV
from ..core import kaggle_input
from .run import find_test_competition  # noqa: F401  (the inference kernel calls it here)

log = logging.getLogger(__name__)

PREPARE_MANIFEST = "ich_kaggle_prepare.json"  # marks the prepare kernel's output (or a user's own folds dataset)
FOLD_MANIFEST = "ich_kaggle_fold.json"  # written beside a fold's files by the training kernel
PREPARED_FILES = ("meta.csv", "folds.csv", "folds.csv.json")


def _write_json(path: Path, data: dict) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# --- the prepare kernel --------------------------------------------------------------------------------------------
def find_competition(root: str | Path) -> Path:
    """The competition folder with the train labels and images (mounts nest differently in old and new kernels)."""
    return kaggle_input.find(
        root,
        lambda p, files: "stage_2_train.csv" in files and (p / "stage_2_train").is_dir(),
        f"no stage_2_train.csv beside a stage_2_train/ folder under {root}; add the competition "
        f"'{COMPETITION}' as a data source of the kernel",
    )


def run_prepare(
    competition: str | Path,
    working: str | Path,
    k: int = CVConfig.k,
    seed: int = CVConfig.seed,
    workers: int | None = None,
) -> Path:
    """meta.csv (every train and test header) and folds.csv for (k, seed) into `working`, with a manifest:
    exactly `make meta` + `make folds` on the same files."""
    from ..data import folds, meta
    from ..data.dataset import usable_cpus

    working = Path(working)
    layout = Layout.of(competition, working)
    working.mkdir(parents=True, exist_ok=True)
    table = meta.build_meta(layout, workers=workers or usable_cpus())
    built = folds.build_folds(layout, k=k, seed=seed)
    _write_json(
        working / PREPARE_MANIFEST,
        {
            "k": k,
            "seed": seed,
            "images": len(built),
            "slices": len(table),
            "ich_kaggle": __version__,
            "files": list(PREPARED_FILES),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    return working


# --- the training kernel -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainInputs:
    competition: Path  # stage_2_train.csv + stage_2_train/
    prepared: Path  # meta.csv + folds.csv (+ ich_kaggle_prepare.json)
    previous: Path | None  # runs/<config>/fold<N>/ of the previous version's output, when attached


def find_train_inputs(root: str | Path, config_name: str, fold: int) -> TrainInputs:
    root = Path(root)
    competition = find_competition(root)
    tail = ("runs", config_name, f"fold{int(fold)}")
    prepared = kaggle_input.find_all(root, kaggle_input.holding(PREPARE_MANIFEST))
    # /kaggle/input/notebooks/<user>/<slug>/runs/<cfg>/fold<N>: this kernel's previous version
    previous = kaggle_input.find_all(
        root, lambda p, files: p.parts[-3:] == tail and FoldRun(p, int(fold)).last.name in files
    )
    if not prepared:
        raise UserError(
            f"no {PREPARE_MANIFEST} under {root}; attach the prepare kernel's output (make kernel-prepare, "
            f"then make kernel-train) or a dataset holding your own meta.csv, folds.csv and that file"
        )
    return TrainInputs(competition, prepared[0], previous[0] if previous else None)


def install_prepared(prepared: Path, layout: Layout, cfg: Config) -> None:
    """The prepare kernel's folds as this run's folds.csv and the train rows of its meta.csv (so only train images
    are cached), checked against the config's cv.k / cv.seed (other folds would be rebuilt from a full scan)."""
    from ..data import meta as meta_mod

    missing = [n for n in PREPARED_FILES if not (prepared / n).is_file()]
    if missing:
        raise UserError(f"{prepared} lacks {', '.join(missing)}; rerun the prepare kernel (make kernel-prepare)")
    info = json.loads((prepared / "folds.csv.json").read_text())
    if (info.get("k"), info.get("seed")) != (cfg.cv.k, cfg.cv.seed):
        raise UserError(
            f"{prepared / 'folds.csv'} has k={info.get('k')}, seed={info.get('seed')} but config "
            f"'{cfg.name}' wants cv.k={cfg.cv.k}, cv.seed={cfg.cv.seed}; rerun make kernel-prepare "
            f"K={cfg.cv.k} SEED={cfg.cv.seed}"
        )
    layout.work.mkdir(parents=True, exist_ok=True)
    adopted = adopt_meta(prepared, layout)
    if not adopted:  # an older prepare output without the scan's manifest: its train rows (load_meta rescans)
        table = meta_mod.read_meta(prepared / "meta.csv")
        write_csv(table[table["split"] == "train"], layout.meta_csv)
    from ..data import folds as folds_mod

    folds_mod.write_folds(layout, folds_mod.read_folds(prepared / "folds.csv"), info["k"], info["seed"])


def adopt_meta(prepared: Path, layout: Layout) -> bool:
    """The prepare kernel's meta.csv with its manifest, skipped.csv and DICOM listing into the work folder, so
    `load_meta` finds it fresh (the same competition files, sizes and mtimes) and scans no header again; only files
    that differ are rescanned. False where the prepare output predates its manifest."""
    from ..core import manifest

    there = Layout.of(prepared, prepared)
    pairs = [
        (there.meta_csv, layout.meta_csv),
        (manifest.path_of(there.meta_csv), manifest.path_of(layout.meta_csv)),
        (there.skipped_csv, layout.skipped_csv),
        (there.meta_inputs, layout.meta_inputs),
    ]
    if not all(src.is_file() for src, _ in pairs):
        log.info(
            f"{prepared} has no manifest of its meta.csv (an older prepare kernel): the headers are rescanned; "
            f"rerun make kernel-prepare to skip that"
        )
        return False
    for src, dst in pairs[2:] + pairs[:1] + pairs[1:2]:  # the manifest last: an interrupted copy reads as stale
        shutil.copyfile(src, dst)
    log.info(f"meta: adopted {there.meta_csv} with its manifest (no rescan of the headers)")
    return True


def restore_previous(previous: Path, fold_run: FoldRun) -> list[str]:
    """Copy the previous version's fold files into the working fold folder (inputs are read-only; training
    replaces its files atomically). Nothing is copied over a fold folder that already has a last.pt."""
    if fold_run.last.is_file():
        return []
    fold_run.dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in (p.name for p in fold_run.outputs):
        if (previous / name).is_file():
            shutil.copy2(previous / name, fold_run.dir / name)
            copied.append(name)
    return copied


CACHE_BYTES_PER_IMAGE = 240_000  # a 512 x 512 slice in the cache's format (`make bench`, codec table: ~232 kB)


def scratch_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


SCRATCH_KEEP = 0.1  # of the scratch disk's free space left free when caching (the checkpoints, logs, temp files)


def choose_source(layout: Layout, cfg: Config) -> str:
    """ "cache" or "dicom": where the training kernel reads the train images from, said in its log with the figures.

    The cache when it fits the scratch disk (leaving SCRATCH_KEEP of it free): it is the local path, and reads
    ~3.4x fewer bytes per epoch from the input mount. Otherwise every slice straight from its DICOM
    (`data.source=dicom`: the same HU, no disk, no caching pass), which is always the case at competition scale
    (752,803 train slices: ~175 GB of cache against ~73 GB of disk in a whole session). `data.source=dicom` in the
    config reads the DICOMs whatever the disk (`make bench`: per loader worker that is no slower than the cache)."""
    from ..data import cache, meta as meta_mod

    if cfg.data.source == "dicom":
        log.info(f"images: read from their DICOMs under {layout.data} (data.source=dicom in the config); no cache")
        return "dicom"
    table = meta_mod.read_meta(layout.meta_csv)
    todo = int((table["split"] == "train").sum()) - len(cache.cached_ids(layout))
    need = todo * CACHE_BYTES_PER_IMAGE
    layout.work.mkdir(parents=True, exist_ok=True)
    free = scratch_free_bytes(layout.work)
    if need > free * (1 - SCRATCH_KEEP):
        log.info(
            f"images: caching {todo:,} train images would need about {need / 1e9:.1f} GB but {layout.work} has "
            f"{free / 1e9:.1f} GB free; reading every slice from its DICOM under {layout.data} instead "
            f"(data.source=dicom, the same HU; no cache)"
        )
        return "dicom"
    log.info(
        f"images: caching {todo:,} train images (about {need / 1e9:.1f} GB of the {free / 1e9:.1f} GB free "
        f"in {layout.work}; data.source=cache)"
    )
    return "cache"


def epochs_done(fold_run: FoldRun) -> int:
    """Epochs in the fold's log.csv (one row per finished epoch)."""
    if not fold_run.log_csv.is_file():
        return 0
    with open(fold_run.log_csv) as f:
        return max(0, sum(1 for line in f if line.strip()) - 1)


def launch_command(config_path: Path, layout: Layout, runs: Path, fold: int, gpus: int) -> list[str]:
    """`python -m ich_kaggle train ...`, under torchrun with one process per GPU when there are two or more."""
    train = [
        "-m",
        "ich_kaggle",
        "train",
        "--config",
        str(config_path),
        "--data",
        str(layout.data),
        "--work",
        str(layout.work),
        "--runs",
        str(runs),
        "--fold",
        str(fold),
    ]
    if gpus >= 2:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *train]
    return [sys.executable, *train]


def run_training(
    cfg: Config,
    fold: int,
    inputs: TrainInputs,
    working: str | Path,
    scratch: str | Path,
    gpus: int | None = None,
    epochs_per_run: int | None = None,
) -> FoldRun:
    """Preprocess into scratch where the cache fits (`choose_source`; else read the DICOMs), train the fold
    (resuming from the previous output), write its manifest.

    `epochs_per_run` stops resumably after that many more epochs than the previous output holds (a fold too long
    for one 12-hour session trains over several versions)."""
    from ..data import preprocess
    from ..data.dataset import usable_cpus
    from ..core.config import selected_folds

    selected_folds(cfg.cv, fold)
    working, scratch = Path(working), Path(scratch)
    layout = Layout.of(inputs.competition, scratch / "work")
    install_prepared(inputs.prepared, layout, cfg)
    runs = working / "runs"
    fold_run = Run.of(runs, cfg.name).fold(fold)
    if inputs.previous is not None:
        copied = restore_previous(inputs.previous, fold_run)
        log.info(
            f"resuming from the previous version's output {inputs.previous} ({', '.join(copied) or 'nothing new'})"
        )
    source = choose_source(layout, cfg)
    if source == "cache":
        # here, once, with every CPU, before the training processes start (under torchrun no rank repeats it)
        preprocess.ensure(layout, workers=usable_cpus(), splits=("train",))
    if gpus is None:
        from ..train.side_by_side import visible_gpus

        gpus = len(visible_gpus())
    share = max(1, usable_cpus() // max(gpus, 1))  # Kaggle: 4 CPUs for both ranks; a config's 8 workers would thrash
    cfg = copy.deepcopy(cfg)
    cfg.data.source = source  # in the fold's config.yaml too: it says what the fold read
    cfg.data.num_workers = min(cfg.data.num_workers, share) if cfg.data.num_workers >= 0 else -1
    config_path = scratch / f"{cfg.name}.yaml"
    config_mod.dump(cfg, config_path)
    cmd = launch_command(config_path, layout, runs, fold, gpus)
    log.info(
        f"training fold {fold} of {cfg.name} on {max(gpus, 1)} {'GPU' if gpus else 'CPU'} process(es): {' '.join(cmd)}"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if epochs_per_run:
        env[STOP_ENV] = str(epochs_done(fold_run) + int(epochs_per_run))
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise UserError(
            f"training fold {fold} of {cfg.name} exited with status {result.returncode}; see the log "
            f"above (a rerun of the kernel with its output attached resumes from {fold_run.last.name})"
        )
    _write_json(
        fold_run.dir / FOLD_MANIFEST,
        {
            "config": cfg.name,
            "fold": int(fold),
            "ich_kaggle": __version__,
            "done": fold_run.done.is_file(),
            "images": source,
            "files": sorted(p.name for p in fold_run.dir.iterdir() if p.is_file() and p.name != FOLD_MANIFEST),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    return fold_run


# --- the inference kernel on the training kernels' outputs (no model dataset) -------------------------------------
def _finished_folds(root: Path, name: str) -> dict[int, Path]:
    """fold -> the nearest attached runs/<name>/fold<k>/ that holds best.pt and done.json."""

    def finished(path: Path, files: list[str]) -> bool:
        parts = path.parts
        return (
            len(parts) >= 3
            and parts[-3] == "runs"
            and parts[-2] == name
            and parts[-1].startswith("fold")
            and parts[-1][4:].isdigit()
            and {FoldRun(path, 0).best.name, FoldRun(path, 0).done.name} <= set(files)
        )

    found: dict[int, Path] = {}
    for path in kaggle_input.find_all(root, finished):
        found.setdefault(int(path.name[4:]), path)
    return found


def assemble_model(root: str | Path, config_name: str, folds: list[int], cfg: Config | None = None):
    """The first-stage model bundle of the attached training kernels' finished folds, held in memory: each member's
    fold checkpoints and resolved config where the training kernels' outputs are mounted, an ensemble's combination
    from `cfg`. Nothing is written (`bundle.export` is the one writer of the bundle format, and these folds have no
    OOF choice or second stage to export); `run.run_kernel` runs it as it runs the model dataset's bundle."""
    from .. import bundle
    from ..core import ensemble

    root = Path(root)
    names = ensemble.member_names(cfg) if cfg is not None and cfg.is_ensemble else [config_name]
    entries, files = [], {}
    for name in names:
        found = _finished_folds(root, name)
        missing = [k for k in folds if k not in found]
        if missing:
            raise UserError(
                f"no finished runs/{name}/fold<k>/ (best.pt + done.json) under {root} for fold(s) "
                f"{missing}; attach their training kernels once they are complete (make kernel-status)"
            )
        weights = [str(FoldRun(found[k], k).best) for k in folds]
        for w in weights:
            files[w] = {"sha256": bundle.sha256(Path(w)), "bytes": Path(w).stat().st_size}
        config = str(FoldRun(found[folds[0]], folds[0]).config)
        entries.append({"name": name, "folds": list(folds), "config": config, "weights": weights})
    info = {
        "format": bundle.FORMAT,
        "name": config_name,
        "kind": "ensemble" if len(names) > 1 or (cfg is not None and cfg.is_ensemble) else "config",
        "stage": "first_stage",
        "members": entries,
        "ensemble": (
            {"combine": cfg.ensemble.combine, "weights": ensemble.weights(cfg.ensemble, len(names)).tolist()}
            if cfg is not None and cfg.is_ensemble
            else None
        ),
        "second_stages": {},
        "blend": None,
        "files": files,
    }
    return bundle.Bundle(Path("/"), info)
