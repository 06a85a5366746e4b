"""The data stages: synthetic competition, header scan, folds, cache."""

from __future__ import annotations

from pathlib import Path

from ..core.config import CVConfig

from . import DATA, WORKERS, command, flag, layout_of


@command(
    "synth",
    "write the built-in synthetic mini-competition",
    flag("--out", required=True),
    flag("--seed", type=int, default=0),
    flag("--studies", type=int, default=None, help="number of studies (train + test)"),
    flag("--slices", type=int, default=None, help="slices per study"),
    flag("--size", type=int, default=None, help="image size in pixels"),
)
def synth(args):
    from ..data import synth

    out = synth.write_competition(
        Path(args.out), seed=args.seed, studies=args.studies, slices=args.slices, size=args.size
    )
    print(f"wrote synthetic competition to {out}")


@command(
    "meta",
    "scan DICOM headers into a metadata table",
    DATA,
    flag("--out", default=None, help="default: <work>/meta.csv"),
    WORKERS,
)
def meta(args):
    from ..data import meta

    meta.build_meta(layout_of(args), out=args.out, workers=args.workers)


@command(
    "folds",
    "K folds grouped by patient, balanced on rare labels",
    DATA,
    flag("--out", default=None, help="default: <work>/folds.csv"),
    flag("--k", type=int, default=CVConfig.k),
    flag("--seed", type=int, default=CVConfig.seed),
)
def folds(args):
    from ..data import folds

    folds.build_folds(layout_of(args), out=args.out, k=args.k, seed=args.seed)


@command("preprocess", "DICOM -> cached images (resumable)", DATA, WORKERS)
def preprocess(args):
    from ..data import preprocess

    preprocess.preprocess(layout_of(args), workers=args.workers)
