"""Offline Kaggle kernel, inside the kernel: find the inputs, rebuild runs/ and the work folder, predict -> stack ->
submit with the same library calls as `make submit`, and write the validated submission.csv.

Imported by the kernel script after it installed ich_kaggle from the code dataset (see `kernel.py` for the build).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from ..core import manifest as manifest_mod
from ..core.layout import COMPETITION
from ..core import config as config_mod
from ..core.config import Config
from ..core.errors import UserError
from ..core.io import atomic_path, write_csv
from ..core.layout import Layout, Run

MODEL_MANIFEST = "ich_kaggle_model.json"
MANIFEST_FORMAT = 2  # bump when the model dataset's layout changes (2: ensembles list their members)
TRAIN_META = "train_meta.csv.gz"
FOLDS = "folds.csv.gz"
FOLDS_INFO = "folds.csv.json"
SAMPLE_NAME = "stage_2_sample_submission.csv"


def slugify(text: str) -> str:
    """Kaggle's URL slug: lower case, runs of other characters become one hyphen."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class KernelInputs:
    competition: Path  # folder holding stage_2_sample_submission.csv and stage_2_test/
    model: Path  # folder holding ich_kaggle_model.json
    code: Path | None  # folder holding the ich_kaggle wheel


def find_inputs(root: str | Path, config_name: str | None = None) -> KernelInputs:
    """The competition, the model dataset (of `config_name` when given) and the code dataset under the input root,
    at any depth (`core.kaggle_input`: mount paths differ between old and new kernels)."""
    from ..core import kaggle_input

    root = Path(root)
    competition = find_test_competition(root)
    models = kaggle_input.find_all(root, kaggle_input.holding(MODEL_MANIFEST))
    codes = kaggle_input.find_all(
        root, lambda p, files: any(f.startswith("ich_kaggle-") and f.endswith(".whl") for f in files)
    )
    if config_name is not None:
        matching = [m for m in models if json.loads((m / MODEL_MANIFEST).read_text()).get("config") == config_name]
        if models and not matching:
            raise UserError(
                f"model datasets under {root} hold other configs than '{config_name}'; attach "
                f"ich-kaggle-model-{slugify(config_name)}"
            )
        models = matching
    if not models:
        raise UserError(f"no {MODEL_MANIFEST} under {root}; attach the model dataset built by `make kernel-datasets`")
    return KernelInputs(competition, models[0], codes[0] if codes else None)


def find_test_competition(root: str | Path) -> Path:
    """The competition folder with the sample submission and the test images."""
    from ..core import kaggle_input

    return kaggle_input.find(
        root,
        lambda p, files: SAMPLE_NAME in files and (p / "stage_2_test").is_dir(),
        f"no {SAMPLE_NAME} beside a stage_2_test/ folder under {root}; add the competition "
        f"'{COMPETITION}' as a data source of the kernel",
    )


def read_manifest(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MODEL_MANIFEST
    if not path.is_file():
        raise UserError(f"{path} not found; rebuild the model dataset with `make kernel-datasets`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON; rebuild the model dataset with `make kernel-datasets`") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(
            f"{path} has format {manifest.get('format')!r}, this ich_kaggle reads {MANIFEST_FORMAT}; "
            f"rebuild both datasets with the same ich_kaggle (make kernel-datasets) and upload them"
        )
    listed = [*manifest.get("files", {})] + [f for m in manifest.get("members", []) for f in (*m["files"], m["config"])]
    missing = [flat for flat in listed if not (Path(model_dir) / flat).is_file()]
    if missing:
        raise UserError(
            f"{path.parent} lacks {', '.join(missing)} listed in its manifest; upload the whole folder again"
        )
    return manifest


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        dst.symlink_to(src.resolve())
    except OSError:
        shutil.copy2(src, dst)


def _read_config(path: Path) -> Config:
    try:
        return config_mod.from_dict(yaml.safe_load(path.read_text()), source=str(path))
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path} unreadable ({e}); rebuild the model dataset with `make kernel-datasets`") from None


def _materialize_run(model_dir: Path, cfg: Config, folds: list[int], files: dict[str, str], runs: Path) -> Config:
    cfg.cv.folds = list(folds)
    run = Run.of(runs, cfg.name)
    for flat, rel in files.items():
        _link(model_dir / flat, run.dir / rel)
    config_mod.dump(cfg, run.config)
    return cfg


def materialize(model_dir: Path, manifest: dict, runs: Path) -> Config:
    """Recreate runs/<cfg>/ (fold checkpoints, stacker files, OOF) from the flat, read-only dataset by symlinks."""
    cfg = _read_config(model_dir / "config.yaml")
    return _materialize_run(model_dir, cfg, manifest["folds"], manifest["files"], runs)


def materialize_members(model_dir: Path, manifest: dict, runs: Path) -> list[Config]:
    """An ensemble's members: runs/<member>/ of each (checkpoints, OOF predictions) and its resolved config."""
    return [
        _materialize_run(model_dir, _read_config(model_dir / m["config"]), m["folds"], m["files"], runs)
        for m in manifest.get("members", [])
    ]


def data_view(competition: Path, folder: Path) -> Path:
    """A data folder with the test images, sample submission and train labels (the prior for unreadable images)
    but not the 750k train images, so no stage scans their headers inside the kernel."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("stage_2_test", SAMPLE_NAME, "stage_2_train.csv"):
        if (competition / name).exists():
            _link(competition / name, folder / name)
    return folder


def prepare_work(layout: Layout, model_dir: Path) -> None:
    """folds.csv as shipped and meta.csv from a scan of the test DICOMs only (the data view has no train images)."""
    from ..data import folds as folds_mod
    from ..data import meta as meta_mod

    info = json.loads((model_dir / FOLDS_INFO).read_text())
    folds_mod.write_folds(layout, folds_mod.read_folds(model_dir / FOLDS), info["k"], info["seed"])
    meta_mod.load_meta(layout)


def restore_oof(model_dir: Path, manifest: dict, runs: Path) -> None:
    """The shipped OOF predictions back in each run's predictions/ (predict rewrites oof.csv from the folds' own
    validation images, which the kernel does not have): what the stacker is refit on and an ensemble combines."""
    entries = [(manifest["config"], manifest["files"])] + [(m["name"], m["files"]) for m in manifest.get("members", [])]
    for name, files in entries:
        run = Run.of(runs, name)
        restored = []
        for flat, rel in files.items():
            if (run.dir / rel).parent == run.predictions.dir:
                _link(model_dir / flat, run.dir / rel)
                restored.append(run.dir / rel)
        for path in restored:  # the shipped files are what the chain now holds (see core.manifest.adopt)
            manifest_mod.adopt(path)


def prepare_stack(layout: Layout, model_dir: Path, manifest: dict, run: Run) -> None:
    """Before stacking: the shipped OOF predictions back (`restore_oof`), and the shipped train rows join meta.csv
    so the OOF images can be placed in their series."""
    from ..data import meta as meta_mod

    restore_oof(model_dir, manifest, run.dir.parent)
    meta = meta_mod.read_meta(layout.meta_csv)
    train = meta_mod.read_meta(model_dir / TRAIN_META)
    write_csv(pd.concat([meta[meta["split"] != "train"], train], ignore_index=True), layout.meta_csv)
    manifest_mod.adopt(layout.meta_csv)  # the same scan of the test DICOMs, plus the shipped train rows


def run_inference(
    model_dir: str | Path, competition: str | Path, working: str | Path, scratch: str | Path | None = None
) -> Path:
    """Predict (TTA, every shipped fold) -> stack -> submission, exactly the library calls of `make submit`.

    Only `submission.csv` goes to `working` (Kaggle keeps it as the kernel's output, 20 GB at most); the image cache,
    runs and intermediate files go to `scratch` (default: `working`).
    """
    from ..predict import stage as predict
    from ..stack import stage as stack
    from ..submit import stage as submission

    model_dir, competition, working = Path(model_dir), Path(competition), Path(working)
    scratch = Path(scratch) if scratch is not None else working
    manifest = read_manifest(model_dir)
    runs = scratch / "runs"
    cfg = materialize(model_dir, manifest, runs)
    members = materialize_members(model_dir, manifest, runs) or [cfg]  # an ensemble's, or the config itself
    for c in (cfg, *members):
        c.data.num_workers = -1  # this machine's CPUs (Kaggle: 4), not the training machine's worker count
    layout = Layout.of(data_view(competition, scratch / "data"), scratch / "work")
    prepare_work(layout, model_dir)
    restore_oof(model_dir, manifest, runs)  # first too: each fold model's shipped PCA projects its test embeddings
    for member in members:
        predict.predict(member, layout, runs=runs, reads=cfg.stack)
    if cfg.is_ensemble:
        restore_oof(model_dir, manifest, runs)
        predict.combine_members(cfg, members, layout, runs=runs)
    if manifest.get("stack"):
        prepare_stack(layout, model_dir, manifest, Run.of(runs, cfg.name))
        stack.stack(cfg, layout, runs=runs)
    written = submission.submit(cfg, layout, runs=runs, out_dir=scratch / "submissions")
    final = working / "submission.csv"
    with atomic_path(final) as tmp:
        shutil.copyfile(written, tmp)
    problems = submission.validate_file(layout.sample_csv, final)
    if problems:
        raise UserError(f"{final} failed validation: {problems[0]} ({len(problems)} problem(s)); see the log above")
    return final
