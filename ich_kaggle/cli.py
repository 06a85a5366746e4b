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
    p.add_argument("--work", default=None, help="folder for derived files (default: work/<data folder name>-<hash of its path>)")


def _add_experiment(p: argparse.ArgumentParser) -> None:
    _add_data(p)
    p.add_argument("--config", default="seresnext50_512", help="shipped config name or path to a YAML file")
    p.add_argument("--runs", default="runs", help="experiments are written to RUNS/<config>/")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. train.epochs=3 (repeatable; applied in order)")


def _add_kaggle(p: argparse.ArgumentParser) -> None:
    """What names the datasets and the kernel: the config, the owner and the kernel slug."""
    p.add_argument("--config", default="seresnext50_512", help="shipped config name or path to a YAML file")
    p.add_argument("--out", default="kernels", help="folder of the dataset and kernel folders")
    p.add_argument("--username", default=os.environ.get("KAGGLE_USERNAME"))
    p.add_argument("--slug", default=None, help="kernel slug (default ich-kaggle-<config>)")
    p.set_defaults(set=[])


def _names(args: argparse.Namespace):
    """Only the config's name matters here: no full load (its validation imports every model library)."""
    from .core import config
    from .kaggle import build as kernel

    return kernel.names_for(config.Config(name=config.resolve_path(args.config).stem), args.username, args.slug)


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
    p.add_argument("--fp16-weights", action="store_true", help="ship the checkpoints' weights in float16 (half the size)")

    p = sub.add_parser("kernel", help="write kernels/<slug>/ ready for `kaggle kernels push`")
    _add_experiment(p)
    p.add_argument("--out", default="kernels")
    p.add_argument("--username", default=os.environ.get("KAGGLE_USERNAME"))
    p.add_argument("--slug", default=None)

    for name, help_ in (("datasets-create", "upload both dataset folders as new private Kaggle datasets"),
                        ("datasets-version", "upload both dataset folders as new versions of their datasets"),
                        ("datasets-wait", "wait until Kaggle has processed both datasets"),
                        ("kernel-push", "push kernels/<slug>/ (Kaggle starts a run)"),
                        ("kernel-wait", "follow the kernel's run until it ends"),
                        ("kernel-output", "fetch the run's submission.csv and log into kernels/output/<slug>/"),
                        ("kaggle-submit", "submit the kernel's submission.csv to the competition")):
        p = sub.add_parser(name, help=help_)
        _add_kaggle(p)
        if name == "datasets-version":
            p.add_argument("--message", default=None, help="version notes")
        if name in ("datasets-wait", "kernel-wait"):
            p.add_argument("--timeout", type=float, default=1800 if name == "datasets-wait" else 9 * 3600,
                           help="seconds before giving up")
            p.add_argument("--poll", type=float, default=15 if name == "datasets-wait" else 60, help="seconds between checks")
        if name == "kaggle-submit":
            p.add_argument("--file", default=None, help="default: kernels/output/<slug>/submission.csv")
            p.add_argument("--message", default=None)

    # training on Kaggle's GPUs (ich_kaggle.kaggle.train_build): code dataset, prepare kernel, one kernel per fold
    p = sub.add_parser("kernel-code", help="build kernels/ich-kaggle-code/ and upload it (create or new version)")
    p.add_argument("--out", default="kernels")
    p.add_argument("--username", default=os.environ.get("KAGGLE_USERNAME"))
    p.add_argument("--no-upload", action="store_true", help="only build the folder")
    p = sub.add_parser("kernel-prepare", help="write (and --push) the kernel that scans headers into meta + folds on Kaggle")
    p.add_argument("--out", default="kernels")
    p.add_argument("--username", default=os.environ.get("KAGGLE_USERNAME"))
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--push", action="store_true")
    p = sub.add_parser("kernel-train", help="write (and --push) the kernel that trains one fold on Kaggle's T4 x2")
    _add_experiment(p)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--out", default="kernels")
    p.add_argument("--username", default=os.environ.get("KAGGLE_USERNAME"))
    p.add_argument("--resume", action="store_true", help="attach this kernel's previous output and resume from it")
    p.add_argument("--epochs-per-run", type=int, default=None, help="stop resumably after this many more epochs")
    p.add_argument("--t4-images-per-s", type=float, default=None, help="measured training img/s of one T4 (estimate)")
    p.add_argument("--push", action="store_true")
    p = sub.add_parser("kernel-fetch", help="download a training kernel's fold into RUNS/<config>/fold<N>/")
    _add_experiment(p)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--out", default="kernels")
    p.add_argument("--username", default=os.environ.get("KAGGLE_USERNAME"))
    p = sub.add_parser("kernel-from-folds", help="write (and --push) the inference kernel on the training kernels' outputs")
    _add_experiment(p)
    p.add_argument("--folds", type=int, nargs="*", default=None, help="default: every fold of the config")
    p.add_argument("--out", default="kernels")
    p.add_argument("--username", default=os.environ.get("KAGGLE_USERNAME"))
    p.add_argument("--push", action="store_true")
    p = sub.add_parser("kernel-fetch-prepare", help="download the prepare kernel's meta.csv + folds.csv into the work folder")
    _add_data(p)
    p.add_argument("--out", default="kernels")
    p.add_argument("--username", default=os.environ.get("KAGGLE_USERNAME"))
    p = sub.add_parser("kernel-status", help="state on Kaggle of every kernel folder under kernels/")
    p.add_argument("--out", default="kernels")
    p.add_argument("--username", default=os.environ.get("KAGGLE_USERNAME"))

    p = sub.add_parser("report", help="plots and index.html for an experiment")
    _add_experiment(p)
    p.add_argument("--threshold", type=float, default=0.5, help="decision threshold for confusion matrix, F1, series table")
    p.add_argument("--gradcam", type=int, default=8, help="Grad-CAM examples per gallery (0: none)")

    p = sub.add_parser("compare", help="one table of every finished experiment")
    p.add_argument("--runs", default="runs")

    p = sub.add_parser("bench", help="print speed and memory figures")
    p.add_argument("--what", nargs="*", default=["all"])
    p.add_argument("--scale", type=float, default=None, help="fraction of the competition's size (stack-scale)")
    p.add_argument("--mini", default=None, help="extracted real mini set (default: from ../shared)")

    p = sub.add_parser("gpu-check", help="train + predict the real model on the real mini set on the GPU(s), a few minutes")
    p.add_argument("--mini", default=None, help="extracted real mini set (default: from ../shared)")

    p = sub.add_parser("recipe", help="the whole recipe in one resumable command: meta, folds, cache, every fold of "
                                      "every member, predict, stack, choose by OOF, submit")
    _add_experiment(p)
    p.set_defaults(config="winners")
    p.add_argument("--out-dir", default="submissions")
    p.add_argument("--gpus", type=int, default=-1, help="GPUs that train folds side by side, one process each "
                                                        "(default -1: every visible one; 0 or 1: one fold at a time)")

    p = sub.add_parser("demo", help="the whole pipeline on the synthetic (or any) competition")
    p.add_argument("--data", default=None, help="data folder; default: generate the synthetic competition")
    p.add_argument("--config", default="demo", help="a config or ensemble (default: the two-member CPU ensemble)")
    p.add_argument("--runs", default=None, help="default: runs/demo/<data folder name>-<path hash>")
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
    from .data import preprocess

    preprocess.preprocess(_layout(args), workers=args.workers)


@command("train")
def _train(args):
    cfg, layout = _config(args), _layout(args)
    from . import train
    from .core import config
    from .data import folds

    members = _members(args, cfg)  # an ensemble trains each member in its own runs/<member>/
    chosen = {m.name: config.selected_folds(m.cv, args.fold) for m in members}  # --fold checked before any work
    for member in members:  # every fold of every member checked before the first one trains
        folds.check_trainable(folds.fold_table(layout, member.cv), chosen[member.name], layout.folds_csv)
    for member in members:
        for fold in chosen[member.name]:
            train.train_fold(member, layout, fold, runs=args.runs, force=args.force)


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
    out = submission.submit(cfg, layout, runs=args.runs, out_dir=args.out_dir)
    if args.kaggle_submit:  # checked: a refusal exits non-zero with Kaggle's message
        from .kaggle import api

        api.submit_file(out.with_name(out.name + ".gz"), args.message or f"ich_kaggle {cfg.name}")


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

    cfg = _config(args)
    kernel.build_datasets(cfg, runs=args.runs, out=args.out, username=args.username, layout=_layout(args),
                          fp16_weights=args.fp16_weights, members=_members(args, cfg) if cfg.is_ensemble else None)


@command("kernel")
def _kernel(args):
    from .kaggle import build as kernel

    kernel.build_kernel(_config(args), runs=args.runs, out=args.out, username=args.username, slug=args.slug)


@command("datasets-create")
def _datasets_create(args):
    from .kaggle import api

    names = _names(args)
    api.create_datasets([names.code_dir(args.out), names.model_dir(args.out)])


@command("datasets-version")
def _datasets_version(args):
    from .kaggle import api

    names = _names(args)
    api.version_datasets([names.code_dir(args.out), names.model_dir(args.out)], args.message or f"ich_kaggle {args.config}")


@command("datasets-wait")
def _datasets_wait(args):
    from .kaggle import api

    names = _names(args)
    api.wait_datasets([names.code_id, names.model_id], timeout=args.timeout, poll=args.poll)


@command("kernel-push")
def _kernel_push(args):
    from .kaggle import api

    api.push_kernel(_names(args).kernel_dir(args.out))


@command("kernel-wait")
def _kernel_wait(args):
    from .kaggle import api

    api.wait_kernel(_names(args).kernel_id, timeout=args.timeout, poll=args.poll)


@command("kernel-output")
def _kernel_output(args):
    from .kaggle import api

    names = _names(args)
    api.fetch_output(names.kernel_id, Path(args.out) / "output" / names.kernel_slug)


@command("kaggle-submit")
def _kaggle_submit(args):
    from .kaggle import api

    if args.file:  # any CSV, e.g. make submit's: no kernel, so no user name needed
        api.submit_file(Path(args.file), args.message or f"ich_kaggle {Path(args.file).name}")
        return
    names = _names(args)
    path = Path(args.out) / "output" / names.kernel_slug / api.SUBMISSION
    api.submit_file(path, args.message or f"ich_kaggle {names.config_name} (kernel {names.kernel_id})")


@command("kernel-code")
def _kernel_code(args):
    from .kaggle import train_build

    folder = train_build.build_code_only(args.username, args.out)
    if not args.no_upload:
        train_build.upload_code(folder, "ich_kaggle code")


@command("kernel-prepare")
def _kernel_prepare(args):
    from .kaggle import api, train_build

    folder = train_build.build_prepare_kernel(args.username, args.out, k=args.k, seed=args.seed)
    if args.push:
        api.push_kernel(folder)


@command("kernel-train")
def _kernel_train(args):
    from .kaggle import api, train_build

    folder = train_build.build_train_kernel(_config(args), args.fold, args.username, args.out, resume=args.resume,
                                            epochs_per_run=args.epochs_per_run, folds_csv=_layout(args).folds_csv,
                                            t4_images_per_s=args.t4_images_per_s)
    if args.push:
        api.push_kernel(folder)


@command("kernel-fetch")
def _kernel_fetch(args):
    from .core import config
    from .kaggle import train_build

    train_build.fetch_fold(config.resolve_path(args.config).stem, args.fold, args.username, runs=args.runs, out=args.out)


@command("kernel-from-folds")
def _kernel_from_folds(args):
    from .kaggle import api, train_build

    folder = train_build.build_infer_kernel(_config(args), args.username, args.out, folds=args.folds)
    if args.push:
        api.push_kernel(folder)


@command("kernel-fetch-prepare")
def _kernel_fetch_prepare(args):
    from .kaggle import train_build

    train_build.fetch_prepared(args.username, _layout(args), out=args.out)


@command("kernel-status")
def _kernel_status(args):
    from .kaggle import train_build

    train_build.kernel_states(args.out, args.username)


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

    bench.run(args.what, mini=args.mini, scale=args.scale)


@command("gpu-check")
def _gpu_check(args):
    from .bench import gpu

    gpu.check(args.mini)


@command("recipe")
def _recipe(args):
    from . import demo

    demo.recipe(args.data, config_name=args.config, runs=args.runs, work=args.work, overrides=args.set,
                out_dir=args.out_dir, gpus=args.gpus)


@command("demo")
def _demo(args):
    from . import demo

    demo.run(data=args.data, config_name=args.config, runs=args.runs, work=args.work, overrides=args.set,
             embeddings=not args.no_embeddings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .core import log

    log.show()  # the library logs; here its messages become plain lines
    try:
        return int(COMMANDS[args.command](args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
