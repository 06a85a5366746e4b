"""`make demo`: the whole pipeline, stage by stage, on the synthetic mini-competition (or any Kaggle-layout folder).

synth -> meta -> folds -> cache -> train every fold of every member -> predict with TTA -> ensemble -> stack ->
submit (chooses by OOF) -> score. The default is the two-member CPU ensemble `configs/ensembles/demo.yaml` on a
synthetic competition with 30+ test studies. Ends with one line per figure: the prior, each member's first stage,
the ensemble, the probability stack, the embedding stack (stack.embedding_stage: in the submitted path), and the
stage submit chose with the OOF losses it chose by, scored on the test
labels when the data folder has `stage_2_test_labels.csv`, otherwise on the out-of-fold predictions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .core.labels import LABELS
from .core import config
from .core.layout import Layout, Run
from .data import synth as synth_mod
from . import docs

SYNTH_DIR = Path("data/synth")
DEMO_SYNTH = synth_mod.DEMO  # the demo's synthetic competition (data/synth.py)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _prior_frame(ids: pd.Series, prior: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(np.repeat(prior[None, :], len(ids), axis=0), columns=list(LABELS))
    frame.insert(0, "image_id", ids.to_numpy())
    return frame


def scores(
    layout: Layout, run: Run, members: list[str] | None = None, extra: dict[str, Run] | None = None
) -> dict[str, float]:
    """Weighted log loss of the prior, each member's first stage, the ensemble (or the single first stage) and the
    stack, on the test labels if present, else on the OOF predictions. `extra`: more stacked runs to score."""
    from .core import metrics
    from .core.labels import read_labels

    train_labels = read_labels(layout.train_csv)
    prior = train_labels[list(LABELS)].to_numpy(float).mean(axis=0)
    on_test = layout.test_labels_csv.exists()
    truth = read_labels(layout.test_labels_csv) if on_test else train_labels

    def pick(r: Run, stacked: bool) -> Path:
        if stacked:
            return r.stack.test if on_test else r.stack.oof
        return r.predictions.test if on_test else r.predictions.oof

    first_df = pd.read_csv(pick(run, False))
    truth = truth[truth["image_id"].isin(first_df["image_id"])]

    def loss(path: Path) -> float:
        return metrics.score_frames(truth, pd.read_csv(path))["weighted_log_loss"]

    out = {"prior_log_loss": metrics.score_frames(truth, _prior_frame(truth["image_id"], prior))["weighted_log_loss"]}
    if members:
        for name in members:
            out[f"first_stage_log_loss[{name}]"] = loss(pick(Run(run.dir.parent / name), False))
        out["ensemble_log_loss"] = loss(pick(run, False))
    else:
        out["first_stage_log_loss"] = loss(pick(run, False))
    out["stacked_log_loss"] = loss(pick(run, True))
    emb = run.embedding_stack
    if (emb.test if on_test else emb.oof).exists():
        out["stacked_embeddings_log_loss"] = loss(emb.test if on_test else emb.oof)
    for key, r in (extra or {}).items():
        out[key] = loss(pick(r, True))
    if run.choice.exists() and "blend" in (json.loads(run.choice.read_text()).get("oof_log_loss") or {}):
        out["blend_log_loss"] = loss(run.blend.test if on_test else run.blend.oof)
    return out


def pipeline(
    cfg,
    members: list,
    layout: Layout,
    runs: str | Path,
    out_dir: str | Path = "submissions",
    tag: str = "demo",
    jobs: list | None = None,
    devices: list[str] | None = None,
) -> Path:
    """meta -> folds -> cache -> every fold of every member -> predict (+ ensemble) -> stack -> choose -> submit.

    Resumable: each step reuses what its manifest says is current (finished folds are skipped, an interrupted
    fold resumes from last.pt, predictions and the stack are reused when fresh), so rerunning after a crash or a
    new fold continues where it stopped. With `jobs` and two or more `devices`, the folds train side by side, one
    process per device (train/side_by_side.py), before the loop below finds them finished."""
    from .predict import stage as predict
    from .stack import stage as stack
    from .submit import stage as submission
    from . import train
    from .data import folds, preprocess

    folds.fold_table(layout, cfg.cv)  # scans meta.csv first when it is missing
    preprocess.ensure(layout)
    if jobs and devices and len(devices) > 1:
        from .train.side_by_side import run_jobs

        todo = [j for j in jobs if not Run.of(runs, j.name).finished([j.fold])]
        if todo:
            run_jobs(todo, devices, layout.data, layout.work, runs, Run.of(runs, cfg.name).job_logs)
    for member in members:
        for fold in config.selected_folds(member.cv):
            print(f"[{tag}] training {member.name} fold {fold} of {member.cv.k}")
            train.train_fold(member, layout, int(fold), runs=runs)
    if cfg.is_ensemble:
        predict.predict_ensemble(cfg, members, layout, runs=runs)
    else:
        predict.predict(cfg, layout, runs=runs)
    stack.stack(cfg, layout, runs=runs)
    return submission.submit(cfg, layout, runs=runs, out_dir=out_dir)


def fold_jobs(cfg, config_name: str, overrides: list[str] | None) -> list:
    """A Job for every selected fold of every member: the train command that makes each fold the same as this
    process would (an ensemble member: its YAML with `ensemble.member_set`, then the overrides)."""
    from .core import ensemble
    from .core.config import selected_folds
    from .train.side_by_side import Job

    extra = [o for o in (overrides or []) if not o.strip().startswith("ensemble.")]
    if cfg.is_ensemble:
        sources = [(src, [*cfg.ensemble.member_set, *extra]) for src in cfg.ensemble.members]
        members = ensemble.load_members(cfg, overrides)  # named as `cfg` names them (RUN= prefixes them)
    else:
        sources, members = [(config_name, list(overrides or []))], [cfg]
    return [Job(src, int(k), sets, m.name) for (src, sets), m in zip(sources, members) for k in selected_folds(m.cv)]


def recipe(
    data: str,
    config_name: str = "winners",
    runs: str = "runs",
    work: str | None = None,
    overrides: list[str] | None = None,
    out_dir: str = "submissions",
    gpus: int = -1,
    run: str | None = None,
) -> Path:
    """`make recipe`: the whole recipe on a Kaggle download, one resumable command, to `<out_dir>/<config>.csv`.
    `gpus`: how many GPUs train folds side by side (-1: every visible one; 0 or 1: one fold at a time here)."""
    from .core import ensemble
    from .train.side_by_side import visible_gpus

    start = time.time()
    cfg = config.load(config_name, overrides, run=run)
    members = ensemble.load_members(cfg, overrides) if cfg.is_ensemble else [cfg]
    layout = Layout.of(data, work)
    layout.require_data()
    devices = visible_gpus()
    devices = devices if gpus < 0 else devices[:gpus]
    print(
        f"[recipe] data {layout.data}  work {layout.work}  config {cfg.name} "
        f"({', '.join(m.name for m in members)})  runs {runs}  "
        + (f"folds side by side on GPUs {', '.join(devices)}" if len(devices) > 1 else "one fold at a time")
    )
    out = pipeline(
        cfg,
        members,
        layout,
        runs,
        out_dir=out_dir,
        tag="recipe",
        jobs=fold_jobs(cfg, config_name, overrides),
        devices=devices,
    )
    choice = json.loads(Run.of(runs, cfg.name).choice.read_text())
    print(f"[recipe] {out} from the {choice['stage']} stage; wall time {time.time() - start:.0f} s")
    return out


def output_file(run: Run) -> Path:
    """Where the demo saves the block it printed last (docs.py writes it into the README)."""
    return run.dir / "demo.txt"


def default_output() -> Path:
    """The saved block of the default `make demo` (synthetic competition, `demo` ensemble): the README's figures."""
    return output_file(Run.of("runs", "demo"))


def report_command(config_name: str, run_name: str, runs: str | Path) -> str:
    """The Make call that writes the demo's report (the report finds the data folder in the run's record)."""
    extra = ("" if run_name == Path(config_name).stem else f" RUN={run_name}") + (
        "" if str(runs) == "runs" else f" RUNS={runs}"
    )
    return f"make report CONFIG={config_name}{extra}"


def run(
    data: str | None = None,
    config_name: str = "demo",
    runs: str = "runs",
    work: str | None = None,
    overrides: list[str] | None = None,
    embeddings: bool = True,
    run: str | None = None,
) -> dict[str, float]:
    """The demo writes where every target does, runs/<run>/ (default: the config's name); its folds record the data
    folder they trained on, so a demo on another folder is refused with one line (RUN=<name> trains beside it)."""
    from .core import ensemble
    from .stack import stage as stack
    from .data import synth

    start, cpu_start = time.time(), _cpu_seconds()
    cfg = config.load(config_name, overrides, run=run)
    members = ensemble.load_members(cfg, overrides) if cfg.is_ensemble else [cfg]
    if data is None:
        data_dir = SYNTH_DIR
        print(f"[demo] synthetic competition in {data_dir} ({DEMO_SYNTH})")
        synth.write_competition(data_dir, **DEMO_SYNTH)  # instant when already written with these parameters
    else:
        data_dir = Path(data)
    layout = Layout.of(data_dir, work)
    layout.require_data()

    names = ", ".join(m.name for m in members)
    print(f"[demo] data {layout.data}  work {layout.work}  config {cfg.name} ({names})  runs {runs}")
    out_file = pipeline(cfg, members, layout, runs)
    extra: dict[str, Run] = {}
    if embeddings and not cfg.stack.use_embeddings and not cfg.stack.embedding_stage:
        # the embedding-level second stage beside the probability one (outside the submitted path, which has it with
        # stack.embedding_stage): same sources, embeddings added
        emb = dataclasses.replace(
            cfg, name=f"{cfg.name}+embeddings", stack=dataclasses.replace(cfg.stack, use_embeddings=True)
        )
        stack.stack(emb, layout, runs=runs, sources=[str(p.dir) for p in ensemble.stack_sources(cfg, runs)])
        extra["stacked_embeddings_log_loss"] = Run.of(runs, emb.name)

    run_dir = Run.of(runs, cfg.name)
    result = scores(layout, run_dir, [m.name for m in members] if cfg.is_ensemble else None, extra)
    choice = json.loads(run_dir.choice.read_text())
    chosen = choice["stage"]
    where = "test labels" if layout.test_labels_csv.exists() else "out-of-fold predictions"
    cpu = _cpu_seconds() - cpu_start  # this process, its threads and its finished worker processes
    print(
        f"[demo] submission {out_file}; scored on the {where}; wall time {time.time() - start:.0f} s, "
        f"CPU time {cpu:.0f} s (on a shared machine the wall time also measures the neighbours)"
    )
    oof = choice.get("oof_log_loss") or {}
    why = (
        "the lowest OOF loss of " + ", ".join(f"{k} {v:.5f}" for k, v in sorted(oof.items(), key=lambda kv: kv[1]))
        if oof
        else "no OOF score to choose by"
    )
    block = [f"{key}: {value:.5f}" for key, value in result.items()] + [f"submit_chose: {chosen} ({why})"]
    print("\n".join(block))
    docs.save_output(output_file(run_dir), block, docs.settings_line(data, config_name, overrides))
    print(
        f"[demo] its report: {report_command(config_name, cfg.name, runs)} && xdg-open {run_dir.report / 'index.html'}"
    )
    return {**result, "submit_chose": chosen}
