"""Command line: argument parsing only. Every subcommand is one call into a stage module.

Stage modules are imported lazily so that `score` and `validate` start fast and never import torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from .core.errors import UserError

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}
DEFAULT_DATA = "data/rsna-intracranial-hemorrhage-detection"  # the Makefile's DATA_DIR and the README's unzip target


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


def _layout(args: argparse.Namespace):
    from .core.layout import Layout

    return Layout.of(args.data, getattr(args, "work", None))


def _config(args: argparse.Namespace):
    from .core import config

    return config.load(args.config, args.set)


def _members(args: argparse.Namespace, cfg):
    """An ensemble's member configs (with the same --set overrides), or [cfg] for a single config."""
    from .core import ensemble

    return ensemble.load_members(cfg, args.set) if cfg.is_ensemble else [cfg]


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=os.environ.get("DATA_DIR", DEFAULT_DATA), help="competition folder in the Kaggle layout")
    p.add_argument("--work", default=None, help="folder for derived files (default: work/<data folder name>)")


def _add_experiment(p: argparse.ArgumentParser) -> None:
    _add_data(p)
    p.add_argument("--config", default="seresnext50_512", help="shipped config name or path to a YAML file")
    p.add_argument("--runs", default="runs", help="experiments are written to RUNS/<config>/")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. train.epochs=3 (repeatable; applied in order)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ich_kaggle", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("synth", help="write the built-in synthetic mini-competition")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--studies", type=int, default=None, help="number of studies (train + test)")
    p.add_argument("--slices", type=int, default=None, help="slices per study")
    p.add_argument("--size", type=int, default=None, help="image size in pixels")

    p = sub.add_parser("meta", help="scan DICOM headers into a metadata table")
    _add_data(p)
    p.add_argument("--out", default=None, help="default: <work>/meta.csv")
    p.add_argument("--workers", type=int, default=os.cpu_count())

    p = sub.add_parser("folds", help="K folds grouped by patient, balanced on rare labels")
    _add_data(p)
    p.add_argument("--out", default=None, help="default: <work>/folds.csv")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)

    p = sub.add_parser("preprocess", help="DICOM -> cached images (resumable)")
    _add_data(p)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--small", action="store_true", help="14%% smaller cache (~136 kB/slice), ~4x slower to write")

    p = sub.add_parser("train", help="train one fold (or every fold with --fold all)")
    _add_experiment(p)
    p.add_argument("--fold", default="0", help="fold number or 'all'")
    p.add_argument("--force", action="store_true", help="retrain a finished fold from scratch")

    p = sub.add_parser("lr-find", help="plot loss against learning rate (one fold, one short sweep)")
    _add_experiment(p)
    p.add_argument("--fold", type=int, default=0)

    p = sub.add_parser("predict", help="TTA inference of every trained fold on test and OOF images")
    _add_experiment(p)
    p.add_argument("--finish-training", action="store_true",
                   help="resume and finish folds whose training stopped early, then predict (default: name them and stop)")

    p = sub.add_parser("stack", help="second-stage sequence model over each series' slices")
    _add_experiment(p)
    p.add_argument("--force", action="store_true", help="recompute even when the stack is up to date")

    p = sub.add_parser("submit", help="write submissions/<config>.csv through the validator")
    _add_experiment(p)
    p.add_argument("--out-dir", default="submissions")
    p.add_argument("--kaggle-submit", action="store_true", help="upload with `kaggle competitions submit`")
    p.add_argument("--message", default=None)

    p = sub.add_parser("score", help="weighted multi-label log loss of a submission")
    p.add_argument("--truth", required=True, help="labels in the stage_2_train.csv form")
    p.add_argument("--submission", required=True)

    p = sub.add_parser("validate", help="check a submission against the sample submission")
    p.add_argument("--sample", required=True)
    p.add_argument("--submission", required=True)

    p = sub.add_parser("kernel-datasets", help="build the code and model dataset folders under kernels/")
    _add_experiment(p)
    p.add_argument("--out", default="kernels")
    p.add_argument("--username", default=os.environ.get("KAGGLE_USERNAME"))

    p = sub.add_parser("kernel", help="write kernels/<slug>/ ready for `kaggle kernels push`")
    _add_experiment(p)
    p.add_argument("--out", default="kernels")
    p.add_argument("--username", default=os.environ.get("KAGGLE_USERNAME"))
    p.add_argument("--slug", default=None)

    p = sub.add_parser("report", help="plots and index.html for an experiment")
    _add_experiment(p)
    p.add_argument("--threshold", type=float, default=0.5, help="decision threshold for confusion matrix, F1, series table")
    p.add_argument("--gradcam", type=int, default=8, help="Grad-CAM examples per gallery (0: none)")

    p = sub.add_parser("compare", help="one table of every finished experiment")
    p.add_argument("--runs", default="runs")

    p = sub.add_parser("bench", help="print speed and memory figures")
    p.add_argument("--what", nargs="*", default=["all"])
    p.add_argument("--mini", default=None, help="extracted real mini set (default: from ../shared)")

    p = sub.add_parser("recipe", help="the whole recipe in one resumable command: meta, folds, cache, every fold of "
                                      "every member, predict, stack, choose by OOF, submit")
    _add_experiment(p)
    p.set_defaults(config="seresnext_pair")
    p.add_argument("--out-dir", default="submissions")

    p = sub.add_parser("demo", help="the whole pipeline on the synthetic (or any) competition")
    p.add_argument("--data", default=None, help="data folder; default: generate the synthetic competition")
    p.add_argument("--config", default="demo", help="a config or ensemble (default: the two-member CPU ensemble)")
    p.add_argument("--runs", default=None, help="default: runs/demo/<data folder name>")
    p.add_argument("--no-embeddings", action="store_true", help="skip the embedding-level stack shown beside the other")
    p.add_argument("--work", default=None)
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE")
    return parser


@command("synth")
def _synth(args):
    from .data import synth

    out = synth.write_competition(Path(args.out), seed=args.seed, studies=args.studies, slices=args.slices, size=args.size)
    print(f"wrote synthetic competition to {out}")


@command("meta")
def _meta(args):
    from .data import meta

    layout = _layout(args)
    meta.build_meta(layout, out=args.out, workers=args.workers)


@command("folds")
def _folds(args):
    from .data import folds

    folds.build_folds(_layout(args), out=args.out, k=args.k, seed=args.seed)


@command("preprocess")
def _preprocess(args):
    from .data import cache

    cache.preprocess(_layout(args), workers=args.workers, level=cache.SMALL if args.small else cache.FAST)


@command("train")
def _train(args):
    cfg = _config(args)
    from . import train
    from .data.folds import selected_folds

    for member in _members(args, cfg):  # an ensemble trains each member in its own runs/<member>/
        for fold in selected_folds(member.cv, args.fold):
            train.train_fold(member, _layout(args), fold, runs=args.runs, force=args.force)


@command("lr-find")
def _lr_find(args):
    from . import train

    train.lr_find(_config(args), _layout(args), args.fold, runs=args.runs)


@command("predict")
def _predict(args):
    from .predict import stage as predict

    cfg, layout = _config(args), _layout(args)
    members = _members(args, cfg)
    if args.finish_training:
        from . import train

        for member in members:
            for fold in predict.trained_folds(member, args.runs)[1]:
                train.train_fold(member, layout, fold, runs=args.runs)
    if cfg.is_ensemble:
        predict.predict_ensemble(cfg, members, layout, runs=args.runs)
    else:
        predict.predict(cfg, layout, runs=args.runs)


@command("stack")
def _stack(args):
    from .stack import stage as stack

    stack.stack(_config(args), _layout(args), runs=args.runs, force=args.force)


@command("submit")
def _submit(args):
    from .core.layout import Run
    from .stack import stage as stack
    from .submit import stage as submission

    cfg, layout = _config(args), _layout(args)
    if Run.of(args.runs, cfg.name).stack.test.exists():  # a stale stack is recomputed (stacking is cheap)
        stack.stack(cfg, layout, runs=args.runs)
    submission.submit(cfg, layout, runs=args.runs, out_dir=args.out_dir,
                      kaggle_submit=args.kaggle_submit, message=args.message)


@command("score")
def _score(args):
    from .core import metrics

    result = metrics.score_files(args.truth, args.submission)
    print(f"weighted_log_loss: {result['weighted_log_loss']:.6f}")
    for label, value in result["per_label"].items():
        print(f"{label}: {value:.6f}")


@command("validate")
def _validate(args):
    from .submit import stage as submission

    problems = submission.validate_file(args.sample, args.submission)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"{args.submission}: valid")
    return 0


@command("kernel-datasets")
def _kernel_datasets(args):
    from .kaggle import build as kernel

    kernel.build_datasets(_config(args), runs=args.runs, out=args.out, username=args.username, layout=_layout(args))


@command("kernel")
def _kernel(args):
    from .kaggle import build as kernel

    kernel.build_kernel(_config(args), runs=args.runs, out=args.out, username=args.username, slug=args.slug)


@command("report")
def _report(args):
    from .report import stage as report

    cfg = _config(args)
    for member in _members(args, cfg):  # an ensemble: one report per member; `compare` lists the ensemble itself
        report.make_report(member, _layout(args), runs=args.runs, threshold=args.threshold, gradcam=args.gradcam)


@command("compare")
def _compare(args):
    from .report import stage as report

    report.compare(args.runs)


@command("bench")
def _bench(args):
    from . import bench

    bench.run(args.what, mini=args.mini)


@command("recipe")
def _recipe(args):
    from . import demo

    demo.recipe(args.data, config_name=args.config, runs=args.runs, work=args.work, overrides=args.set,
                out_dir=args.out_dir)


@command("demo")
def _demo(args):
    from . import demo

    demo.run(data=args.data, config_name=args.config, runs=args.runs, work=args.work, overrides=args.set,
             embeddings=not args.no_embeddings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(COMMANDS[args.command](args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
