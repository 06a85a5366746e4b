"""Offline Kaggle kernel, on this side: the code and model datasets and the kernel folder, checked before upload.

Kaggle scores this competition only from kernels without internet, so everything the kernel needs travels in two
datasets built here: `<user>/ich-kaggle-code` (wheels) and `<user>/ich-kaggle-model-<config>` (fold checkpoints,
the stacker's inputs, folds, resolved config). `build_kernel` writes `kernels/<slug>/` with `kernel-metadata.json` and
one script (`template.py` with the install step of `kernel_install.py`); the script installs the wheels and calls
`run.run_inference`, which reuses the predict -> stack -> submit library calls of `make submit`, so both give the
same submission.
"""

from __future__ import annotations

import logging
import gzip
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.layout import COMPETITION
from .. import __version__
from ..core import config as config_mod, freshness
from ..core.config import Config
from ..core.errors import UserError
from ..core.io import atomic_path, write_csv
from . import metadata
from .metadata import DATASET_META, KERNEL_FILE, KERNEL_META, LICENSE, MACHINE_SHAPE, title_for  # noqa: F401
from .run import FOLDS, FOLDS_INFO, MANIFEST_FORMAT, MODEL_MANIFEST, TRAIN_META, read_manifest, slugify
from ..core.layout import Layout, Run
from ..core.config import selected_folds

log = logging.getLogger(__name__)

# What Kaggle's Python image lacks (or has too old: it ships pydicom 2.x) and the code needs. Kaggle has torch,
# torchvision, timm, numpy, pandas, opencv, albumentations, scikit-learn, pyyaml, tqdm, huggingface_hub, safetensors.
KERNEL_PACKAGES: tuple[str, ...] = (
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pretrainedmodels",
    "munch",
    "segmentation-models-pytorch",
    "blosc2",
    "ndindex",  # the cache codec (Kaggle's image may lack blosc2 or ship one older than 3.x)
)
# Installed if they can be: the kernel names one that does not install on its Python and goes on without it.
OPTIONAL_PACKAGES: dict[str, str] = {
    name: "needed only for compressed DICOMs; the RSNA files are uncompressed"
    for name in ("pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg")
}
CODE_SLUG = "ich-kaggle-code"
TEMPLATE = Path(__file__).with_name("template.py")
INSTALL = Path(__file__).with_name("kernel_install.py")  # the install step every kernel script embeds
_INSTALL_LINE = re.compile(r"^from ich_kaggle\.kaggle\.kernel_install import \(  # __INSTALL__[^\n]*\n[^)]*\)$", re.M)

_SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# --- names and metadata checks ---------------------------------------------------------------------------------
def check_slug(
    slug: str, what: str = "kernel slug", lo: int = 5, hi: int = 50, fix: str = "pass --slug / make kernel SLUG=<name>"
) -> str:
    if not lo <= len(slug) <= hi:
        raise UserError(f"{what} '{slug}' has {len(slug)} characters; Kaggle needs {lo} to {hi} ({fix})")
    if not _SLUG_RE.match(slug):
        raise UserError(
            f"{what} '{slug}' may only hold lower-case letters, digits and single hyphens, e.g. "
            f"'{slugify(slug) or 'ich-kaggle-kernel'}' ({fix})"
        )
    return slug


def check_username(username: str | None) -> str:
    """The owner of the datasets and kernels: given (--username, KAGGLE_USERNAME), else the credentials' own."""
    if not username or not username.strip():
        from . import api

        username = api.account_name()
    if not username:
        raise UserError(
            "no Kaggle username: none given and no Kaggle credentials to read it from; create an API token "
            "(kaggle.com > Settings > API > Generate New Token) and set KAGGLE_API_TOKEN, or pass "
            "KAGGLE_USERNAME=<you> (--username)"
        )
    username = username.strip()
    if not _USER_RE.match(username):
        raise UserError(
            f"Kaggle username '{username}' has invalid characters; use your account name as shown in "
            f"your profile URL (KAGGLE_USERNAME=<you>)"
        )
    return username


@dataclass(frozen=True)
class KernelNames:
    """Slugs and folders of the two datasets and the kernel for one config and owner."""

    username: str
    config_name: str
    kernel_slug: str

    @property
    def code_slug(self) -> str:
        return CODE_SLUG

    @property
    def model_slug(self) -> str:
        return f"ich-kaggle-model-{slugify(self.config_name)}"

    @property
    def code_id(self) -> str:
        return f"{self.username}/{self.code_slug}"

    @property
    def model_id(self) -> str:
        return f"{self.username}/{self.model_slug}"

    @property
    def kernel_id(self) -> str:
        return f"{self.username}/{self.kernel_slug}"

    def code_dir(self, out: str | Path) -> Path:
        return Path(out) / self.code_slug

    def model_dir(self, out: str | Path) -> Path:
        return Path(out) / self.model_slug

    def kernel_dir(self, out: str | Path) -> Path:
        return Path(out) / self.kernel_slug


def default_slug(cfg: Config) -> str:
    return f"ich-kaggle-{slugify(cfg.name)}"


def names_for(cfg: Config, username: str | None, slug: str | None = None) -> KernelNames:
    """Validated names: one-line UserErrors before anything is written or uploaded."""
    user = check_username(username)
    names = KernelNames(user, cfg.name, check_slug(slug or default_slug(cfg)))
    check_slug(
        names.model_slug,
        "model dataset slug",
        lo=6,  # Kaggle's dataset slugs: 6..50 characters
        fix=f"copy config '{cfg.name}' to a YAML file with a shorter name",
    )
    return names


# --- what the model dataset carries -------------------------------------------------------------------------------
def trained_folds(cfg: Config, runs: str | Path) -> list[int]:
    """Finished folds: a best checkpoint and done.json (restricted to cfg.cv.folds when set)."""
    run = Run.of(runs, cfg.name)
    return run.finished(selected_folds(cfg.cv))


def is_stacked(cfg: Config, runs: str | Path) -> bool:
    """Whether `make submit` uses the stacker's predictions (so the kernel must refit and apply it too)."""
    return Run.of(runs, cfg.name).stack.test.is_file()


def _shipped_predictions(cfg: Config, member: Config, runs: str | Path, folds: list[int], why: str) -> dict[str, Path]:
    """`member`'s OOF files that the kernel cannot recompute (it has no train images) but its later stages read:
    the stacker is refit on them (with `stack.embedding_space=per_fold` on each fold model's own), an ensemble's
    first stage combines them."""
    pred = Run.of(runs, member.name).predictions
    # embeddings only when the kernel's second stage reads them: an embedding stack (stack.use_embeddings, or
    # stack.embedding_stage beside the probability one); per_fold reads each fold model's own (with the PCA that
    # projects its test embeddings), the mixture the combined ones
    embeddings = (cfg.stack.use_embeddings or cfg.stack.embedding_stage) and is_stacked(cfg, runs)
    per_fold = cfg.stack.embedding_space == "per_fold"
    shipped = [pred.oof] + ([pred.oof_embeddings] if embeddings and not per_fold else [])
    if embeddings and per_fold:
        shipped += [p for k in folds for p in (pred.oof_fold(k), pred.oof_fold_embeddings(k), pred.fold_projection(k))]
    for path in shipped:
        if not path.is_file():
            raise UserError(f"{path} not found but {why}; rerun `make predict CONFIG={cfg.name}`")
    made = freshness.predictions(Run.of(runs, member.name), folds, member.tta)
    if stale := freshness.stale_reason(pred.oof, made):  # the OOF of exactly the folds shipped, as predict wrote it
        raise UserError(f"{pred.oof} is stale ({stale}) but {why}; rerun `make predict CONFIG={cfg.name}`")
    return {f"predictions_{path.name}": path for path in shipped}


def _member_files(
    cfg: Config, member: Config, runs: str | Path, prefix: str, oof_why: str | None, folds: list[int]
) -> dict[str, str]:
    """Flat name (with `prefix`) -> path inside runs/<member>/: each finished fold's best.pt and done.json, plus the
    OOF predictions when `oof_why` says a later stage needs them. Never local test predictions: the kernel
    recomputes them."""
    run = Run.of(runs, member.name)
    if not folds:
        raise UserError(
            f"no finished fold in {run.dir} (fold<k>/best.pt + done.json); train first "
            f"(make train-all CONFIG={cfg.name})"
        )
    unfinished = [k for k in selected_folds(member.cv) if k not in folds]
    if unfinished:
        raise UserError(
            f"fold(s) {unfinished} of {member.name} are not trained to the end (no fold<k>/done.json in "
            f"{run.dir}): the kernel would ship folds {folds} of cv.k={member.cv.k}; finish them with "
            f"`make train-all CONFIG={cfg.name}` (it resumes), or choose the folds to ship with "
            f"--set cv.folds=[...] (then predict again)"
        )
    files = {f"fold{k}_{path.name}": path for k in folds for path in (run.fold(k).best, run.fold(k).done)}
    if oof_why:
        files.update(_shipped_predictions(cfg, member, runs, folds, oof_why))
    return {prefix + flat: path.relative_to(run.dir).as_posix() for flat, path in files.items()}


def model_files(cfg: Config, runs: str | Path) -> dict[str, str]:
    """Flat dataset file name -> path inside runs/<cfg>/ (flat, so no --dir-mode zip nesting on Kaggle).

    A single config ships each trained fold's best.pt and, for a stacked run, the first-stage OOF predictions the
    stacker is refit on inside the kernel (it keeps no weights: it is cross-fitted fold by fold) plus its metrics.
    An ensemble ships only its own stack metrics here; its members' files are `member_files`."""
    run = Run.of(runs, cfg.name)
    stacked = is_stacked(cfg, runs)
    files = (
        {}
        if cfg.is_ensemble
        else _member_files(
            cfg,
            cfg,
            runs,
            "",
            f"{run.stack.dir} exists: the kernel refits the stacker on it" if stacked else None,
            trained_folds(cfg, runs),
        )
    )
    if stacked and run.stack.metrics.is_file():
        files[f"stack_{run.stack.metrics.name}"] = run.stack.metrics.relative_to(run.dir).as_posix()
    return files


def member_files(cfg: Config, members: list[Config], runs: str | Path) -> list[dict]:
    """An ensemble's members as the manifest lists them: name, folds, config file and files (flat name -> path
    inside runs/<member>/), each flat name prefixed with the member's name. Every member ships its OOF predictions:
    the kernel combines them into the ensemble's first stage and scores it for the choice by OOF."""
    out = []
    for member in members:
        prefix, folds = f"{member.name}__", trained_folds(member, runs)
        files = _member_files(
            cfg,
            member,
            runs,
            prefix,
            f"{cfg.name} is an ensemble: the kernel combines its members' OOF predictions",
            folds,
        )
        out.append({"name": member.name, "folds": folds, "config": f"{prefix}config.yaml", "files": files})
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link when possible (checkpoints are large; training replaces files atomically, so links stay valid)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


FP16_MAX = 65504.0


def _half_checkpoint(src: Path, dst: Path) -> None:
    """A fold's best.pt with its float32 weights stored as float16: half the upload (102.5 MB -> ~51 MB for
    se_resnext50); `load_state_dict` casts them back to float32. A tensor fp16 cannot hold (|x| > 65504) stays."""
    import torch

    from ..models.checkpoint import read_checkpoint, save_checkpoint

    ckpt = read_checkpoint(src)
    ckpt["model"] = {
        k: v.half() if v.dtype == torch.float32 and v.numel() and float(v.abs().max()) <= FP16_MAX else v
        for k, v in ckpt["model"].items()
    }
    save_checkpoint(dst, ckpt)


_write_json, _dataset_metadata, _fresh_tmp, _swap_in = (
    metadata.write_json,
    metadata.dataset_metadata,
    metadata.fresh_tmp,
    metadata.swap_in,
)


def _wheel_entry(w) -> dict:
    entry = {
        "file": w.path.name,
        "name": w.name,
        "version": w.version,
        "source": w.source,
        "pure": w.pure,
        "optional": w.name in OPTIONAL_PACKAGES,
    }
    if entry["optional"]:
        entry["why"] = OPTIONAL_PACKAGES[w.name]
    return entry


def build_code_dataset(names: KernelNames, out: str | Path, packages: tuple[str, ...] = KERNEL_PACKAGES) -> Path:
    """kernels/ich-kaggle-code/: the ich_kaggle wheel + wheels of what Kaggle's image lacks, flat."""
    from . import wheels

    final = names.code_dir(out)
    tmp = _fresh_tmp(final)
    built = wheels.collect(packages, tmp)
    lines = "\n".join(f"- {w.path.name} ({w.source})" for w in built)
    desc = (
        f"ich_kaggle {__version__} and the packages Kaggle's image lacks, for offline kernels of {COMPETITION}. "
        f"Install: pip install --no-index --find-links <this folder> --no-deps *.whl\n\n{lines}\n"
    )
    _write_json(tmp / DATASET_META, _dataset_metadata("ICH Kaggle code", names.code_id, desc))
    _write_json(
        tmp / "wheels.json",
        {
            "ich_kaggle": __version__,
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "wheels": [_wheel_entry(w) for w in built],
        },
    )
    _swap_in(tmp, final)
    return final


def _check_data_inputs(cfg: Config, layout: Layout | None) -> Layout:
    if layout is None or not layout.meta_csv.is_file() or not layout.folds_csv.is_file():
        where = f" ({layout.meta_csv} / {layout.folds_csv} not found)" if layout is not None else ""
        raise UserError(
            f"the kernel needs the folds.csv (and the stacker the meta.csv) of the training data{where}; "
            f"pass the data folder you trained on: make kernel-datasets CONFIG={cfg.name} DATA_DIR=<folder>"
        )
    return layout


def _write_data_inputs(layout: Layout, folder: Path, stacked: bool) -> None:
    """folds.csv (+ its sidecar: predict loads the folds) and, for the stacker, which is refit on the OOF predictions
    inside the kernel, the train rows of meta.csv (series order of the OOF images); gzipped."""
    with atomic_path(folder / FOLDS) as tmp:
        with open(layout.folds_csv, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
    sidecar = layout.folds_csv.with_name(layout.folds_csv.name + ".json")
    info = json.loads(sidecar.read_text()) if sidecar.is_file() else {"k": None, "seed": None}
    _write_json(folder / FOLDS_INFO, info)
    if stacked:
        from ..data.meta import read_meta

        meta = read_meta(layout.meta_csv)
        write_csv(meta[meta["split"] == "train"], folder / TRAIN_META)


def build_model_dataset(
    cfg: Config,
    names: KernelNames,
    runs: str | Path,
    out: str | Path,
    layout: Layout | None = None,
    fp16_weights: bool = False,
    members: list[Config] | None = None,
) -> Path:
    """kernels/ich-kaggle-model-<config>/: checkpoints, stacker inputs, folds, resolved config(s) and a manifest.

    `layout` is the data the runs were trained on (its folds.csv and meta.csv travel with the model).
    `members`: an ensemble's member configs as predict resolved them (default: `ensemble.load_members(cfg)`); each
    member's files and resolved config travel too, so the kernel predicts, combines and stacks as `make submit` does.
    `fp16_weights` stores the checkpoints' weights in float16: half the size, but on the tiny config the submission
    moved by up to 4.9e-4 (tests/test_kernel.py prints it), more than 1e-4, so it is opt-in.
    """
    from ..core import ensemble

    if cfg.is_ensemble and members is None:
        members = ensemble.load_members(cfg)
    files = model_files(cfg, runs)
    listed = member_files(cfg, members, runs) if cfg.is_ensemble else []
    stacked = is_stacked(cfg, runs)
    layout = _check_data_inputs(cfg, layout)
    from ..data import trained

    for member in members or [cfg]:  # the folds shipped are still the ones this config and data train
        trained.check(member, layout, runs, via=cfg.name)
    final = names.model_dir(out)
    tmp = _fresh_tmp(final)
    sources = [(Run.of(runs, cfg.name).dir, files)] + [(Run.of(runs, m["name"]).dir, m["files"]) for m in listed]
    for root, mapping in sources:
        for flat, rel in mapping.items():
            if fp16_weights and flat.endswith(".pt"):
                _half_checkpoint(root / rel, tmp / flat)
            else:
                _link_or_copy(root / rel, tmp / flat)
    _write_data_inputs(layout, tmp, stacked)
    config_mod.dump(cfg, tmp / "config.yaml")
    for member, entry in zip(members or [], listed):
        config_mod.dump(member, tmp / entry["config"])
    folds = trained_folds(cfg, runs) if not cfg.is_ensemble else sorted({k for m in listed for k in m["folds"]})
    manifest = {
        "format": MANIFEST_FORMAT,
        "config": cfg.name,
        "ich_kaggle": __version__,
        "folds": folds,
        "stack": stacked,
        "files": files,
        "weights": "fp16" if fp16_weights else "fp32",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if cfg.is_ensemble:
        manifest["members"] = listed
    _write_json(tmp / MODEL_MANIFEST, manifest)
    title = f"ICH Kaggle model {cfg.name}"[:50]
    what = (
        "ensemble of " + ", ".join(f"{m['name']} (folds {m['folds']})" for m in listed) if listed else f"folds {folds}"
    )
    desc = f"Config {cfg.name}: {what}, stacker {'yes' if stacked else 'no'}. {cfg.description}"
    _write_json(tmp / DATASET_META, _dataset_metadata(title, names.model_id, desc))
    _swap_in(tmp, final)
    return final


def build_datasets(
    cfg: Config,
    runs: str | Path = "runs",
    out: str | Path = "kernels",
    username: str | None = None,
    layout: Layout | None = None,
    fp16_weights: bool = False,
    members: list[Config] | None = None,
) -> dict[str, Path]:
    """`make kernel-datasets`: both dataset folders, ready for `kaggle datasets create/version -p`.

    `layout` is the data the runs were trained on: the stacker, refit inside the kernel, needs its meta and folds.
    """
    names = names_for(cfg, username)
    model = build_model_dataset(
        cfg,
        names,
        runs,
        out,
        layout,
        fp16_weights,  # "no trained fold" before the wheels
        members=members,
    )
    code = build_code_dataset(names, out)
    log.info(f"wrote {code} ({names.code_id}) and {model} ({names.model_id})")
    return {"code": code, "model": model}


def _warn_if_stale(cfg: Config, runs: str | Path, model_dir: Path, manifest: dict) -> None:
    """The kernel may run on a model dataset older than the local runs: say so (it is not an error)."""
    runs_of = [("", cfg.name, manifest["files"], manifest["folds"])] + [
        (f"{m['name']}/", m["name"], m["files"], m["folds"]) for m in manifest.get("members", [])
    ]
    newer, extra = [], []
    for prefix, name, files, folds in runs_of:
        run = Run.of(runs, name)
        newer += [
            prefix + rel
            for flat, rel in files.items()
            if (run.dir / rel).is_file() and (run.dir / rel).stat().st_mtime > (model_dir / flat).stat().st_mtime + 1
        ]
        if not (prefix == "" and cfg.is_ensemble):  # an ensemble's own folder has no folds
            extra += [f"{prefix}fold{k}/best.pt" for k in run.finished(selected_folds(cfg.cv)) if k not in folds]
    if newer or extra:
        log.info(
            f"warning: {Run.of(runs, cfg.name).dir} has newer files than {model_dir} "
            f"({', '.join(newer + extra)}); rerun "
            f"`make kernel-datasets` and `make datasets-version` to ship them"
        )


def _read_dataset_id(folder: Path, fix: str) -> str:
    meta = folder / DATASET_META
    if not meta.is_file():
        raise UserError(f"dataset folder {folder} is missing ({meta} not found); {fix}")
    try:
        return str(json.loads(meta.read_text())["id"])
    except (ValueError, KeyError):
        raise UserError(f"{meta} is not valid dataset metadata (no 'id'); {fix}") from None


def embed_install(template: str, values: dict[str, str]) -> str:
    """`template` with its `from ich_kaggle.kaggle.kernel_install import (  # __INSTALL__ ...)` statement replaced by
    kernel_install.py's text, its placeholders (CONFIG_NAME, CODE_DATASET, MODEL_DATASET, ICH_KAGGLE_VERSION)
    filled: the one install step of the inference, prepare and training kernels (run there without ich_kaggle)."""
    found = _INSTALL_LINE.findall(template)
    if len(found) != 1:
        raise RuntimeError(
            f"a kernel template needs exactly one '# __INSTALL__' import of kernel_install, not {len(found)}"
        )
    block = INSTALL.read_text()
    for key, value in values.items():
        block = block.replace(f'"__{key}__"', json.dumps(value))
    left = re.findall(r'"__[A-Z_]+__"', block)
    if left:
        raise RuntimeError(f"kernel_install.py placeholders left unfilled: {', '.join(left)}")
    return template.replace(found[0], block.rstrip())


def build_kernel(
    cfg: Config,
    runs: str | Path = "runs",
    out: str | Path = "kernels",
    username: str | None = None,
    slug: str | None = None,
) -> Path:
    """`make kernel`: kernels/<slug>/ with kernel-metadata.json and the script, after checking everything it needs."""
    names = names_for(cfg, username, slug)
    fix = f"run `make kernel-datasets CONFIG={cfg.name} KAGGLE_USERNAME={names.username}` first"
    for folder, expected in ((names.code_dir(out), names.code_id), (names.model_dir(out), names.model_id)):
        found = _read_dataset_id(folder, fix)
        if found != expected:
            raise UserError(f"{folder / DATASET_META} has id '{found}', expected '{expected}'; {fix}")
    if not any(names.code_dir(out).glob("ich_kaggle-*.whl")):
        raise UserError(f"{names.code_dir(out)} holds no ich_kaggle wheel; {fix}")
    manifest = read_manifest(names.model_dir(out))
    if not manifest["folds"]:
        raise UserError(f"{names.model_dir(out) / MODEL_MANIFEST} lists no trained fold; train first, then {fix}")
    _warn_if_stale(cfg, runs, names.model_dir(out), manifest)

    script = embed_install(
        TEMPLATE.read_text(),
        {
            "CONFIG_NAME": cfg.name,
            "CODE_DATASET": names.code_id,
            "MODEL_DATASET": names.model_id,
            "ICH_KAGGLE_VERSION": __version__,
        },
    )
    compile(script, KERNEL_FILE, "exec")
    from . import weights_dataset

    # the inference kernel loads its checkpoints (no ImageNet weights): the weights dataset rides along when built
    weights = weights_dataset.attach([], names.username, out, required=False)
    folder = metadata.write_kernel(
        names.kernel_dir(out), names.kernel_id, script, gpu=True, datasets=[names.code_id, names.model_id, *weights]
    )
    log.info(f"wrote {folder} ({names.kernel_id}); push with: kaggle kernels push -p {folder}")
    return folder
