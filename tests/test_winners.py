"""Issue 26: submit's choice among every stage (and a blend), a stacker that stops on its own validation, compact
embeddings written only when a stage reads them, and the competition-scale second-stage bench at a tiny scale."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ich_kaggle.core.config import StackConfig
from ich_kaggle.core.io import write_csv
from ich_kaggle.core.labels import LABELS
from ich_kaggle.core.layout import Stacked
from ich_kaggle.stack.fit import train_net
from ich_kaggle.stack.sequences import build_sequences, logit
from ich_kaggle.stack.simulate import simulate, synthetic_series_z
from ich_kaggle.submit.choose import Stage, choose

L = list(LABELS)


def _noisy(truth: pd.DataFrame, noise: np.ndarray, bias: float = 0.0) -> pd.DataFrame:
    """Predictions: the labels' logit signal plus the given noise (and a calibration bias)."""
    y = truth[L].to_numpy(np.float64)
    p = 1 / (1 + np.exp(-(np.where(y == 1, 2.0, -3.0) + noise + bias)))
    return pd.DataFrame(p, columns=L).assign(image_id=truth["image_id"].to_numpy())[["image_id", *L]]


def test_submit_chooses_the_lowest_oof_stage_and_a_blend_only_when_it_measures_better(tmp_path):
    rng = np.random.default_rng(0)
    sim = simulate(n_series=60, k=3, seed=3, structure=synthetic_series_z(50, rng))
    truth = sim.folds[["image_id", *L]]
    shape = (len(truth), len(L))
    first = _noisy(truth, rng.normal(0, 2.0, shape))
    a, b = rng.normal(0, 1.2, shape), rng.normal(0, 1.2, shape)  # two stacks with independent errors

    def stages(frames: dict[str, pd.DataFrame]) -> list[Stage]:
        out = []
        for name, frame in frames.items():
            write_csv(frame, tmp_path / f"{name}_oof.csv")
            write_csv(frame, tmp_path / f"{name}_test.csv")
            out.append(Stage(name, tmp_path / f"{name}_test.csv", tmp_path / f"{name}_oof.csv"))
        return out

    blend_dir = Stacked(tmp_path / "blend")
    # independent errors: their mean beats each, so the blend is chosen and written
    chosen, losses = choose(
        stages({"first_stage": first, "stacked": _noisy(truth, a), "stacked_embeddings": _noisy(truth, b)}),
        truth,
        blend_dir,
    )
    assert set(losses) == {"first_stage", "stacked", "stacked_embeddings", "blend"}
    assert chosen.name == "blend" and losses["blend"] == min(losses.values())
    blended = pd.read_csv(blend_dir.test)
    stacked = pd.read_csv(tmp_path / "stacked_test.csv")
    emb = pd.read_csv(tmp_path / "stacked_embeddings_test.csv")
    np.testing.assert_allclose(blended[L], (stacked[L] + emb[L]) / 2, rtol=1e-6)
    # one stack far better than the other: that stack, not their blend
    good = _noisy(truth, 0.3 * a)
    chosen, losses = choose(
        stages({"first_stage": first, "stacked": _noisy(truth, a, bias=1.0), "stacked_embeddings": good}),
        truth,
        blend_dir,
    )
    assert chosen.name == "stacked_embeddings" and losses["stacked_embeddings"] == min(losses.values())
    assert losses["blend"] > losses["stacked_embeddings"]  # measured, written, not chosen
    # a stack worse than the first stage: the first stage (the blend of the two is worse than it too)
    chosen, losses = choose(stages({"first_stage": first, "stacked": _noisy(truth, 3 * a, bias=2.0)}), truth, blend_dir)
    assert chosen.name == "first_stage" and losses["first_stage"] == min(losses.values())


def _sequences(n_series: int, seed: int):
    rng = np.random.default_rng(seed)
    sim = simulate(n_series=n_series, k=5, seed=seed, noise=2.0, structure=synthetic_series_z(80, rng))
    frame = sim.folds.merge(sim.meta[["image_id", "slice_rank", "z", "series_len"]], on="image_id")
    frame = frame.merge(sim.oof, on="image_id", suffixes=("", "_p"))
    values = logit(frame[[f"{c}_p" for c in L]].to_numpy())
    return build_sequences(frame, values, frame[L].to_numpy(np.float32), frame["fold"].to_numpy())


def test_the_stacker_stops_on_its_validation_not_on_a_cap():
    defaults = StackConfig()
    assert defaults.max_steps == 0 and defaults.threads == 1  # no step cap; one thread per process
    seqs = _sequences(120, 5)
    scfg = StackConfig(hidden=16, layers=1, epochs=200, batch_series=16, lr=5e-3, patience=2)
    curve: list[dict] = []
    train_net(seqs, scfg, 1, seed=0, curve=curve)
    steps_per_epoch = -(-int(round(len(seqs) * (1 - scfg.val_fraction))) // scfg.batch_series)
    assert curve[-1]["stop"] == "validation" and curve[-1]["step"] < 200 * steps_per_epoch
    best = min(range(len(curve)), key=lambda i: curve[i]["val_loss"])
    assert len(curve) - 1 - best == scfg.patience  # stopped `patience` validations after the best one
    # the time budget is a safety net: a budget of ~0 stops after the first step, and says so
    curve = []
    train_net(
        seqs, StackConfig(hidden=16, layers=1, epochs=200, batch_series=16, max_seconds=1e-9), 1, seed=0, curve=curve
    )
    assert curve[-1]["stop"] == "time" and curve[-1]["step"] == 1


def test_stack_scale_bench_prints_each_design_and_the_default_figures(capsys):
    """`make bench --what stack-scale` at a tiny scale (tests are never timed): the lines the issue tracks."""
    from ich_kaggle.bench.stack_scale import bench_stack_scale

    bench_stack_scale(
        None,
        scale=0.004,
        members=2,
        designs=("probs", "per_fold"),
        scfg=StackConfig(hidden=8, layers=1, epochs=2, embedding_dim=4),
    )
    out = capsys.readouterr().out
    for design in ("probs", "per_fold"):
        for figure in ("wall_s", "cpu_s", "peak_rss_gb", "disk_gb", "oof_log_loss"):
            assert f"stack_scale[{design}]_{figure}: " in out
    cpu = float(out.split("stack_scale_cpu_s: ")[1].split()[0])
    rss = float(out.split("stack_scale_peak_rss_gb: ")[1].split()[0])
    assert cpu > 0 and 0 < rss < 8


def test_embeddings_are_written_only_when_read_and_kept_as_the_components_the_stack_uses(tmp_path):
    """predict's embedding mode follows the second stage; per_fold keeps a whitened float16 PCA fitted once per fold
    model (the end-to-end files are checked in test_state's per_fold test and test_predict)."""
    from ich_kaggle.predict.compact import Projection, fit_projection
    from ich_kaggle.predict.stage import embedding_mode

    assert embedding_mode(StackConfig()) == "none"  # no stage reads them: none written
    assert embedding_mode(StackConfig(embedding_stage=True)) == "pca16"
    assert embedding_mode(StackConfig(use_embeddings=True, embedding_space="mixture")) == "full"
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(3000, 3)) * [5.0, 3.0, 2.0]  # three strong directions in 256-d noise
    basis = np.linalg.qr(rng.normal(size=(256, 256)))[0][:3]
    emb = (signal @ basis + rng.normal(0, 0.1, (3000, 256))).astype(np.float16)
    proj = fit_projection(emb, 8, seed=0)
    proj.save(tmp_path / "pca.npz")
    out = Projection.load(tmp_path / "pca.npz").apply(emb)
    assert out.shape == (3000, 8) and out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32).std(0), 1.0, atol=0.05)  # whitened
    # the leading components span the signal's directions
    overlap = np.linalg.svd(proj.components[:3] @ basis.T, compute_uv=False)
    assert overlap.min() > 0.99
