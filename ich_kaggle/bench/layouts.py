"""`bench --what stack-layouts`: the embedding layouts of the second stage compared on the same first stage, the
demo's (issue 26): `per_fold`, `mixture` and the 2nd-place layout (`stack.in_sample`), with the probability-only
stack as the reference. Quality, not speed: each figure is a weighted log loss, out of fold and on the synthetic
test labels, for several stack seeds (mean and spread).

Reads the fold checkpoints `make demo` trained (runs/<member>/fold<k>/best.pt of `configs/ensembles/demo.yaml`)
and runs every fold model, with its member's TTA, on every training image (its held-out fold: the OOF rows; the
other folds: the in-sample rows the 2nd-place layout trains on) and on the test images, keeping the full pooled
embeddings; each design then projects them as it would (`stack.embedding_dim` components). Also prints the first
stage's in-sample and OOF losses: how overconfident a fold model is on the images it trained on.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import config, ensemble, metrics
from ..core.config import Config, StackConfig
from ..core.errors import UserError
from ..core.labels import LABELS
from ..core.layout import Layout, Run

L = list(LABELS)
DEMO_DATA = Path("data/synth")  # where `make demo` writes its synthetic competition (demo.SYNTH_DIR)
SEEDS = (42, 1, 2)
DESIGNS = ("stacked", "per_fold", "mixture", "second_place")


@dataclass
class FirstStage:
    """Every fold model of every member on every training and test image: probabilities and full embeddings."""

    meta: pd.DataFrame
    folds: pd.DataFrame  # image_id, fold + labels (training images)
    truth: pd.DataFrame  # image_id + labels (test images)
    probs: list[dict[int, pd.DataFrame]]  # per member, per fold model: wide probabilities, all images
    embs: list[dict[int, pd.DataFrame]]  # per member, per fold model: embeddings indexed by image_id, all images
    average: list[str]  # per member: how its fold models' test predictions are averaged (tta.average)
    names: list[str]


def demo_first_stage(runs: str | Path = "runs", config_name: str = "demo") -> FirstStage:
    """Run the demo's fold models over every image (module docstring)."""
    import torch

    from ..data import cache, synth
    from ..data.folds import fold_table
    from ..core.labels import read_labels
    from ..data.meta import load_meta
    from ..predict.stage import load_fold_models, predict_folds

    cfg = config.load(config_name)
    members = ensemble.load_members(cfg) if cfg.is_ensemble else [cfg]
    data = synth.write_competition(DEMO_DATA, **synth.DEMO)  # instant when already written
    layout = Layout.of(data)
    folds = fold_table(layout, cfg.cv)
    fold_ids = sorted(int(k) for k in folds["fold"].unique())
    for m in members:
        missing = [k for k in fold_ids if not Run.of(runs, m.name).fold(k).best.exists()]
        if missing:
            raise UserError(f"{Run.of(runs, m.name).fold(missing[0]).best} not found; run `make demo` first")
    meta = load_meta(layout).assign(image_id=lambda f: f["image_id"].astype(str))
    cached = cache.cached_ids(layout)
    test_ids = set(meta.loc[meta["split"] == "test", "image_id"]) & cached
    train_ids = set(folds["image_id"].astype(str)) & cached
    frame = meta[meta["image_id"].isin(train_ids | test_ids)].reset_index(drop=True)
    truth = read_labels(layout.test_labels_csv)
    probs, embs = [], []
    for m in members:
        run = Run.of(runs, m.name)
        models = load_fold_models({k: run.fold(k).best for k in fold_ids}, [torch.device("cpu")])
        p, e, lost = predict_folds(models, frame, m, meta, layout=layout, desc=f"{m.name} all images")
        if len(lost):
            raise UserError(f"{len(lost)} cached image(s) of {layout.work} could not be read; rerun `make demo`")
        probs.append(p)
        embs.append(e)
        for k in fold_ids:  # the same model and TTA as the demo's predict stage: its OOF file, to rounding
            written = run.predictions.oof_fold(k)
            if written.exists():
                w = pd.read_csv(written, dtype={"image_id": str}).set_index("image_id")
                here = p[k].set_index("image_id").loc[w.index, L].to_numpy()
                print(
                    f"layouts_check_max_diff_vs_predict[{m.name},fold{k}]: {np.abs(here - w[L].to_numpy()).max():.2e}"
                )
    return FirstStage(
        meta,
        folds[folds["image_id"].isin(train_ids)].reset_index(drop=True),
        truth[truth["image_id"].isin(test_ids)].reset_index(drop=True),
        probs,
        embs,
        [m.tta.average for m in members],
        [m.name for m in members],
    )


def _split(fs: FirstStage) -> dict:
    """Per member m and fold model k: ids of its held-out fold, of its training images and of the test images."""
    fold_of = fs.folds.set_index("image_id")["fold"]
    test = fs.truth["image_id"].to_numpy()
    return {
        k: (fold_of.index[fold_of == k].to_numpy(), fold_of.index[fold_of != k].to_numpy(), test)
        for k in sorted(fold_of.unique())
    }


def _rows(frame: pd.DataFrame, ids: np.ndarray) -> pd.DataFrame:
    return frame.set_index("image_id").loc[ids].reset_index()


def _emb(fs: FirstStage, m: int, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return ids, fs.embs[m][k].loc[ids].to_numpy(np.float32)


def first_stage_gap(fs: FirstStage) -> dict[str, float]:
    """Weighted log loss of each member's fold models on the images they trained on (in-sample) and on their held-out
    fold (OOF), pooled over the fold models: how much sharper in-sample features are."""
    y = fs.folds.set_index("image_id")[L]
    out = {}
    for m, name in enumerate(fs.names):
        for what, pick in (("in_sample", 1), ("oof", 0)):
            parts = [_rows(fs.probs[m][k], ids[pick]) for k, ids in _split(fs).items()]
            frame = pd.concat(parts, ignore_index=True)
            out[f"first_stage_{what}_log_loss[{name}]"] = metrics.weighted_log_loss(
                y.loc[frame["image_id"]].to_numpy(np.float64), frame[L].to_numpy(np.float64)
            )
    return out


def fit_design(design: str, fs: FirstStage, scfg: StackConfig):
    """One second-stage design on the first stage `fs`: a StackResult (OOF over the training images, test)."""
    from ..predict.stage import average_folds
    from ..stack.in_sample import InSampleInputs, project_fold_model, run_second_place
    from ..stack.pipeline import FoldInputs, run_per_fold, run_stacking
    from ..stack.stage import reduce_embeddings

    split = _split(fs)
    n = len(fs.names)
    dim, seed = scfg.embedding_dim, scfg.seed
    oof = [pd.concat([_rows(fs.probs[m][k], ids[0]) for k, ids in split.items()], ignore_index=True) for m in range(n)]
    test = [average_folds([_rows(fs.probs[m][k], ids[2]) for k, ids in split.items()], fs.average[m]) for m in range(n)]
    if design == "stacked":
        return run_stacking(fs.meta, fs.folds, oof, test, scfg, source_names=fs.names, progress=False)
    scfg = scfg.embedding_level()

    def joined(parts: list[pd.DataFrame]) -> pd.DataFrame:
        return pd.concat([p.set_index("image_id") for p in parts], axis=1, join="outer").reset_index()

    if design == "mixture":  # OOF embeddings from the model that did not see the image; test: mean over fold models
        xo, xt = [], []
        for m in range(n):
            ids = np.concatenate([ids[0] for ids in split.values()])
            emb = np.concatenate([_emb(fs, m, k, ids[0])[1] for k, ids in split.items()])
            tids = next(iter(split.values()))[2]
            tmean = np.mean([_emb(fs, m, k, tids)[1] for k in split], axis=0)
            o, t = reduce_embeddings((ids, emb), (tids, tmean), dim, prefix=f"m{m}", seed=seed)
            xo.append(o)
            xt.append(t)
        return run_stacking(fs.meta, fs.folds, oof, test, scfg, joined(xo), joined(xt), fs.names, progress=False)
    if design == "per_fold":
        inputs = {}
        for k, (held, _, tids) in split.items():
            parts = [
                reduce_embeddings(_emb(fs, m, k, held), _emb(fs, m, k, tids), dim, f"m{m}", seed) for m in range(n)
            ]
            inputs[k] = FoldInputs(
                [_rows(fs.probs[m][k], held) for m in range(n)],
                [_rows(fs.probs[m][k], tids) for m in range(n)],
                joined([p[0] for p in parts]),
                joined([p[1] for p in parts]),
            )
        return run_per_fold(fs.meta, fs.folds, inputs, scfg, source_names=fs.names, progress=False)
    if design == "second_place":
        inputs = {}
        for k, (held, seen, tids) in split.items():
            parts = [
                project_fold_model(_emb(fs, m, k, seen), _emb(fs, m, k, held), _emb(fs, m, k, tids), dim, f"m{m}", seed)
                for m in range(n)
            ]
            inputs[k] = InSampleInputs(
                [_rows(fs.probs[m][k], seen) for m in range(n)],
                [_rows(fs.probs[m][k], held) for m in range(n)],
                [_rows(fs.probs[m][k], tids) for m in range(n)],
                *(joined([p[i] for p in parts]) for i in range(3)),
            )
        return run_second_place(fs.meta, fs.folds, inputs, scfg, source_names=fs.names, progress=False)
    raise ValueError(f"unknown design {design}; choose from {', '.join(DESIGNS)}")


def score(result, fs: FirstStage) -> tuple[float, float]:
    """(OOF, test) weighted log loss of a StackResult, on the same labelled images for every design."""
    y = fs.folds.set_index("image_id")[L]
    oof = result.oof.set_index("image_id").loc[y.index, L].to_numpy(np.float64)
    test = metrics.score_frames(fs.truth, result.test)["weighted_log_loss"]
    return metrics.weighted_log_loss(y.to_numpy(np.float64), oof), test


def compare(fs: FirstStage, scfg: StackConfig, seeds=SEEDS, designs=DESIGNS) -> dict[str, list[tuple[float, float]]]:
    """Every design at every stack seed; prints one line per fit as it ends, then mean and spread per design."""
    import dataclasses

    out: dict[str, list[tuple[float, float]]] = {}
    for design in designs:
        for s in seeds:
            t0 = time.process_time()
            with contextlib.redirect_stderr(io.StringIO()):
                result = fit_design(design, fs, dataclasses.replace(scfg, seed=s))
            o, t = score(result, fs)
            out.setdefault(design, []).append((o, t))
            print(f"layout_{design}_seed{s}: oof {o:.5f} test {t:.5f} ({time.process_time() - t0:.0f} CPU s)")
    for design, rows in out.items():
        arr = np.array(rows)
        for i, what in enumerate(("oof", "test")):
            print(
                f"layout_{design}_{what}_log_loss: {arr[:, i].mean():.5f} "
                f"(sd {arr[:, i].std(ddof=1) if len(arr) > 1 else 0.0:.5f}, seeds {', '.join(map(str, seeds))})"
            )
    return out


def simulate_layouts(ratio: float, scale: float, seeds=SEEDS) -> dict[float, dict[str, list[tuple[float, float]]]]:
    """per_fold against second_place on the simulated first stage (`bench.layout_sim`) at `scale` of the
    competition, with no in-sample gap (gamma 1) and with the gap whose in-sample / OOF loss ratio is `ratio`."""
    import dataclasses

    from . import layout_sim

    gammas = sorted({1.0, layout_sim.gamma_for(ratio)}, reverse=True)
    out: dict[float, dict[str, list[tuple[float, float]]]] = {}
    for gamma in gammas:
        sim, parts = layout_sim.simulated(scale, gamma)
        print(
            f"layouts_sim[gamma={gamma:.2f}]_data: {len(sim.oof)} train slices in {sim.folds['series_id'].nunique()} "
            f"series, {len(sim.test)} test slices, in-sample/OOF first-stage loss "
            f"{layout_sim.loss_ratio(sim, parts):.3f}"
        )
        for design in ("per_fold", "second_place"):
            for s in seeds:
                o, t = layout_sim.fit(design, sim, parts, dataclasses.replace(StackConfig(), seed=s))
                out.setdefault(gamma, {}).setdefault(design, []).append((o, t))
            arr = np.array(out[gamma][design])
            print(
                f"layouts_sim[gamma={gamma:.2f}]_{design}: oof {arr[:, 0].mean():.5f} (sd {arr[:, 0].std(ddof=1):.5f}) "
                f"test {arr[:, 1].mean():.5f} (sd {arr[:, 1].std(ddof=1):.5f}), seeds {', '.join(map(str, seeds))}"
            )
    return out


def bench_stack_layouts(_mini: Path | None, scale: float = 0.02, runs: str | Path = "runs") -> None:
    """The demo's first stage (measured), then the simulation at `scale` with the in-sample gap measured here."""
    fs = demo_first_stage(runs)
    truth_prior = fs.folds[L].to_numpy(np.float64).mean(0, keepdims=True)
    y = fs.truth[L].to_numpy(np.float64)
    print(f"layouts_prior_test_log_loss: {metrics.weighted_log_loss(y, np.repeat(truth_prior, len(y), 0)):.5f}")
    gap = first_stage_gap(fs)
    for key, value in gap.items():
        print(f"{key}: {value:.5f}")
    ratio = float(
        np.mean([gap[f"first_stage_in_sample_log_loss[{n}]"] / gap[f"first_stage_oof_log_loss[{n}]"] for n in fs.names])
    )
    print(f"layouts_first_stage_in_sample_over_oof: {ratio:.3f}")
    cfg: Config = config.load("demo")
    compare(fs, cfg.stack)
    simulate_layouts(ratio, scale)
