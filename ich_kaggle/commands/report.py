"""Looking at experiments: one run's report, every run side by side."""

from __future__ import annotations

from . import EXPERIMENT, command, config_of, flag, layout_of


@command(
    "report",
    "plots and index.html for an experiment",
    EXPERIMENT,
    flag("--threshold", type=float, default=0.5, help="decision threshold for confusion matrix, F1, series table"),
    flag("--gradcam", type=int, default=8, help="Grad-CAM examples per gallery (0: none)"),
)
def report(args):
    from ..report import stage as report

    # an ensemble: one page (members, the ensemble, the second stage, the choice by OOF)
    report.make_report(config_of(args), layout_of(args), runs=args.runs, threshold=args.threshold, gradcam=args.gradcam)


@command(
    "compare",
    "one table of every experiment with a score",
    flag("--runs", default="runs"),
    flag("--wide", action="store_true", help="every column (default: what fits 120 columns)"),
)
def compare(args):
    from ..report import stage as report

    report.compare(args.runs, wide=args.wide)
