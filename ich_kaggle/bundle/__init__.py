"""The model bundle: one self-contained folder holding everything `infer` needs to run the pipeline `submit` chose.

    <bundle>/bundle.json                       format, what made it, the stage, thresholds, OOF scores, checksums
    <bundle>/config.yaml                       the resolved config (or ensemble) exported
    <bundle>/members/<member>/config.yaml      each first-stage model's resolved config
    <bundle>/members/<member>/fold<k>.pt       each finished fold's weights (model + config; float16 with --fp16)
    <bundle>/members/<member>/fold<k>_pca.npz  each fold model's embedding projection (per_fold embedding stack only)
    <bundle>/stack/models.pt                   the fitted probability-level stack (when the stage runs it)
    <bundle>/stack_embeddings/models.pt        the fitted embedding-level stack (when the stage runs it)

The stage is the one `submit` chose by OOF (`submit.choose_stage`; `export --stage` picks another fresh one): the
first stage, a second stage, or the blend, whose parts (the second stages, or the first stage and the one second
stage) are all bundled and averaged by `infer` as submit averaged them.

Why a folder and a JSON index: it copies, zips and uploads as is (the Kaggle model dataset is this folder), and
`load` can say in one line what is missing or edited before any weight is read. Export refuses what `submit` would
refuse: an unfinished fold, stale predictions or a stale stack, and a second stage whose models were not saved.

Thresholds (per subtype, at slice and at series level) are fixed here, from the chosen stage's OOF predictions
against the training labels: the threshold of best F1 (ties: the lowest). They are never tuned on external data.
"""

from __future__ import annotations

import logging
import hashlib
import json
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import config as C
from ..core import ensemble as E
from ..core import freshness, manifest
from ..core.config import Config, selected_folds
from ..core.errors import UserError
from ..core.io import atomic_open
from ..core.labels import LABELS
from ..core.layout import Layout, Run

log = logging.getLogger(__name__)

FORMAT = 2  # 2: every stage submit chooses (embedding stack, blend); 1 held first stage or stack
INDEX = "bundle.json"
BLEND_RULE = "mean of the parts' probabilities (submit.choose: no weights fitted on OOF)"
PACKAGES = ("torch", "timm", "numpy", "pandas", "pydicom", "albumentations", "opencv-python-headless", "scikit-learn")


# --- thresholds from OOF ---


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold of best F1 on (y, p) (predict positive when p >= t); 0.5 without positives."""
    y = np.asarray(y, dtype=np.float64) > 0.5
    p = np.asarray(p, dtype=np.float64)
    if not y.any() or y.all():
        return 0.5
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(~ys)
    f1 = 2 * tp / (tp + fp + y.sum())
    last = np.r_[ps[1:] != ps[:-1], True]  # a threshold sits at the last of equal probabilities
    i = int(np.argmax(np.where(last, f1, -1)))
    return float(ps[i])


def oof_thresholds(oof: pd.DataFrame, truth: pd.DataFrame, meta: pd.DataFrame | None) -> dict:
    """{"slice": {label: t}, "series": {label: t}} from the chosen stage's OOF; a series' probability is the max
    over its slices, its label the max of its slices' labels."""
    cols = list(LABELS)
    both = oof.merge(truth[["image_id", *cols]], on="image_id", suffixes=("", "_y"))
    out = {"slice": {c: best_f1_threshold(both[f"{c}_y"], both[c]) for c in cols}, "series": {}}
    if meta is not None and "series_id" in meta:
        s = both.merge(meta[["image_id", "series_id"]].drop_duplicates("image_id"), on="image_id")
        g = s.groupby("series_id")[[*cols, *[f"{c}_y" for c in cols]]].max()
        out["series"] = {c: best_f1_threshold(g[f"{c}_y"], g[c]) for c in cols}
    else:
        out["series"] = dict(out["slice"])
    out["rule"] = "best F1 on the chosen stage's OOF predictions (series: max over slices)"
    out["n_oof_images"] = int(len(both))
    return out


# --- files ---


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _code_version() -> dict:
    from .. import __version__

    out = {"ich_kaggle": __version__}
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _packages() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _dump_yaml(data: dict, path: Path) -> None:
    import yaml

    data = json.loads(json.dumps(data, default=list))  # tuples -> lists
    with atomic_open(path) as f:
        yaml.safe_dump(data, f, sort_keys=False)


def _write_checkpoint(src: Path, dst: Path, fp16: bool) -> None:
    """The fold's weights and config only (no optimizer state); float16 weights with fp16 (loaded back as float32)."""
    import torch

    from ..models.checkpoint import read_checkpoint, save_checkpoint

    ckpt = read_checkpoint(src)
    state = ckpt["model"]
    if fp16:
        state = {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
    save_checkpoint(dst, {"model": state, "config": ckpt["config"], "num_classes": ckpt.get("num_classes", 6)})


# --- export ---


SECOND_STAGES = {"stacked": "stack", "stacked_embeddings": "stack_embeddings"}  # stage -> its folder in the bundle


def stage_files(run: Run, stage: str):
    """The run's folder of a stage `submit` can choose (test.csv, oof.csv; a second stage's models.pt)."""
    return {
        "first_stage": run.predictions,
        "stacked": run.stack,
        "stacked_embeddings": run.embedding_stack,
        "blend": run.blend,
    }[stage]


def blend_parts(candidates: list[str]) -> list[str]:
    """The stages submit's blend averaged, from the candidates it compared (`submit.choose.blend_parts`)."""
    from ..submit.choose import Stage, blend_parts as parts

    return [s.name for s in parts([Stage(n, Path(), Path()) for n in candidates if n != "blend"])]


def _saved_stage(cfg: Config, run: Run, stage: str):
    """The saved second stage `stage` of `run`, loaded; one line when it is missing or older than its predictions."""
    from ..stack import saved

    files = stage_files(run, stage)
    if freshness.stale_reason(files.models, manifest.read(files.test) or {}) is not None:
        raise UserError(
            f"{files.models} is missing or older than {files.test}: the {stage.replace('_', ' ')} stage's fitted "
            f"models were not saved; run `make stack CONFIG={cfg.name} FORCE=1` to fit and save them, then export"
        )
    return saved.load(files.models)


def export(
    cfg: Config,
    runs: str | Path,
    out: str | Path,
    fp16: bool = False,
    layout: Layout | None = None,
    members: list[Config] | None = None,
    stage: str | None = None,
) -> Path:
    """Write the bundle of `cfg` (a config or an ensemble) trained under `runs` into the folder `out`.

    `layout`: the data folder the runs were trained on (its labels choose the stage and the thresholds).
    `stage`: bundle this stage instead of the one `submit` chooses (first_stage, stacked, stacked_embeddings or
    blend); it must be one of the fresh stages submit compared. Everything is checked before anything is written;
    the folder is built beside `out` and renamed into place."""
    from ..submit.choose import STAGES

    if stage is not None and stage not in STAGES:
        raise UserError(f"--stage {stage}: unknown stage; one of {', '.join(STAGES)}")
    if layout is None:
        raise UserError("export needs the competition folder the runs were trained on (--data)")
    out, runs = Path(out), Path(runs)
    members = members if members is not None else (E.load_members(cfg) if cfg.is_ensemble else [cfg])
    run = Run.of(runs, cfg.name)
    made_from: dict = {}
    finished = _finished_members(cfg, members, runs, made_from)
    chosen = _chosen_stage(cfg, layout, run, stage, len(members), made_from)
    projected = _projections_needed(cfg, chosen.fitted, finished)
    thresholds, scores = _oof_scores(layout, chosen.files(run).oof)

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _dump_yaml(cfg.to_dict(), tmp / "config.yaml")
    entries = _write_members(tmp, finished, projected, fp16)
    second = _write_second_stages(tmp, run, chosen.fitted)
    files = {
        str(p.relative_to(tmp)): {"sha256": sha256(p), "bytes": p.stat().st_size}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    index = {
        "format": FORMAT,
        "name": cfg.name,
        "kind": "ensemble" if cfg.is_ensemble else "config",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stage": chosen.stage,
        "submit_stage": chosen.submitted,  # what `make submit` sent (export --stage may bundle another fresh stage)
        "stage_files": {"test": str(chosen.files(run).test), "oof": str(chosen.files(run).oof)},
        "oof_log_loss_by_stage": chosen.losses,
        "oof_scores": scores,
        "members": entries,
        "ensemble": (
            {"combine": cfg.ensemble.combine, "weights": E.weights(cfg.ensemble, len(members)).tolist()}
            if cfg.is_ensemble
            else None
        ),
        "second_stages": second,  # the saved second stages the stage runs (the blend's parts: each of them)
        "blend": ({"parts": chosen.parts, "rule": BLEND_RULE} if chosen.stage == "blend" else None),
        "labels": list(LABELS),
        "thresholds": thresholds,
        "series_probability": "max over the series' slices of the chosen stage's slice probabilities",
        "float16": bool(fp16),
        "made_from": made_from,
        "code": _code_version(),
        "packages": _packages(),
        "files": files,
    }
    with atomic_open(tmp / INDEX) as f:
        json.dump(index, f, indent=1)
    _publish(tmp, out)
    size = sum(v["bytes"] for v in files.values())
    log.info(
        f"export: {cfg.name} ({chosen.stage}, {sum(len(e['folds']) for e in entries)} fold model(s), "
        f"{size / 2**20:.1f} MB) -> {out}"
    )
    return out


def _finished_members(cfg: Config, members: list[Config], runs: Path, made_from: dict) -> list[tuple]:
    """(member, its run, its finished folds) per member; refuses an unfinished fold or stale predictions. Records
    each member's prediction manifest digest in `made_from`."""
    out = []
    for member in members:
        mrun = Run.of(runs, member.name)
        wanted = selected_folds(member.cv)
        finished = mrun.finished(wanted)
        unfinished = [k for k in wanted if mrun.fold(k).best.exists() and k not in finished]
        if unfinished:
            raise UserError(
                f"fold(s) {unfinished} of {member.name} did not finish training (no done.json in "
                f"{mrun.fold(unfinished[0]).dir}); finish them (`make train FOLD={unfinished[0]} "
                f"CONFIG={member.name}`) or export after `make predict FINISH=1`"
            )
        if not finished:
            raise UserError(f"no finished fold under {mrun.dir}; run `make train-all CONFIG={member.name}` first")
        stale = freshness.stale_reason(mrun.predictions.test, freshness.predictions(mrun, finished, member.tta))
        if stale:
            raise UserError(
                f"{mrun.predictions.test} is stale or missing ({stale}); run `make predict "
                f"CONFIG={cfg.name}` (then `make submit`) before exporting"
            )
        out.append((member, mrun, finished))
        made_from[f"{member.name}/predictions"] = manifest.digest(
            [json.dumps(manifest.read(mrun.predictions.test), sort_keys=True)]
        )
    return out


@dataclass
class _Chosen:
    """The stage a bundle holds: what submit sent, what it compared, and the saved second stages the stage runs."""

    stage: str
    submitted: str
    losses: dict
    parts: list[str]
    fitted: dict = field(default_factory=dict)  # second stage name -> its saved models (`stack.saved`)

    def files(self, run: Run):
        return stage_files(run, self.stage)


def _chosen_stage(cfg: Config, layout: Layout, run: Run, stage: str | None, n_members: int, made_from: dict):
    """Submit's choice (or the asked fresh stage) and its saved second stages, checked against the members."""
    from ..submit.stage import choose_stage

    choose_stage(cfg, layout, run)  # refuses a stale first stage; a stale stack is not a candidate
    choice = json.loads(run.choice.read_text())
    submitted = choice["stage"]
    candidates = choice.get("candidates") or [submitted]
    stage = stage or submitted
    if stage not in candidates:
        raise UserError(
            f"--stage {stage}: not among the fresh stages submit compared ({', '.join(candidates)}); "
            f"run `make stack CONFIG={cfg.name}` (then `make submit`) to fit it, or export another stage"
        )
    if stage != submitted:
        log.info(f"export: bundling the {stage.replace('_', ' ')} as asked (submit chose the {submitted})")
    parts = blend_parts(candidates) if stage == "blend" else [stage]
    fitted = {p: _saved_stage(cfg, run, p) for p in parts if p in SECOND_STAGES}
    for p, saved_stage in fitted.items():
        if saved_stage.n_models != n_members:  # stack.sources: first-stage models from outside this experiment
            raise UserError(
                f"{stage_files(run, p).models}: the {p.replace('_', ' ')} stage was fitted on "
                f"{saved_stage.n_models} first-stage source(s), the bundle holds {n_members} member(s) "
                f"(stack.sources?); export a stage without it (--stage first_stage) or stack the members only"
            )
        made_from[p] = manifest.digest([json.dumps(manifest.read(stage_files(run, p).test), sort_keys=True)])
    return _Chosen(stage, submitted, choice.get("oof_log_loss", {}), parts, fitted)


def _projections_needed(cfg: Config, fitted: dict, finished: list[tuple]) -> list[int]:
    """The fold models whose compact-embedding projection goes beside their weights (per_fold embedding stages read
    each fold model's own); refuses a member that lacks one."""
    projected = sorted({k for s in fitted.values() if s.layout == "per_fold" for k in s.fold_models})
    for member, mrun, folds in finished:
        lacking = [k for k in projected if k not in folds or not mrun.predictions.fold_projection(k).exists()]
        if lacking:
            raise UserError(
                f"{mrun.predictions.fold_projection(lacking[0])} not found (or fold {lacking[0]} of {member.name} "
                f"not finished): the embedding stack reads it; run `make predict CONFIG={cfg.name}` then "
                f"`make stack CONFIG={cfg.name}`"
            )
    return projected


def _oof_scores(layout: Layout, oof_path: Path) -> tuple[dict | None, dict | None]:
    """(thresholds, OOF scores) of the chosen stage against the training labels; (None, None) without labels."""
    from ..core.metrics import read_long_or_wide, read_truth, score_frames
    from ..data.meta import load_meta

    if not layout.train_csv.exists():
        return None, None
    truth = read_truth(layout.train_csv)
    oof = read_long_or_wide(oof_path)
    thresholds = oof_thresholds(oof, truth, load_meta(layout))
    t = truth[truth["image_id"].isin(oof["image_id"])]
    scores = score_frames(t, oof[oof["image_id"].isin(t["image_id"])])
    return thresholds, {
        "weighted_log_loss": float(scores["weighted_log_loss"]),
        "per_label": {k: float(v) for k, v in scores["per_label"].items()},
        "n_images": int(len(t)),
    }


def _write_members(tmp: Path, finished: list[tuple], projected: list[int], fp16: bool) -> list[dict]:
    """Each member's config, fold weights and projections under members/<name>/; their bundle.json entries."""
    entries = []
    for member, mrun, folds in finished:
        d = tmp / "members" / member.name
        d.mkdir(parents=True)
        _dump_yaml(member.to_dict(), d / "config.yaml")
        for k in folds:
            _write_checkpoint(mrun.fold(k).best, d / f"fold{k}.pt", fp16)
        for k in projected:
            shutil.copy2(mrun.predictions.fold_projection(k), d / f"fold{k}_pca.npz")
        entries.append(
            {
                "name": member.name,
                "folds": folds,
                "config": f"members/{member.name}/config.yaml",
                "weights": [f"members/{member.name}/fold{k}.pt" for k in folds],
                "windows": list(member.data.windows),
                "image_size": member.data.image_size,
                "neighbors": member.data.neighbors,
                "tta": {"transforms": list(member.tta.transforms), "average": member.tta.average},
                "projections": {str(k): f"members/{member.name}/fold{k}_pca.npz" for k in projected},
            }
        )
    return entries


def _write_second_stages(tmp: Path, run: Run, fitted: dict) -> dict:
    """Each saved second stage the chosen stage runs, copied in; their bundle.json entries."""
    second = {}
    for p, s in fitted.items():
        (tmp / SECOND_STAGES[p]).mkdir()
        shutil.copy2(stage_files(run, p).models, tmp / SECOND_STAGES[p] / "models.pt")
        second[p] = {"file": f"{SECOND_STAGES[p]}/models.pt", "layout": s.layout, "model": s.scfg.model}
    return second


def _publish(tmp: Path, out: Path) -> None:
    """The finished folder replaces `out` (only a bundle or an empty folder is replaced)."""
    if out.exists():
        if not (out / INDEX).exists() and any(out.iterdir()):
            shutil.rmtree(tmp)
            raise UserError(f"{out} exists and is not a bundle; give an empty or new folder to --out")
        shutil.rmtree(out)
    tmp.rename(out)


# --- load ---


@dataclass
class Bundle:
    dir: Path
    info: dict
    kept_models: dict | None = field(default=None, repr=False, compare=False)  # see apply.infer._fold_models

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def stage(self) -> str:
        return self.info["stage"]

    @property
    def thresholds(self) -> dict:
        t = self.info.get("thresholds") or {}
        return {
            "slice": t.get("slice") or {c: 0.5 for c in LABELS},
            "series": t.get("series") or {c: 0.5 for c in LABELS},
        }

    def member_config(self, entry: dict) -> Config:
        import yaml

        return C.from_dict(
            yaml.safe_load((self.dir / entry["config"]).read_text()), source=str(self.dir / entry["config"])
        )

    def config(self) -> Config:
        import yaml

        return C.from_dict(yaml.safe_load((self.dir / "config.yaml").read_text()), source=str(self.dir / "config.yaml"))

    def checkpoints(self, entry: dict) -> dict[int, Path]:
        return {int(k): self.dir / w for k, w in zip(entry["folds"], entry["weights"])}


def load(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle: format, every file present, checksums; one line naming what is wrong."""
    path = Path(path)
    index = path / INDEX
    if not index.is_file():
        raise UserError(
            f"{path}: not a model bundle (no {INDEX}); make one with `make export CONFIG=<config> MODEL={path}`"
        )
    try:
        info = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{index}: unreadable ({type(e).__name__}); export the bundle again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else None
        raise UserError(
            f"{index}: bundle format {got!r}, this version reads format {FORMAT}; export it again with this version"
        )
    files = info.get("files") or {}
    missing = [n for n in files if not (path / n).is_file()]
    if missing:
        raise UserError(
            f"{path}: bundle incomplete, {len(missing)} file(s) missing: {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}; copy the whole folder again or re-export"
        )
    if verify:
        bad = [
            n for n, v in files.items() if (path / n).stat().st_size != v["bytes"] or sha256(path / n) != v["sha256"]
        ]
        if bad:
            raise UserError(
                f"{path}: checksum mismatch for {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}: "
                f"the bundle was edited or damaged; copy it again or re-export"
            )
    needed = {w for m in info.get("members", []) for w in (m["config"], *m["weights"])} | {"config.yaml"}
    needed |= {p for m in info.get("members", []) for p in (m.get("projections") or {}).values()}
    needed |= {v["file"] for v in (info.get("second_stages") or {}).values()}
    unlisted = sorted(needed - set(files))
    if unlisted:
        raise UserError(f"{index}: does not list {', '.join(unlisted[:3])}; the index was edited, re-export")
    return Bundle(path, info)
