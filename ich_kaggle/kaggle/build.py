"""Offline Kaggle kernel, on this side: the code and model datasets and the kernel folder, checked before upload.

Kaggle scores this competition only from kernels without internet, so everything the kernel needs travels in two
datasets built here: `<user>/ich-kaggle-code` (wheels) and `<user>/ich-kaggle-model-<config>`, which IS the model
bundle (`bundle.export` writes it; only Kaggle's dataset-metadata.json is added). `build_kernel` writes
`kernels/<slug>/` with `kernel-metadata.json` and one script (`template.py` with the install step of
`kernel_install.py`); the script installs the wheels and calls `run.run_kernel`, which runs the bundle's chosen
pipeline (`apply.infer.run_pipeline`, as `infer` does) on the test folder, keeping each fold's predictions in the
kernel's output as it goes, so a cut session resumes.
"""

from __future__ import annotations

import logging
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.layout import COMPETITION
from .. import __version__
from ..core.config import Config
from ..core.errors import UserError
from . import metadata
from .metadata import DATASET_META, KERNEL_FILE, KERNEL_META, LICENSE, MACHINE_SHAPE, title_for  # noqa: F401
from .run import slugify
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


# --- the model dataset: the model bundle ---------------------------------------------------------------------------
OLD_MANIFEST = "ich_kaggle_model.json"  # the model dataset's own format before it became the bundle


def build_model_dataset(
    cfg: Config,
    names: KernelNames,
    runs: str | Path,
    out: str | Path,
    layout: Layout | None = None,
    fp16_weights: bool = False,
    members: list[Config] | None = None,
) -> Path:
    """kernels/ich-kaggle-model-<config>/: the model bundle (`bundle.export`, the one writer of its format: every
    finished fold's weights, the resolved configs, the stage `make submit` chose and its fitted second stage,
    bundle.json with the checksums) plus Kaggle's dataset-metadata.json, which the bundle does not list.

    `layout` is the data the runs were trained on (its labels choose the stage and the thresholds). `fp16_weights`
    stores the weights in float16: half the upload; the submission moves by float16 rounding, so it is opt-in."""
    from .. import bundle

    if layout is None:
        raise UserError(
            f"the model dataset is the model bundle, which needs the data folder the runs were trained on; "
            f"make kernel-datasets CONFIG={cfg.name} DATA_DIR=<folder>"
        )
    final = names.model_dir(out)
    if (final / OLD_MANIFEST).is_file():  # a model dataset of the old format, written by this project: replaced
        log.info(f"replacing {final} (the old model-dataset format) by the model bundle")
        shutil.rmtree(final)
    bundle.export(cfg, runs, final, fp16=fp16_weights, layout=layout, members=members)
    info = bundle.load(final, verify=False).info
    what = ", ".join(f"{m['name']} (folds {m['folds']})" for m in info["members"])
    desc = f"Model bundle of {cfg.name} (ich_kaggle {__version__}): {what}; stage {info['stage']}. {cfg.description}"
    _write_json(final / DATASET_META, _dataset_metadata(f"ICH Kaggle model {cfg.name}"[:50], names.model_id, desc))
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
    """`make kernel-datasets`: both dataset folders, ready for `kaggle datasets create/version -p`."""
    names = names_for(cfg, username)
    model = build_model_dataset(cfg, names, runs, out, layout, fp16_weights, members=members)  # before the wheels
    code = build_code_dataset(names, out)
    log.info(f"wrote {code} ({names.code_id}) and {model} ({names.model_id})")
    return {"code": code, "model": model}


def _warn_if_stale(runs: str | Path, model_dir: Path, b) -> None:
    """The kernel may run on a model dataset older than the local runs: say so (it is not an error)."""
    made = (model_dir / "bundle.json").stat().st_mtime
    newer = []
    for m in b.info["members"]:
        run = Run.of(runs, m["name"])
        newer += [
            f"{m['name']}/fold{k}/best.pt"
            for k in run.finished(selected_folds(b.member_config(m).cv))
            if run.fold(k).best.stat().st_mtime > made + 1 or k not in m["folds"]
        ]
    if newer:
        log.info(
            f"warning: {runs} has newer or more folds than {model_dir} ({', '.join(newer)}); rerun "
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


_PART_LINE = re.compile(r"^PART = .*# __PART__.*$", re.M)


def part_slug(cfg: Config, member_names: list[str], members: list[str] | None, folds: list[int] | None) -> str:
    """The default slug of a part kernel: ich-kaggle-<config>-m<member indexes>-f<folds>."""
    slug = default_slug(cfg)
    if members is not None:
        slug += "-m" + "".join(str(member_names.index(m)) for m in members)
    if folds is not None:
        slug += "-f" + "".join(str(k) for k in folds)
    return slug


def _check_part(cfg: Config, b, members: list[str] | None, folds: list[int] | None, attach: list[str]) -> None:
    """Print the kernel's line(s) of the plan (`sessions.split_inference`) and refuse one that cannot end within a
    session, naming the parts that fit; a kernel that only combines attached parts is not checked."""
    from . import sessions

    member_cfgs = {m["name"]: b.member_config(m) for m in b.info["members"]}
    all_folds = sorted({k for m in b.info["members"] for k in m["folds"]})
    chosen = [c for name, c in member_cfgs.items() if members is None or name in members]
    parts = sessions.split_inference(chosen, folds if folds is not None else all_folds)
    for part in parts:
        log.info(f"plan: {part.describe()}")
    if len(parts) == 1:
        return
    names = list(member_cfgs)
    steps = "; ".join(
        f'make kernel-push CONFIG={cfg.name} MEMBERS="{" ".join(p.members)}" FOLDS="{" ".join(map(str, p.folds))}" '
        f"SLUG={part_slug(cfg, names, p.members, p.folds)}"
        for p in parts
    )
    slugs = " ".join(part_slug(cfg, names, p.members, p.folds) for p in parts)
    if attach and members is None and folds is None:
        log.info(f"plan: this kernel predicts what the attached outputs lack ({' '.join(attach)}); parts: {steps}")
        return
    raise UserError(
        f"the inference kernel of {cfg.name} needs {sum(p.hours for p in parts):.1f} h, more than one "
        f"{sessions.SESSION_LIMIT_H:.0f}-hour session; push it in parts ({steps}), then combine them: "
        f'make kernel-push CONFIG={cfg.name} ATTACH="{slugs}" (or make kernel-finish OUTPUTS="{slugs}")'
    )


def build_kernel(
    cfg: Config,
    runs: str | Path = "runs",
    out: str | Path = "kernels",
    username: str | None = None,
    slug: str | None = None,
    members: list[str] | None = None,
    folds: list[int] | None = None,
    attach: list[str] = (),
    resume: bool = False,
) -> Path:
    """`make kernel`: kernels/<slug>/ with kernel-metadata.json and the script, after checking everything it needs.

    `members`/`folds`: a part kernel that predicts only those (its default slug says which); `attach`: slugs of
    kernels whose outputs (per-fold predictions) it adopts, e.g. the parts, for a last kernel that combines them;
    `resume`: attach this kernel's own previous output (a cut session resumes from its finished folds)."""
    from .. import bundle

    user = check_username(username)
    names = names_for(cfg, user, slug)  # a bad slug or user name: one line before anything is read
    fix = f"run `make kernel-datasets CONFIG={cfg.name} KAGGLE_USERNAME={names.username}` first"
    for folder, expected in ((names.code_dir(out), names.code_id), (names.model_dir(out), names.model_id)):
        found = _read_dataset_id(folder, fix)
        if found != expected:
            raise UserError(f"{folder / DATASET_META} has id '{found}', expected '{expected}'; {fix}")
    if not any(names.code_dir(out).glob("ich_kaggle-*.whl")):
        raise UserError(f"{names.code_dir(out)} holds no ich_kaggle wheel; {fix}")
    try:
        b = bundle.load(names.model_dir(out))  # format, files, checksums: what the kernel will check too
    except UserError as e:
        raise UserError(f"{e} ({fix})") from None
    member_names = [m["name"] for m in b.info["members"]]
    unknown = [m for m in members or [] if m not in member_names]
    if unknown:
        raise UserError(f"MEMBERS {unknown} are not in {names.model_dir(out)} (it holds {member_names}); fix MEMBERS")
    bundle_folds = sorted({k for m in b.info["members"] for k in m["folds"]})
    if folds is not None and not set(folds) <= set(bundle_folds):
        raise UserError(f"FOLDS {folds} are not all in {names.model_dir(out)} (it holds folds {bundle_folds})")
    names = names_for(cfg, user, slug or (part_slug(cfg, member_names, members, folds) if members or folds else None))
    _check_part(cfg, b, members, folds, list(attach))
    _warn_if_stale(runs, names.model_dir(out), b)

    script = embed_install(
        TEMPLATE.read_text(),
        {
            "CONFIG_NAME": cfg.name,
            "CODE_DATASET": names.code_id,
            "MODEL_DATASET": names.model_id,
            "ICH_KAGGLE_VERSION": __version__,
        },
    )
    part = {"members": list(members) if members else None, "folds": list(folds) if folds is not None else None}
    script, n = _PART_LINE.subn(f"PART = {part!r}  # __PART__: written by build.build_kernel", script)
    if n != 1:
        raise RuntimeError("the inference kernel template needs exactly one 'PART = ...  # __PART__' line")
    compile(script, KERNEL_FILE, "exec")
    from . import weights_dataset

    # the inference kernel loads its checkpoints (no ImageNet weights): the weights dataset rides along when built
    weights = weights_dataset.attach([], names.username, out, required=False)
    sources = [f"{user}/{check_slug(a)}" for a in attach] + ([names.kernel_id] if resume else [])
    folder = metadata.write_kernel(
        names.kernel_dir(out),
        names.kernel_id,
        script,
        gpu=True,
        datasets=[names.code_id, names.model_id, *weights],
        kernel_sources=sources,
    )
    log.info(f"wrote {folder} ({names.kernel_id}); push with: kaggle kernels push -p {folder}")
    return folder


def fetch_outputs(username: str | None, slugs: list[str], out: str | Path = "kernels") -> list[Path]:
    """`make kernel-finish OUTPUTS=<slugs>`: each kernel's whole output (its fold predictions; a part kernel has no
    submission.csv, which `make kernel-output` requires) into kernels/output/<slug>/."""
    from . import api

    if not slugs:  # only local folders: no credentials needed
        return []
    user = check_username(username)
    client = api.client()
    folders = []
    for slug in slugs:
        dest = Path(out) / "output" / check_slug(slug)
        if dest.exists():
            shutil.rmtree(dest)  # never mistake an earlier run's files for this one's
        dest.mkdir(parents=True)
        api.call(
            f"output of kernel {user}/{slug}",
            lambda: client.kernels_output(f"{user}/{slug}", str(dest), force=True),
            fix="check KAGGLE_USERNAME and the slug, and that the run ended (make kernel-status)",
        )
        folders.append(dest)
    return folders
