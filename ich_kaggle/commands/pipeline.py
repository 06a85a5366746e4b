"""Whole journeys in one command: the recipe on real data, the demo on the synthetic competition; benchmarks."""

from __future__ import annotations

from . import EXPERIMENT, MINI, RUN, RUNS, command, defaults, flag


@command(
    "recipe",
    "the whole recipe in one resumable command: meta, folds, cache, every fold of every member, "
    "predict, stack, choose by OOF, submit",
    EXPERIMENT,
    defaults(config="winners"),
    flag("--out-dir", default="submissions"),
    flag(
        "--gpus",
        type=int,
        default=-1,
        help="GPUs that train folds side by side, one process each "
        "(default -1: every visible one; 0 or 1: one fold at a time)",
    ),
)
def recipe(args):
    from .. import demo

    demo.recipe(
        args.data,
        config_name=args.config,
        runs=args.runs,
        work=args.work,
        overrides=args.set,
        out_dir=args.out_dir,
        gpus=args.gpus,
        run=args.run,
    )


@command(
    "demo",
    "the whole pipeline on the synthetic (or any) competition",
    flag("--data", default=None, help="data folder; default: generate the synthetic competition"),
    flag("--config", default="demo", help="a config or ensemble (default: the two-member CPU ensemble)"),
    RUNS,
    RUN,
    flag("--no-embeddings", action="store_true", help="skip the embedding-level stack shown beside the other"),
    flag("--work", default=None),
    flag("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE"),
)
def demo(args):
    from .. import demo

    demo.run(
        data=args.data,
        config_name=args.config,
        runs=args.runs,
        work=args.work,
        overrides=args.set,
        embeddings=not args.no_embeddings,
        run=args.run,
    )


@command(
    "bench",
    "print speed and memory figures as `name: value` lines (a few minutes on 2 cores)",
    flag(
        "--what",
        nargs="*",
        default=["all"],
        help="benchmarks to run: all (the quick ones), synth, meta, cache, loader, train, submission, and the "
        "long ones, run only when named: stack (competition scale, ~15 min), choices (5-8 min), "
        "stack-scale (every second-stage design at competition scale; --scale 0.25 for a quarter), "
        "stack-layouts (the embedding layouts of the second stage on the demo's fold models; `make demo` first), "
        "tta-subtypes (TTA views and head-crop margins against epidural/subdural on the real mini set)",
    ),
    flag(
        "--mini",
        default=None,
        help="the extracted real mini set, or 'synthetic' (default: ../shared's when "
        "present, else a synthetic competition generated into .cache/)",
    ),
    flag("--scale", type=float, default=None, help="fraction of the competition's size (stack-scale)"),
)
def bench(args):
    from .. import bench

    bench.run(args.what, mini=args.mini, scale=args.scale)


@command("gpu-check", "train + predict the real model on the real mini set on the GPU(s), a few minutes", MINI)
def gpu_check(args):
    from ..bench import gpu

    gpu.check(args.mini)
