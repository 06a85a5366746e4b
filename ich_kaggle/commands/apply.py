"""Using a trained model: export the bundle, run it on any head CT, measure it on an external labelled set."""

from __future__ import annotations

from pathlib import Path

from . import EXPERIMENT, command, config_of, flag, layout_of, members_of

MODEL = flag("--model", required=True, help="model bundle folder (made by `export`)")
INPUTS = flag("inputs", nargs="+", metavar="PATH", help="DICOM files, folders (any depth) or .zip files")


@command(
    "export",
    "write the model bundle: the folds, the stage submit chose, thresholds, bundle.json",
    EXPERIMENT,
    flag("--out", required=True, help="bundle folder to write"),
    flag("--fp16", action="store_true", help="store the weights in float16 (half the size)"),
    flag(
        "--stage",
        metavar="STAGE",
        help="bundle this stage (first_stage, stacked, stacked_embeddings, blend) instead of the one submit "
        "chooses by OOF; it must be one submit compared (fresh)",
    ),
)
def export(args):
    from .. import bundle

    cfg = config_of(args)
    bundle.export(
        cfg,
        args.runs,
        args.out,
        fp16=args.fp16,
        layout=layout_of(args),
        members=members_of(args, cfg),
        stage=args.stage,
    )


class _Progress:
    """A tqdm bar in percent, opened at the first report (a bundle refused before has no bar), closed at the end."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, what: str, fraction: float) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=100, desc="infer", bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
        self.bar.n = int(round(100 * fraction))
        self.bar.set_postfix_str(what)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@command(
    "infer",
    "run a model bundle on DICOM files, folders or zips: slices/series/studies CSVs and report.html",
    MODEL,
    flag("--out", required=True, help="folder for the results"),
    flag("inputs", nargs="*", metavar="PATH", help="DICOM files, folders (any depth) or .zip files"),
    flag(
        "--dicomweb",
        default=None,
        metavar="URL",
        help="pull --study from this DICOMweb root first (a PACS, e.g. http://host:8042/dicom-web)",
    ),
    flag("--study", default=None, metavar="UID", help="StudyInstanceUID to pull with --dicomweb"),
)
def infer(args):
    import contextlib

    from ..apply.infer import infer as run
    from ..bundle import load
    from ..core.errors import UserError

    if bool(args.dicomweb) != bool(args.study):
        raise UserError("--dicomweb and --study go together: infer --dicomweb <url> --study <StudyInstanceUID>")
    if not args.inputs and not args.dicomweb:
        raise UserError("nothing to run on: give DICOM files, folders or zips, or --dicomweb <url> --study <uid>")
    model = load(args.model)  # a bad bundle is said before a long pull
    progress = _Progress()
    with contextlib.ExitStack() as stack:
        stack.callback(progress.close)
        paths = [Path(p) for p in args.inputs]
        if args.dicomweb:
            from ..apply import dicomweb

            paths.append(stack.enter_context(dicomweb.pulled(args.dicomweb, args.study)))
        out = run(model, paths, Path(args.out), progress=progress)
    print(f"wrote {out / 'slices.csv'}, {out / 'series.csv'}, {out / 'studies.csv'}, {out / 'report.html'}")


@command(
    "evaluate",
    "measure a model bundle on labelled external studies (paper 004's table with 95%% CIs)",
    MODEL,
    flag(
        "--labels",
        required=True,
        help="CSV keyed by SOPInstanceUID, SeriesInstanceUID or "
        "StudyInstanceUID with 0/1 subtype columns, or CQ500's reads.csv",
    ),
    flag("--out", required=True, help="folder for the results"),
    flag("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals"),
    INPUTS,
)
def evaluate(args):
    from ..apply.evaluate import evaluate as run

    run(Path(args.model), Path(args.labels), [Path(p) for p in args.inputs], Path(args.out), n_boot=args.bootstrap)
