"""Training: one fold, every fold, the LR finder."""

from __future__ import annotations

from . import EXPERIMENT, command, config_of, flag, layout_of, members_of


@command(
    "train",
    "train one fold (or every fold with --fold all)",
    EXPERIMENT,
    flag("--fold", default="0", help="fold number or 'all'"),
    flag("--force", action="store_true", help="retrain a finished fold from scratch"),
)
def train(args):
    from ..core import config

    cfg, layout = config_of(args), layout_of(args)
    config.selected_folds(cfg.cv, args.fold)  # a bad --fold answers at once (members share the ensemble's cv.k)
    members = members_of(args, cfg)  # an ensemble trains each member in its own runs/<member>/
    chosen = {m.name: config.selected_folds(m.cv, args.fold) for m in members}  # --fold checked before any work
    from .. import train  # torch: only once the arguments are known to be good
    from ..data import folds

    for member in members:  # every fold of every member checked before the first one trains
        folds.check_trainable(folds.fold_table(layout, member.cv), chosen[member.name], layout.folds_csv)
    for member in members:
        for fold in chosen[member.name]:
            train.train_fold(member, layout, fold, runs=args.runs, force=args.force)


@command(
    "lr-find",
    "plot loss against learning rate (one fold, one short sweep)",
    EXPERIMENT,
    flag("--fold", type=int, default=0),
)
def lr_find(args):
    from .. import train

    train.lr_find(config_of(args), layout_of(args), args.fold, runs=args.runs)
