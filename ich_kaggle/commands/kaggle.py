"""Kaggle: the offline inference kernel and its datasets, training on Kaggle's GPUs, the API steps.

Each step that talks to Kaggle checks its answer (the kaggle CLI exits 0 when the server refuses).
"""

from __future__ import annotations

from pathlib import Path

from ..core.config import CVConfig

from . import (
    DATA,
    EXPERIMENT,
    defaults,
    KAGGLE,
    KAGGLE_OUT,
    PUSH,
    RESUME,
    SLUG,
    command,
    config_of,
    flag,
    kaggle_names,
    layout_of,
    members_of,
)

MESSAGE = flag("--message", default=None, help="version notes / submission message")


def _wait(timeout: float, poll: float):
    return (
        flag("--timeout", type=float, default=timeout, help="seconds before giving up"),
        flag("--poll", type=float, default=poll, help="seconds between checks"),
    )


# --- the inference kernel on local folds: two datasets (code, model) and the kernel ---
@command(
    "kernel-datasets",
    "build the code and model dataset folders under kernels/",
    EXPERIMENT,
    KAGGLE_OUT,
    flag("--fp16-weights", action="store_true", help="ship the checkpoints' weights in float16 (half the size)"),
)
def kernel_datasets(args):
    from ..kaggle import build as kernel

    cfg = config_of(args)
    kernel.build_datasets(
        cfg,
        runs=args.runs,
        out=args.out,
        username=args.username,
        layout=layout_of(args),
        fp16_weights=args.fp16_weights,
        members=members_of(args, cfg) if cfg.is_ensemble else None,
    )


@command(
    "kernel",
    "write kernels/<slug>/ ready for `kaggle kernels push` (the inference kernel on the model bundle)",
    EXPERIMENT,
    KAGGLE_OUT,
    SLUG,
    flag("--members", nargs="*", default=None, help="a part kernel: predict only these members"),
    flag("--folds", type=int, nargs="*", default=None, help="a part kernel: predict only these folds"),
    flag("--attach", nargs="*", default=[], help="slugs of kernels whose outputs (fold predictions) it adopts"),
    RESUME,
)
def kernel(args):
    from ..kaggle import build as kernel

    kernel.build_kernel(
        config_of(args),
        runs=args.runs,
        out=args.out,
        username=args.username,
        slug=args.slug,
        members=args.members or None,
        folds=args.folds if args.folds else None,
        attach=args.attach or [],
        resume=args.resume,
    )


@command(
    "kernel-finish",
    "the submission from fetched inference-kernel outputs (their per-fold predictions), locally: "
    "kernels/output/<slug>/submission.csv",
    EXPERIMENT,
    KAGGLE_OUT,
    SLUG,
    flag("--outputs", nargs="+", required=True, help="the kernels' output folders, or their slugs (fetched now)"),
)
def kernel_finish(args):
    from ..kaggle import build as kernel, run

    cfg = config_of(args)
    names = kernel.names_for(cfg, args.username, args.slug)
    folders = [Path(o) for o in args.outputs if Path(o).is_dir()]
    outputs = folders + kernel.fetch_outputs(args.username, [o for o in args.outputs if not Path(o).is_dir()], args.out)
    dest = Path(args.out) / "output" / names.kernel_slug
    run.combine_local(names.model_dir(args.out), outputs, layout_of(args).sample_csv, dest)


@command("datasets-create", "upload both dataset folders as new private Kaggle datasets", KAGGLE)
def datasets_create(args):
    from ..kaggle import api

    names = kaggle_names(args)
    api.create_datasets([names.code_dir(args.out), names.model_dir(args.out)])


@command("datasets-version", "upload both dataset folders as new versions of their datasets", KAGGLE, MESSAGE)
def datasets_version(args):
    from ..kaggle import api

    names = kaggle_names(args)
    api.version_datasets(
        [names.code_dir(args.out), names.model_dir(args.out)], args.message or f"ich_kaggle {args.config}"
    )


@command("datasets-wait", "wait until Kaggle has processed both datasets", KAGGLE, *_wait(1800, 15))
def datasets_wait(args):
    from ..kaggle import api

    names = kaggle_names(args)
    api.wait_datasets([names.code_id, names.model_id], timeout=args.timeout, poll=args.poll)


@command("kernel-push", "push kernels/<slug>/ (Kaggle starts a run)", KAGGLE)
def kernel_push(args):
    from ..kaggle import api

    api.push_kernel(kaggle_names(args).kernel_dir(args.out))


@command(
    "kernel-wait",
    "follow the kernel's run until it ends (default: as long as a 12-hour session can last)",
    KAGGLE,
    *_wait(12.5 * 3600, 60),
)
def kernel_wait(args):
    from ..kaggle import api

    api.wait_kernel(kaggle_names(args).kernel_id, timeout=args.timeout, poll=args.poll)


@command("kernel-output", "fetch the run's submission.csv and log into kernels/output/<slug>/", KAGGLE)
def kernel_output(args):
    from ..kaggle import api

    names = kaggle_names(args)
    api.fetch_output(names.kernel_id, Path(args.out) / "output" / names.kernel_slug)


@command(
    "kaggle-submit",
    "submit the kernel's submission.csv to the competition",
    KAGGLE,
    flag("--file", default=None, help="default: kernels/output/<slug>/submission.csv"),
    MESSAGE,
)
def kaggle_submit(args):
    from ..kaggle import api

    if args.file:  # any CSV, e.g. make submit's: no kernel, so no user name needed
        api.submit_file(Path(args.file), args.message or f"ich_kaggle {Path(args.file).name}")
        return
    names = kaggle_names(args)
    path = Path(args.out) / "output" / names.kernel_slug / api.SUBMISSION
    api.submit_file(path, args.message or f"ich_kaggle {names.config_name} (kernel {names.kernel_id})")


# --- training on Kaggle's GPUs (kaggle.train_build): code dataset, prepare kernel, one kernel per fold ---
@command(
    "kernel-weights",
    "build kernels/ich-kaggle-weights/ (the ImageNet weights files the configs start from) and upload it",
    KAGGLE_OUT,
    defaults(set=[]),
    flag(
        "--config",
        default=None,
        help="only this config's (or ensemble's) backbones; default: every shipped config's that are found here",
    ),
    flag("--no-upload", action="store_true", help="only build the folder"),
)
def kernel_weights(args):
    from ..kaggle import build, train_build, weights_dataset

    cfgs = None
    if args.config:
        cfg = config_of(args)
        cfgs = members_of(args, cfg)
    folder = weights_dataset.build(build.check_username(args.username), args.out, cfgs)
    if not args.no_upload:
        train_build.upload_code(folder, "ich_kaggle weights")


@command(
    "kaggle-plan",
    "what a config or ensemble costs on Kaggle's T4 x2: per member and fold, inference, total "
    "GPU-hours and weeks of quota",
    EXPERIMENT,
    KAGGLE_OUT,
    flag("--no-quota", action="store_true", help="do not ask Kaggle for the remaining weekly quota"),
)
def kaggle_plan(args):
    from ..kaggle import plan

    cfg = config_of(args)
    folds_csv = layout_of(args).folds_csv
    made = plan.make_plan(cfg, members_of(args, cfg), folds_csv if folds_csv.is_file() else None)
    left, note = (None, "not asked (--no-quota)") if args.no_quota else plan.quota_left()
    print("\n".join(made.lines(left, note)))


@command(
    "kernel-gpu-check",
    "write (and --push) a short T4 x2 kernel that runs make gpu-check and measures each "
    "shipped backbone and size (its rates.yaml goes to kaggle_rates.yaml: make kernel-gpu-check-fetch)",
    KAGGLE_OUT,
    PUSH,
)
def kernel_gpu_check(args):
    from ..kaggle import api, train_build

    folder = train_build.build_gpu_check_kernel(args.username, args.out)
    if args.push:
        api.push_kernel(folder)


@command(
    "kernel-gpu-check-fetch",
    "download the GPU-check kernel's measured rates into kaggle_rates.yaml",
    KAGGLE_OUT,
    flag("--rates", default=None, help="default: kaggle_rates.yaml ($ICH_KAGGLE_RATES)"),
)
def kernel_gpu_check_fetch(args):
    from ..kaggle import train_build

    train_build.fetch_rates(args.username, args.out, args.rates)


@command(
    "kernel-code",
    "build kernels/ich-kaggle-code/ and upload it (create or new version)",
    KAGGLE_OUT,
    flag("--no-upload", action="store_true", help="only build the folder"),
)
def kernel_code(args):
    from ..kaggle import train_build

    folder = train_build.build_code_only(args.username, args.out)
    if not args.no_upload:
        train_build.upload_code(folder, "ich_kaggle code")


@command(
    "kernel-prepare",
    "write (and --push) the kernel that scans headers into meta + folds on Kaggle",
    KAGGLE_OUT,
    flag("--k", type=int, default=CVConfig.k),
    flag("--seed", type=int, default=CVConfig.seed),
    PUSH,
)
def kernel_prepare(args):
    from ..kaggle import api, train_build

    folder = train_build.build_prepare_kernel(args.username, args.out, k=args.k, seed=args.seed)
    if args.push:
        api.push_kernel(folder)


@command(
    "kernel-train",
    "write (and --push) the kernel that trains one fold on Kaggle's T4 x2",
    EXPERIMENT,
    flag("--fold", type=int, default=0),
    KAGGLE_OUT,
    RESUME,
    flag("--epochs-per-run", type=int, default=None, help="stop resumably after this many more epochs"),
    flag("--t4-images-per-s", type=float, default=None, help="measured training img/s of one T4 (estimate)"),
    PUSH,
)
def kernel_train(args):
    from ..kaggle import api, train_build

    cfg = config_of(args)
    folders = train_build.build_train_kernel(
        cfg,
        args.fold,
        args.username,
        args.out,
        resume=args.resume,
        epochs_per_run=args.epochs_per_run,
        folds_csv=layout_of(args).folds_csv,
        t4_images_per_s=args.t4_images_per_s,
        members=members_of(args, cfg),
    )
    if args.push:
        for folder in folders:
            api.push_kernel(folder)


@command(
    "kernel-fetch",
    "download a training kernel's fold into RUNS/<config>/fold<N>/ (an ensemble: each member's)",
    EXPERIMENT,
    flag("--fold", type=int, default=0),
    KAGGLE_OUT,
)
def kernel_fetch(args):
    from ..kaggle import train_build

    for member in members_of(args, config_of(args)):
        train_build.fetch_fold(member.name, args.fold, args.username, runs=args.runs, out=args.out)


@command(
    "kernel-from-folds",
    "write (and --push) the inference kernel on the training kernels' outputs",
    EXPERIMENT,
    flag("--folds", type=int, nargs="*", default=None, help="default: every fold of the config"),
    KAGGLE_OUT,
    RESUME,
    PUSH,
)
def kernel_from_folds(args):
    from ..kaggle import api, train_build

    cfg = config_of(args)
    folders = train_build.build_infer_kernel(
        cfg, args.username, args.out, folds=args.folds, members=members_of(args, cfg), resume=args.resume
    )
    if args.push:
        for folder in folders:
            api.push_kernel(folder)


@command(
    "kernel-combine",
    "an ensemble's submission from its members' from-folds kernels (when its inference was "
    "split by member): fetched, combined, checked",
    EXPERIMENT,
    KAGGLE_OUT,
)
def kernel_combine(args):
    from ..kaggle import train_build

    cfg = config_of(args)
    train_build.combine_outputs(cfg, args.username, args.out, members=members_of(args, cfg))


@command(
    "kernel-fetch-prepare", "download the prepare kernel's meta.csv + folds.csv into the work folder", DATA, KAGGLE_OUT
)
def kernel_fetch_prepare(args):
    from ..kaggle import train_build

    train_build.fetch_prepared(args.username, layout_of(args), out=args.out)


@command("kernel-status", "state on Kaggle of every kernel folder under kernels/", KAGGLE_OUT)
def kernel_status(args):
    from ..kaggle import train_build

    train_build.kernel_states(args.out, args.username)
