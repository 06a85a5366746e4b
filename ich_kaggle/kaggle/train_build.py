"""Training on Kaggle, on this side: the prepare and training kernel folders, the wall-time estimate and the plan
that splits a fold too long for one session into resuming versions, fetching a trained fold into runs/, and the state
of every pushed kernel.

The GPU-less path: `make kernel-code` (upload the code dataset) -> `make kernel-prepare` (meta.csv + folds.csv on
Kaggle, once) -> `make kernel-train fold=N` per fold -> `make kernel-fetch fold=N` (local predict/stack/submit) or
`make kernel-from-folds` (the inference kernel on the training kernels' outputs). Kernel folders are written with
`build.py`'s helpers and pushed through `api.py`.
"""

from __future__ import annotations

import logging
import json
import shutil
from pathlib import Path

import yaml

from .. import __version__
from ..core.config import Config, CVConfig
from ..core.errors import UserError
from ..core.io import atomic_open
from ..core.layout import Layout, Run
from . import build
from .run import slugify
from .train_run import FOLD_MANIFEST, PREPARE_MANIFEST, PREPARED_FILES

log = logging.getLogger(__name__)

TRAIN_TEMPLATE = Path(__file__).with_name("train_template.py")
PREPARE_SLUG = "ich-kaggle-prepare"
# The time on Kaggle of a fold (estimate, plan of versions) lives in sessions.py; named here for the callers.
from .sessions import (  # noqa: E402,F401
    CACHE_IMAGES_PER_S,
    COMPETITION_TRAIN_IMAGES,
    KAGGLE_SCRATCH_BYTES,
    SESSION_LIMIT_H,
    SESSION_MARGIN_H,
    Estimate,
    Plan,
    estimate,
    expected_source,
    plan,
)


# --- kernel folders -----------------------------------------------------------------------------------------------
def prepare_id(username: str) -> str:
    return f"{username}/{PREPARE_SLUG}"


def train_slug(cfg_name: str, fold: int) -> str:
    return build.check_slug(f"ich-kaggle-{slugify(cfg_name)}-fold{int(fold)}", fix="use a config with a shorter name")


def _script(values: dict) -> str:
    script = build.embed_install(
        TRAIN_TEMPLATE.read_text(),
        {
            "CODE_DATASET": f"{values['username']}/{build.CODE_SLUG}",
            "MODEL_DATASET": "",
            "CONFIG_NAME": values["config_name"],
            "ICH_KAGGLE_VERSION": __version__,
        },
    )
    for key in ("MODE", "FOLD", "FOLDS", "K", "SEED", "CONFIG_YAML", "EPOCHS_PER_RUN"):
        script = script.replace(f'"__{key}__"', repr(values.get(key.lower())))
    compile(script, "kernel.py", "exec")
    return script


def _write_kernel(
    folder: Path, kernel_id: str, script: str, gpu: bool, kernel_sources: list[str], datasets: list[str] = ()
) -> Path:
    from . import metadata

    user = kernel_id.split("/")[0]
    return metadata.write_kernel(
        folder,
        kernel_id,
        script,
        gpu=gpu,
        datasets=[f"{user}/{build.CODE_SLUG}", *datasets],
        kernel_sources=kernel_sources,
    )


def members_of(cfg: Config) -> list[Config]:
    """An ensemble's member configs (each trains in its own kernels), or [cfg]."""
    from ..core import ensemble

    return ensemble.load_members(cfg) if cfg.is_ensemble else [cfg]


def build_prepare_kernel(
    username: str | None, out: str | Path = "kernels", k: int = CVConfig.k, seed: int = CVConfig.seed
) -> Path:
    """kernels/ich-kaggle-prepare/: scans the competition's headers on Kaggle (CPU only), writes meta + folds."""
    user = build.check_username(username)
    script = _script({"username": user, "config_name": "", "mode": "prepare", "k": int(k), "seed": int(seed)})
    folder = _write_kernel(Path(out) / PREPARE_SLUG, prepare_id(user), script, gpu=False, kernel_sources=[])
    log.info(f"wrote {folder} ({prepare_id(user)}, k={k}, seed={seed})")
    return folder


def build_train_kernel(
    cfg: Config,
    fold: int,
    username: str | None,
    out: str | Path = "kernels",
    resume: bool = False,
    epochs_per_run: int | None = None,
    folds_csv: Path | None = None,
    t4_images_per_s: float | None = None,
    members: list[Config] | None = None,
) -> list[Path]:
    """kernels/ich-kaggle-<config>-fold<N>/: trains one fold on T4 x2; an ensemble writes one such kernel per member
    (each its own config, estimate and plan). Prints each kernel's line of the plan: one version, or several of
    EPOCHS_PER_RUN epochs each where the fold is longer than a session (refused only where one version cannot end
    an epoch). `resume` attaches this kernel's own output (its previous version). Refused before anything is
    written when the weights dataset lacks an ImageNet file a member starts from."""
    from ..core.config import selected_folds
    from . import weights_dataset

    user = build.check_username(username)
    selected_folds(cfg.cv, fold)
    members = members or members_of(cfg)  # the CLI's: with its --set overrides
    weights = weights_dataset.attach(members, user, out)
    planned = []
    for member in members:
        est = estimate(member, None, folds_csv, t4_images_per_s)
        steps = plan(est, member, epochs_per_run)
        planned.append((member, est, steps))
    folders = []
    for member, est, steps in planned:
        log.info(f"plan: train {member.name} fold {fold}: {est.describe()}; {steps.describe(fold)}")
        slug = train_slug(member.name, fold)
        data = member.to_dict()
        data["augment"]["crop_scale"] = list(data["augment"]["crop_scale"])
        values = {
            "username": user,
            "config_name": member.name,
            "mode": "train",
            "fold": int(fold),
            "k": member.cv.k,
            "seed": member.cv.seed,
            "config_yaml": yaml.safe_dump(data, sort_keys=False),
            "epochs_per_run": steps.epochs_per_run,
        }
        kernel_id = f"{user}/{slug}"
        sources = [prepare_id(user)] + ([kernel_id] if resume else [])
        folder = _write_kernel(
            Path(out) / slug, kernel_id, _script(values), gpu=True, kernel_sources=sources, datasets=weights
        )
        log.info(f"wrote {folder} ({kernel_id}{', resuming from its previous output' if resume else ''})")
        folders.append(folder)
    return folders


def infer_slug(cfg_name: str) -> str:
    return build.check_slug(f"ich-kaggle-{slugify(cfg_name)}-from-folds", fix="use a config with a shorter name")


def build_infer_kernel(
    cfg: Config,
    username: str | None,
    out: str | Path = "kernels",
    folds: list[int] | None = None,
    members: list[Config] | None = None,
    resume: bool = False,
) -> list[Path]:
    """kernels/ich-kaggle-<config>-from-folds/: the inference kernel on the training kernels' outputs (attached as
    kernel sources, no model dataset; an ensemble's every member's): TTA over their folds, first stage only,
    submission.csv. Prints its line of the plan. An ensemble whose inference cannot end within one session gets one
    such kernel per member (their submissions are combined here: make kernel-combine); a member whose folds alone
    take longer than a session is refused, naming the FOLDS that fit. `resume`: each kernel attaches its own
    previous output and adopts the fold predictions a cut session kept."""
    from ..core.config import selected_folds
    from . import sessions

    user = build.check_username(username)
    folds = selected_folds(cfg.cv) if folds is None else [selected_folds(cfg.cv, k)[0] for k in folds]
    members = members or members_of(cfg)
    kernels = sessions.split_inference(members, folds)
    for k in kernels:
        log.info(f"plan: {k.describe()}")
    if len(kernels) == 1:
        return [_infer_kernel(cfg, members, user, out, folds, resume)]
    split_folds = [k for k in kernels if k.folds != folds]
    if split_folds or not cfg.is_ensemble:
        part = split_folds[0] if split_folds else kernels[0]
        whole = sum(k.hours for k in kernels)
        raise UserError(
            f"the inference kernel of '{part.members[0]}' over folds {folds} needs about {whole:.1f} h, "
            f"more than one {SESSION_LIMIT_H:.0f}-hour session; push it in parts that fit (make kaggle-plan "
            f"CONFIG={cfg.name} shows them), e.g. make kernel-from-folds CONFIG={part.members[0]} "
            f'FOLDS="{" ".join(map(str, part.folds))}"'
        )
    log.info(
        f"plan: the inference of '{cfg.name}' is longer than one session: one kernel per member; combine their "
        f"submissions with make kernel-combine CONFIG={cfg.name} once they are complete"
    )
    return [_infer_kernel(m, [m], user, out, folds, resume) for m in members]


def _infer_kernel(
    cfg: Config, members: list[Config], user: str, out: str | Path, folds: list[int], resume: bool = False
) -> Path:
    from . import weights_dataset

    slug = infer_slug(cfg.name)
    sources = [prepare_id(user)] + [f"{user}/{train_slug(m.name, k)}" for m in members for k in folds]
    sources += [f"{user}/{slug}"] if resume else []
    data = cfg.to_dict()
    if "augment" in data:
        data["augment"]["crop_scale"] = list(data["augment"]["crop_scale"])
    script = _script(
        {
            "username": user,
            "config_name": cfg.name,
            "mode": "infer",
            "folds": folds,
            "config_yaml": yaml.safe_dump(data, sort_keys=False),
        }
    )
    weights = weights_dataset.attach([], user, out, required=False)
    folder = _write_kernel(
        Path(out) / slug, f"{user}/{slug}", script, gpu=True, kernel_sources=sources, datasets=weights
    )
    log.info(
        f"wrote {folder} ({user}/{slug}: folds {folds} of {', '.join(m.name for m in members)} from their "
        f"training kernels{'; resuming from its previous output' if resume else ''})"
    )
    return folder


def combine_outputs(
    cfg: Config,
    username: str | None,
    out: str | Path = "kernels",
    fetch: bool = True,
    members: list[Config] | None = None,
) -> Path:
    """`make kernel-combine`: an ensemble's submission from its members' from-folds kernels (each fetched into
    kernels/output/<slug>/), combined as `ensemble.combine` says, into kernels/output/ich-kaggle-<ensemble>-from-folds/
    submission.csv (the members' 6-decimal probabilities combined: within 1e-6 of one kernel over all members)."""
    import numpy as np
    import pandas as pd

    from ..core import ensemble
    from ..core.labels import LABELS
    from . import api

    if not cfg.is_ensemble:
        raise UserError(f"'{cfg.name}' is not an ensemble; its from-folds kernel writes the submission itself")
    user = build.check_username(username)
    frames = []
    for member in members or members_of(cfg):
        slug = infer_slug(member.name)
        path = Path(out) / "output" / slug / api.SUBMISSION
        if fetch:
            path = api.fetch_output(f"{user}/{slug}", path.parent)
        api.check_submission(path)
        long = pd.read_csv(path, dtype={"ID": str})
        parts = long["ID"].str.rsplit("_", n=1)
        wide = (
            long.assign(image_id=parts.str[0], label=parts.str[1])
            .pivot(index="image_id", columns="label", values="Label")[list(LABELS)]
            .reset_index()
        )
        frames.append(wide)
    combined = ensemble.combine(frames, cfg.ensemble)
    rows = combined.melt(id_vars="image_id", value_vars=list(LABELS), var_name="label", value_name="Label")
    rows["ID"] = rows["image_id"] + "_" + rows["label"]
    order = {label: i for i, label in enumerate(LABELS)}
    rows = rows.assign(o=rows["label"].map(order)).sort_values(["image_id", "o"])
    dest = Path(out) / "output" / infer_slug(cfg.name) / api.SUBMISSION
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(dest) as f:
        f.write("ID,Label\n" + "".join(f"{i},{p:.6f}\n" for i, p in zip(rows["ID"], np.asarray(rows["Label"]))))
    api.check_submission(dest)
    log.info(
        f"wrote {dest}: {len(frames)} members' submissions combined ({cfg.ensemble.combine}); send it with "
        f"make kernel-submit CONFIG={cfg.name} SLUG={infer_slug(cfg.name)}"
    )
    return dest


def build_code_only(username: str | None, out: str | Path = "kernels") -> Path:
    """kernels/ich-kaggle-code/ alone (training needs no model dataset)."""
    names = build.KernelNames(build.check_username(username), "code", "ich-kaggle-code")
    return build.build_code_dataset(names, out)


# --- after the run ------------------------------------------------------------------------------------------------
def install_fold(downloaded: Path, cfg_name: str, fold: int, runs: str | Path) -> Path:
    """Move a fetched kernel output's runs/<config>/fold<N>/ into the local runs folder, manifest checked."""
    found = [p.parent for p in downloaded.rglob(FOLD_MANIFEST) if p.parent.parts[-2:] == (cfg_name, f"fold{int(fold)}")]
    if not found:
        raise UserError(
            f"no runs/{cfg_name}/fold{fold}/{FOLD_MANIFEST} in the kernel's output ({downloaded}); did "
            f"its run finish? read its log there, or make kernel-status"
        )
    manifest = json.loads((found[0] / FOLD_MANIFEST).read_text())
    missing = [n for n in manifest["files"] if not (found[0] / n).is_file()]
    if missing:
        raise UserError(
            f"{found[0]} lacks {', '.join(missing)} listed in {FOLD_MANIFEST}; fetch again (make kernel-fetch)"
        )
    dest = Run.of(runs, cfg_name).fold(fold).dir
    dest.mkdir(parents=True, exist_ok=True)
    for name in manifest["files"] + [FOLD_MANIFEST]:
        shutil.copy2(found[0] / name, dest / name)
    state = "finished" if manifest.get("done") else "not finished yet (push again with RESUME=1)"
    log.info(f"fetched fold {fold} of {cfg_name} into {dest}: {', '.join(manifest['files'])}; {state}")
    return dest


def fetch_fold(
    cfg_name: str, fold: int, username: str | None, runs: str | Path = "runs", out: str | Path = "kernels"
) -> Path:
    from . import api

    user = build.check_username(username)
    slug = train_slug(cfg_name, fold)
    dest = Path(out) / "output" / slug
    if dest.exists():
        shutil.rmtree(dest)  # never mistake an earlier run's files for this one's
    dest.mkdir(parents=True)
    client = api.client()
    api.call(
        f"output of kernel {user}/{slug}",
        lambda: client.kernels_output(f"{user}/{slug}", str(dest), force=True),
        fix="check KAGGLE_USERNAME, CONFIG and fold, and that the run ended (make kernel-status)",
    )
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
    api.call(
        f"output of kernel {prepare_id(user)}",
        lambda: client.kernels_output(prepare_id(user), str(dest), force=True),
        fix="push it first (make kernel-prepare) and wait until it is complete (make kernel-status)",
    )
    found = [p.parent for p in dest.rglob(PREPARE_MANIFEST)]
    missing = [n for n in PREPARED_FILES if not found or not (found[0] / n).is_file()]
    if missing:
        raise UserError(
            f"the output of {prepare_id(user)} in {dest} lacks {', '.join(missing)}; did its run finish "
            f"(make kernel-status)? read its log there"
        )
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
        raise UserError(
            f"no kernel folder of {user} under {out}/; write one first (make kernel-prepare, make kernel-train)"
        )
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


# --- measuring the rates on Kaggle's T4 x2 -------------------------------------------------------------------------
GPU_CHECK_SLUG = "ich-kaggle-gpu-check"
RATES_OUTPUT = "rates.yaml"


def shipped_rate_pairs() -> list[tuple[str, int, int]]:
    """(backbone, image size, input channels) of every shipped config that trains on a GPU."""
    from . import weights_dataset

    pairs = {}
    for cfg in weights_dataset.shipped_configs():
        if cfg.model.backbone == "small_cnn" or cfg.data.image_size < 128:
            continue  # the CPU-sized configs
        for name in cfg.model.backbone.split("+"):
            pairs.setdefault((name, cfg.data.image_size), cfg.data.in_channels)
    return [(b, s, c) for (b, s), c in sorted(pairs.items())]


def build_gpu_check_kernel(username: str | None, out: str | Path = "kernels") -> Path:
    """kernels/ich-kaggle-gpu-check/: on T4 x2, measures the training and inference images/s of one T4 for every
    shipped backbone and size (random weights and inputs: a few minutes of GPU) into rates.yaml in its output,
    which `make kernel-gpu-check-fetch` turns into kaggle_rates.yaml for `make kaggle-plan`."""
    user = build.check_username(username)
    pairs = shipped_rate_pairs()
    script = _script({"username": user, "config_name": "", "mode": "gpu-check", "folds": [list(p) for p in pairs]})
    folder = _write_kernel(Path(out) / GPU_CHECK_SLUG, f"{user}/{GPU_CHECK_SLUG}", script, gpu=True, kernel_sources=[])
    log.info(f"wrote {folder} ({user}/{GPU_CHECK_SLUG}: {len(pairs)} backbone/size pairs, a few minutes on T4 x2)")
    return folder


def run_gpu_check(pairs: list[list], working: str | Path) -> Path:
    """Inside the GPU-check kernel: rates.yaml (backbone -> size -> {train, infer, ...}) in the working folder,
    written after each pair so a cut session keeps what it measured."""
    from . import rates

    out = Path(working) / RATES_OUTPUT
    measured: dict[str, dict[int, dict]] = rates.measured_rates(out)
    for backbone, size, channels in pairs:
        if size in measured.get(backbone, {}):
            continue
        try:
            measured.setdefault(backbone, {})[int(size)] = rates.measure(backbone, int(size), int(channels))
        except Exception as e:  # one backbone that does not fit never sinks the others
            log.warning(f"gpu-check: {backbone} at {size} px failed: {type(e).__name__}: {e}")
            continue
        log.info(f"gpu-check: {backbone} at {size} px: {measured[backbone][int(size)]}")
        with atomic_open(out) as f:
            yaml.safe_dump(measured, f, sort_keys=True)
    return out


def fetch_rates(username: str | None, out: str | Path = "kernels", rates_file: str | Path | None = None) -> Path:
    """The GPU-check kernel's rates.yaml into kaggle_rates.yaml (merged over what is there), for `make kaggle-plan`."""
    from . import api, rates

    user = build.check_username(username)
    dest = Path(out) / "output" / GPU_CHECK_SLUG
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    client = api.client()
    kid = f"{user}/{GPU_CHECK_SLUG}"
    api.call(
        f"output of kernel {kid}",
        lambda: client.kernels_output(kid, str(dest), force=True),
        fix="push it first (make kernel-gpu-check) and wait until it is complete (make kernel-status)",
    )
    found = sorted(dest.rglob(RATES_OUTPUT))
    if not found:
        raise UserError(f"the output of {kid} in {dest} holds no {RATES_OUTPUT}; read its log there")
    target = Path(rates_file) if rates_file else rates.rates_path()
    merged = rates.measured_rates(target)
    for backbone, sizes in rates.measured_rates(found[0]).items():
        merged.setdefault(backbone, {}).update(sizes)
    with atomic_open(target) as f:
        f.write(
            f"# Measured by make kernel-gpu-check ({kid}): images/s of one T4; make kaggle-plan reads it. Commit it.\n"
        )
        yaml.safe_dump(merged, f, sort_keys=True)
    log.info(f"wrote {target}: {sum(len(v) for v in merged.values())} measured backbone/size pair(s)")
    return target
