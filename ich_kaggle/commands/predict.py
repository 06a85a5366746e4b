"""After training: predictions, the second stage, the submission and its checks."""

from __future__ import annotations


from . import EXPERIMENT, command, config_of, flag, layout_of, members_of


@command(
    "predict",
    "TTA inference of every trained fold on test and OOF images",
    EXPERIMENT,
    flag(
        "--finish-training",
        action="store_true",
        help="resume and finish folds whose training stopped early, then predict (default: name them and stop)",
    ),
)
def predict(args):
    from ..predict import stage as predict

    cfg, layout = config_of(args), layout_of(args)
    members = members_of(args, cfg)
    if args.finish_training:
        from .. import train

        for member in members:
            for fold in predict.trained_folds(member, args.runs)[1]:
                train.train_fold(member, layout, fold, runs=args.runs)
    if cfg.is_ensemble:
        predict.predict_ensemble(cfg, members, layout, runs=args.runs)
    else:
        predict.predict(cfg, layout, runs=args.runs)


@command(
    "stack",
    "second-stage sequence model over each series' slices",
    EXPERIMENT,
    flag("--force", action="store_true", help="recompute even when the stack is up to date"),
)
def stack(args):
    from ..stack import stage as stack

    stack.stack(config_of(args), layout_of(args), runs=args.runs, force=args.force)


@command(
    "submit",
    "write submissions/<config>.csv through the validator",
    EXPERIMENT,
    flag("--out-dir", default="submissions"),
    flag("--kaggle-submit", action="store_true", help="upload with `kaggle competitions submit`"),
    flag("--message", default=None),
)
def submit(args):
    from ..core.layout import Run
    from ..stack import stage as stack
    from ..submit import stage as submission

    cfg, layout = config_of(args), layout_of(args)
    if Run.of(args.runs, cfg.name).stack.test.exists():  # a stale stack is recomputed (stacking is cheap)
        stack.stack(cfg, layout, runs=args.runs)
    out = submission.submit(
        cfg, layout, runs=args.runs, out_dir=args.out_dir, members=members_of(args, cfg) if cfg.is_ensemble else None
    )
    if args.kaggle_submit:  # checked: a refusal exits non-zero with Kaggle's message
        from ..kaggle import api

        api.submit_file(out.with_name(out.name + ".gz"), args.message or f"ich_kaggle {cfg.name}")


@command(
    "score",
    "weighted multi-label log loss of a submission",
    flag("--truth", required=True, help="labels in the stage_2_train.csv form"),
    flag("--submission", required=True),
)
def score(args):
    from ..core import metrics

    result = metrics.score_files(args.truth, args.submission)
    print(f"weighted_log_loss: {result['weighted_log_loss']:.6f}")
    for label, value in result["per_label"].items():
        print(f"{label}: {value:.6f}")


@command(
    "validate",
    "check a submission against the sample submission",
    flag("--sample", required=True),
    flag("--submission", required=True),
)
def validate(args):
    from ..submit import stage as submission

    problems = submission.validate_file(args.sample, args.submission)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"{args.submission}: valid")
    return 0
