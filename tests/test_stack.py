"""Second stage: sequences, nets, fold-wise stacking and the `stack` stage's files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SHARED
from ich_kaggle.core.labels import LABELS
from ich_kaggle.core.config import Config, StackConfig
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Layout
from ich_kaggle.stack.fit import TorchSeqs, cross_fit, inner_split, predict_net, train_net, validation_loss
from ich_kaggle.stack.nets import KINDS, SequenceNet
from ich_kaggle.stack.pipeline import run_stacking
from ich_kaggle.stack.sequences import N_POS, build_sequences, logit, reverse_inputs
from ich_kaggle.stack.simulate import real_series_z, simulate, synthetic_series_z

L = list(LABELS)
HEADERS = SHARED / "stage_1_test_dicom_headers.csv.gz"
FAST = dict(hidden=16, layers=1, epochs=6, batch_series=16, lr=5e-3, max_steps=0)


@pytest.fixture(scope="module")
def structure():
    """Real series lengths and z spacing (stage-1 test headers) when ../shared is present, else a stand-in."""
    if HEADERS.exists():
        return real_series_z(HEADERS)
    return synthetic_series_z(200, np.random.default_rng(0))


@pytest.fixture(scope="module")
def sim(structure):
    return simulate(n_series=150, test_series=10, k=5, seed=1, noise=2.5, structure=structure)


def _seqs(sim):
    frame = sim.folds.merge(sim.meta[["image_id", "slice_rank", "z", "series_len"]], on="image_id")
    frame = frame.merge(sim.oof, on="image_id", suffixes=("", "_p"))
    values = logit(frame[[f"{c}_p" for c in L]].to_numpy())
    return frame, build_sequences(frame, values, frame[L].to_numpy(np.float32), frame["fold"].to_numpy())


def _random_net(n_features: int, kind: str, seed: int = 0) -> SequenceNet:
    """A net whose learned path is active (the real init zeroes it), so padding/TTA tests are not trivially true."""
    torch.manual_seed(seed)
    net = SequenceNet(n_features, 1, kind=kind, hidden=8, layers=2, dropout=0.0)
    with torch.no_grad():
        net.out.weight.normal_(0, 0.5)
        net.skip.weight.normal_(0, 0.2)
    return net.eval()


def test_real_series_structure(structure):
    if not HEADERS.exists():
        pytest.skip(f"{HEADERS} is absent: the real series structure needs the ../shared folder")
    lengths = np.array([len(z) for z in structure])
    assert len(structure) == 2214 and lengths.min() == 20 and lengths.max() == 60
    assert all(np.all(np.diff(z) >= 0) for z in structure[:50])


def test_build_sequences_orders_pads_and_maps_back():
    frame = pd.DataFrame(
        {
            "series_id": ["b", "a", "b", "a", "a", "b", "b"],
            "slice_rank": [3, 2, 0, 0, 1, 1, 2],
            "z": [15.0, 10.0, 0.0, 0.0, 5.0, 5.0, 10.0],
            "series_len": [4, 4, 4, 4, 4, 4, 4],
        }
    )
    values = np.arange(7, dtype=np.float32)[:, None]
    seqs = build_sequences(frame, values, group=np.array([1, 0, 1, 0, 0, 1, 1]))
    assert list(seqs.series_id) == ["a", "b"] and list(seqs.lengths) == [3, 4]  # sorted by length
    assert seqs.x[0, :3, N_POS].tolist() == [3.0, 4.0, 1.0]  # a: ranks 0, 1, 2
    assert seqs.x[1, :, N_POS].tolist() == [2.0, 5.0, 6.0, 0.0]
    assert not seqs.mask[0, 3] and np.all(seqs.x[0, 3] == 0)
    assert list(seqs.group) == [0, 1]
    back = seqs.scatter(seqs.x[..., N_POS:], len(frame))
    assert np.array_equal(back[:, 0], values[:, 0])
    # a missing slice in series a (rank 2 of 4 present, rank 3 missing) shows as rel_pos < 1 at its last slice
    assert seqs.x[0, 2, 0] == pytest.approx(2 / 3)
    assert seqs.slots.tolist() == [[0, 0, 0, -1], [1, 1, 1, 1]]
    # cv.split=random: a series whose slices sit in several folds is marked -2, each slice keeps its own fold
    mixed = build_sequences(frame, values, group=np.array([1, 0, 1, 0, 0, 1, 2]))
    assert list(mixed.group) == [0, -2] and mixed.slots[1].tolist() == [1, 1, 2, 1]


def test_position_features_show_gaps_and_mirror_under_reversal():
    frame = pd.DataFrame(
        {"series_id": ["s"] * 5, "slice_rank": range(5), "z": [0.0, 5.0, 10.0, 20.0, 25.0], "series_len": 5}
    )
    seqs = build_sequences(frame, np.zeros((5, 6), np.float32))
    pos = seqs.x[0, :, :N_POS]
    assert pos[3, 1] == pytest.approx(2.0) and pos[2, 2] == pytest.approx(2.0)  # the 10 mm gap, seen from both sides
    assert pos[0, 3] == 0 and pos[0, 4] == 1 and pos[4, 4] == 0
    x = torch.from_numpy(seqs.x)
    lengths = torch.from_numpy(seqs.lengths)
    rev = reverse_inputs(x, lengths)
    assert torch.allclose(rev[0, :, 0], 1 - x[0, :, 0].flip(0))
    assert torch.allclose(rev[0, :, 1], x[0, :, 2].flip(0))
    assert torch.allclose(reverse_inputs(rev, lengths), x)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_change_results(kind):
    rng = np.random.default_rng(0)
    n_features = N_POS + 6
    short = torch.from_numpy(rng.normal(size=(1, 7, n_features)).astype(np.float32))
    batch = torch.zeros(2, 12, n_features)
    batch[0] = torch.from_numpy(rng.normal(size=(12, n_features)).astype(np.float32))
    batch[1, :7] = short[0]
    net = _random_net(n_features, kind)
    with torch.no_grad():
        alone = net(short, torch.tensor([7]))
        together = net(batch, torch.tensor([12, 7]))
    assert alone.abs().max() > 0.1
    assert torch.allclose(alone[0], together[1, :7], atol=1e-5)
    assert torch.all(together[1, 7:] == 0)


def test_reverse_tta_is_the_mean_of_forward_and_reversed(sim):
    _, seqs = _seqs(sim)
    net = _random_net(seqs.n_features, "gru_conv")
    fwd = predict_net(net, seqs, mode="forward", batch_series=32)
    rev = predict_net(net, seqs, mode="reversed", batch_series=32)
    tta = predict_net(net, seqs, mode="tta", batch_series=32)
    assert np.abs(fwd - rev)[seqs.mask].max() > 1e-3  # the two directions really differ
    np.testing.assert_allclose(tta, (fwd + rev) / 2, atol=1e-6)
    np.testing.assert_allclose(predict_net(net, seqs, reverse_tta=False), fwd, atol=1e-6)
    # reversed run by hand: reverse every series in numpy, predict forward, reverse the outputs back
    by_hand = seqs.subset(np.arange(len(seqs)))
    for i, n in enumerate(seqs.lengths):
        by_hand.x[i, :n] = seqs.x[i, :n][::-1]
        by_hand.x[i, :n, 0] = 1 - by_hand.x[i, :n, 0]
        by_hand.x[i, :n, [1, 2, 3, 4]] = by_hand.x[i, :n, [2, 1, 4, 3]]
    manual = predict_net(net, by_hand, mode="forward", batch_series=32)
    for i, n in enumerate(seqs.lengths):
        np.testing.assert_allclose(rev[i, :n], manual[i, :n][::-1], atol=1e-5)


def test_training_is_deterministic_for_a_seed(sim):
    _, seqs = _seqs(sim)
    small = seqs.subset(np.arange(40))
    scfg = StackConfig(model="gru_conv", **{**FAST, "epochs": 2})
    a = predict_net(train_net(small, scfg, 1, seed=3), small)
    b = predict_net(train_net(small, scfg, 1, seed=3), small)
    c = predict_net(train_net(small, scfg, 1, seed=4), small)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_the_stacker_stops_on_its_inner_validation_split(sim):
    """Far more epochs than needed and a high learning rate: the inner split stops training soon after its best
    validation, and the net kept is the one of that best validation (not the last one)."""
    _, seqs = _seqs(sim)
    scfg = StackConfig(model="conv", **{**FAST, "epochs": 300, "lr": 3e-2, "patience": 2, "val_fraction": 0.2})
    curve: list[dict] = []
    net = train_net(seqs, scfg, 1, seed=0, curve=curve)
    held = inner_split(len(seqs), 0.2, 0)
    batches = -(-int((~held).sum()) // scfg.batch_series)
    vals = [row["val_loss"] for row in curve]
    assert curve[0]["step"] == 0 and curve[-1]["step"] < 300 * batches / 3  # stopped long before the epoch budget
    best = int(np.argmin(vals))
    assert len(vals) == best + 1 + scfg.patience  # exactly `patience` validations without improvement, then stop
    assert validation_loss(net, TorchSeqs.of(seqs.subset(held))) == pytest.approx(vals[best], rel=1e-5)
    assert vals[best] < vals[0]  # and it did learn something before stopping
    # without a split it trains the epochs it is given
    curve = []
    train_net(
        seqs.subset(np.arange(30)),
        StackConfig(model="conv", **{**FAST, "epochs": 2, "val_fraction": 0.0}),
        1,
        seed=0,
        curve=curve,
    )
    assert curve == []


def _conv_fit(s, fold):
    """The leak tests' stacker: a small conv net, 2 epochs, a seed per fold."""
    return train_net(s, StackConfig(model="conv", **{**FAST, "epochs": 2}), 1, seed=7 + fold)


def test_stacker_oof_never_sees_its_own_fold(sim):
    """Leak detector: replacing fold 2's labels with noise must not move fold 2's OOF predictions (and does move
    the other folds', which were trained on them)."""
    _, seqs = _seqs(sim)
    clean = cross_fit(seqs, None, _conv_fit, predict_net)
    noisy_seqs = seqs.subset(np.arange(len(seqs)))
    held = noisy_seqs.group == 2
    noise = (np.random.default_rng(0).random(noisy_seqs.y[held].shape) < 0.5).astype(np.float32)
    noisy_seqs.y[held] = noise * noisy_seqs.mask[held][..., None]
    noisy = cross_fit(noisy_seqs, None, _conv_fit, predict_net)
    assert held.any() and np.array_equal(clean.oof[held], noisy.oof[held])
    assert not np.allclose(clean.oof[~held], noisy.oof[~held], atol=1e-4)
    assert clean.folds == [0, 1, 2, 3, 4]
    m = seqs.mask
    assert np.isfinite(clean.oof[m]).all()


def test_random_split_stacker_folds_are_the_image_folds_and_never_seen(sim):
    """cv.split=random (issue 15, 7a): the first stage's folds are per image, so a series has slices in several
    folds. The stacker's fold k is that same set of slices: replacing their labels with noise must not move their
    OOF predictions, and does move the others'. (The old stacker required series-grouped folds and raised.)"""
    from ich_kaggle.data.folds import random_folds

    folds = sim.folds.assign(fold=random_folds(sim.folds, 5, 0))
    frame = folds.merge(sim.meta[["image_id", "slice_rank", "z", "series_len"]], on="image_id")
    frame = frame.merge(sim.oof, on="image_id", suffixes=("", "_p"))
    seqs = build_sequences(
        frame, logit(frame[[f"{c}_p" for c in L]].to_numpy()), frame[L].to_numpy(np.float32), frame["fold"].to_numpy()
    )
    assert (seqs.group == -2).all()  # every series spans several folds
    back = seqs.scatter(seqs.slots[..., None].astype(np.float32), len(frame))[:, 0]
    assert np.array_equal(back, frame["fold"].to_numpy())  # each slice keeps its own fold

    def fit(s, fold):
        assert s.loss_mask is not None and not (s.loss_mask & (s.slots == fold)).any()
        return _conv_fit(s, fold)

    clean = cross_fit(seqs, None, fit, predict_net)
    noisy_seqs = seqs.subset(np.arange(len(seqs)))
    held = noisy_seqs.slots == 2
    noise = (np.random.default_rng(0).random(noisy_seqs.y.shape) < 0.5).astype(np.float32)
    noisy_seqs.y[held] = noise[held]
    noisy = cross_fit(noisy_seqs, None, fit, predict_net)
    assert held.any() and np.array_equal(clean.oof[held], noisy.oof[held])
    assert not np.allclose(clean.oof[~held & seqs.mask], noisy.oof[~held & seqs.mask], atol=1e-4)
    assert clean.folds == [0, 1, 2, 3, 4] and np.isfinite(clean.oof[seqs.mask]).all()
    # the whole stacker runs on such folds
    result = run_stacking(
        sim.meta, folds, [sim.oof], [sim.test], StackConfig(model="conv", **{**FAST, "epochs": 2}), progress=False
    )
    table = result.metrics.set_index("stage")["weighted_log_loss"]
    assert table["stacked"] < table["first_stage"] and sorted(result.oof["image_id"]) == sorted(sim.oof["image_id"])


def test_per_fold_second_stages_each_see_only_their_fold_model(sim):
    """stack.embedding_space=per_fold: second stage k trains on fold k's OOF only (inner cross-fit for its OOF) and
    predicts with fold model k's own test features; the test prediction is the mean over k."""
    from ich_kaggle.stack.pipeline import FoldInputs, run_per_fold

    fold_of = sim.folds.set_index("image_id")["fold"]
    rng = np.random.default_rng(0)

    def inputs(oof: pd.DataFrame) -> dict:
        out = {}
        for k in range(5):
            part = oof[oof["image_id"].map(fold_of) == k]

            def emb(f):
                return pd.DataFrame({"image_id": f["image_id"].to_numpy(), "m0e0": rng.normal(size=len(f))})

            test = sim.test.assign(**{c: np.clip(sim.test[c] * (1 + 0.02 * k), 0, 1) for c in L})
            out[k] = FoldInputs([part], [test], emb(part), emb(test))
        return out

    scfg = StackConfig(model="conv", **{**FAST, "epochs": 2}, use_embeddings=True, embedding_space="per_fold")
    clean = run_per_fold(sim.meta, sim.folds, inputs(sim.oof), scfg, progress=False)
    assert sorted(clean.oof["image_id"]) == sorted(sim.oof["image_id"])
    assert sorted(clean.test["image_id"]) == sorted(sim.test["image_id"])
    assert list(clean.metrics["stage"]) == ["first_stage", "stacked"]
    assert set(clean.curve["fold"].str.split("/").str[0]) == {"0", "1", "2", "3", "4"}
    table = clean.metrics.set_index("stage")["weighted_log_loss"]
    assert table["stacked"] < table["first_stage"]
    # fold 1's labels replaced by noise: second stage 0's OOF does not move, second stage 1's does
    rng = np.random.default_rng(0)
    noisy_folds = sim.folds.copy()
    in1 = noisy_folds["fold"] == 1
    noisy_folds.loc[in1, L] = (np.random.default_rng(1).random((int(in1.sum()), len(L))) < 0.5).astype(np.int8)
    noisy = run_per_fold(sim.meta, noisy_folds, inputs(sim.oof), scfg, progress=False)
    a, b = (r.oof.set_index("image_id")[L] for r in (clean, noisy))
    ids0, ids1 = fold_of.index[fold_of == 0], fold_of.index[fold_of == 1]
    assert np.array_equal(a.loc[ids0].to_numpy(), b.loc[ids0].to_numpy())
    assert not np.allclose(a.loc[ids1].to_numpy(), b.loc[ids1].to_numpy(), atol=1e-4)


def test_stacking_beats_the_single_slice_first_stage(sim):
    """Labels span neighbouring slices, first-stage noise is per slice: the context model must win clearly."""
    result = run_stacking(sim.meta, sim.folds, [sim.oof], [sim.test], StackConfig(model="gru", **FAST), progress=False)
    table = result.metrics.set_index("stage")["weighted_log_loss"]
    assert list(table.index) == ["first_stage", "stacked"]
    assert table["stacked"] < 0.8 * table["first_stage"]
    assert set(result.metrics.columns) == {"stage", "weighted_log_loss", *L}
    # every input image comes back exactly once, probabilities in (0, 1)
    assert sorted(result.oof["image_id"]) == sorted(sim.oof["image_id"])
    assert sorted(result.test["image_id"]) == sorted(sim.test["image_id"])
    for frame in (result.oof, result.test):
        values = frame[L].to_numpy()
        assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1


def test_pass_through_for_images_without_series(sim):
    """OOF/test images missing from the meta table keep their first-stage probabilities."""
    extra = pd.DataFrame({"image_id": ["ID_orphan"], **{c: [0.3] for c in L}})
    result = run_stacking(
        sim.meta,
        sim.folds,
        [pd.concat([sim.oof, extra])],
        [pd.concat([sim.test, extra])],
        StackConfig(model="conv", **{**FAST, "epochs": 1}),
        progress=False,
    )
    for frame in (result.oof, result.test):
        row = frame.set_index("image_id").loc["ID_orphan"]
        assert np.allclose(row[L].to_numpy(float), 0.3)


def test_two_first_stage_models_are_stacked_together(sim):
    other = sim.oof.copy()
    other[L] = np.clip(other[L].to_numpy() * 0.9 + 0.05, 0, 1)
    other_test = sim.test.copy()
    result = run_stacking(
        sim.meta,
        sim.folds,
        [sim.oof, other],
        [sim.test, other_test],
        StackConfig(model="conv", **{**FAST, "epochs": 2}),
        source_names=["a", "b"],
        progress=False,
    )
    assert list(result.metrics["stage"]) == ["first_stage", "first_stage:a", "first_stage:b", "stacked"]


# --- the stage: files in, files out ---


def _write_layout(tmp_path, sim) -> Layout:
    layout = Layout.of(tmp_path / "data", tmp_path / "work")
    layout.work.mkdir(parents=True)
    sim.meta.to_csv(layout.meta_csv, index=False)
    sim.folds.to_csv(layout.folds_csv, index=False)
    (layout.work / "folds.csv.json").write_text(json.dumps({"k": 5, "seed": 42, "images": len(sim.folds)}))
    return layout


def test_stack_stage_writes_its_files(tmp_path, sim, capsys):
    layout = _write_layout(tmp_path, sim)
    cfg = Config(name="exp")
    for key, value in {
        **FAST,
        "model": "conv",
        "epochs": 2,
        "use_embeddings": True,
        "embedding_dim": 4,
        "embedding_space": "mixture",
    }.items():
        setattr(cfg.stack, key, value)
    pred = tmp_path / "runs" / "exp" / "predictions"
    pred.mkdir(parents=True)
    sim.oof.to_csv(pred / "oof.csv", index=False)
    sim.test.to_csv(pred / "test.csv", index=False)
    rng = np.random.default_rng(0)
    for name, frame in (("oof", sim.oof), ("test", sim.test)):
        np.savez(
            pred / f"{name}_embeddings.npz",
            image_id=frame["image_id"].to_numpy(str),
            emb=rng.normal(size=(len(frame), 24)).astype(np.float16),
        )
    out = pytest.importorskip("ich_kaggle.stack.stage").stack(cfg, layout, runs=tmp_path / "runs", progress=False)
    assert out == tmp_path / "runs" / "exp" / "stack"
    oof, test, metrics = (pd.read_csv(out / f) for f in ("oof.csv", "test.csv", "metrics.csv"))
    assert list(oof.columns) == ["image_id", *L] and len(oof) == len(sim.oof)
    assert len(test) == len(sim.test) and not (out / "neighbors_test.csv").exists()
    assert list(metrics["stage"]) == ["first_stage", "stacked"]
    curve = pd.read_csv(out / "curve.csv")
    assert sorted(curve["fold"].unique()) == [0, 1, 2, 3, 4] and curve["val_loss"].notna().all()
    printed = capsys.readouterr().out
    assert "first_stage" in printed and "stacked" in printed
    assert not list(out.glob(".*.tmp"))


def test_stack_stage_uses_the_first_stage_folds(tmp_path, sim, monkeypatch):
    """cv.split=random: the stacker gets the folds the OOF came from (`fold_table`), not folds.csv's patient folds,
    and a change of cv.split makes the stack stale."""
    from ich_kaggle.core import freshness, manifest
    from ich_kaggle.core.config import CVConfig
    from ich_kaggle.data.folds import fold_table
    from ich_kaggle.stack import pipeline
    from ich_kaggle.stack.stage import prediction_dirs, stack

    layout = _write_layout(tmp_path, sim)
    cfg = Config(name="exp")
    cfg.cv.split = "random"
    cfg.stack.model, cfg.stack.epochs = "conv", 1
    pred = tmp_path / "runs" / "exp" / "predictions"
    pred.mkdir(parents=True)
    sim.oof.to_csv(pred / "oof.csv", index=False)
    sim.test.to_csv(pred / "test.csv", index=False)
    seen = {}
    real = pipeline.run_stacking

    def spy(meta, folds, *args, **kwargs):
        seen["folds"] = folds
        return real(meta, folds, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run_stacking", spy)
    out = stack(cfg, layout, runs=tmp_path / "runs", progress=False)
    used = seen["folds"].set_index("image_id")["fold"]
    want = fold_table(layout, cfg.cv).set_index("image_id")["fold"]
    patient = sim.folds.assign(image_id=sim.folds["image_id"].astype(str)).set_index("image_id")["fold"]
    assert len(used) == len(sim.folds) and used.equals(want.loc[used.index])
    assert (used != patient.loc[used.index]).mean() > 0.5  # not the patient folds of folds.csv
    dirs = prediction_dirs(cfg, tmp_path / "runs")
    assert manifest.check(out / "test.csv", freshness.stacked(dirs, layout, cfg.stack, cfg.cv)) == []
    assert "split" in freshness.stale_reason(out / "test.csv", freshness.stacked(dirs, layout, cfg.stack, CVConfig()))


def test_stack_stage_errors_are_one_line(tmp_path, sim):
    from ich_kaggle.stack.stage import stack

    layout = _write_layout(tmp_path, sim)
    with pytest.raises(UserError, match="make predict") as err:
        stack(Config(name="exp"), layout, runs=tmp_path / "runs")
    assert "\n" not in str(err.value)
    pred = tmp_path / "runs" / "exp" / "predictions"
    pred.mkdir(parents=True)
    sim.oof.drop(columns=["subdural"]).to_csv(pred / "oof.csv", index=False)
    sim.test.to_csv(pred / "test.csv", index=False)
    with pytest.raises(UserError, match="missing columns"):
        stack(Config(name="exp"), layout, runs=tmp_path / "runs")


def test_bench_prints_the_scale_figure(capsys, monkeypatch):
    """The bench at a tiny scale (tests are never timed): prints the figure names `make bench` reports."""
    from ich_kaggle.bench import stack as bench_stack

    monkeypatch.setattr(bench_stack, "Config", lambda: Config(stack=StackConfig(model="conv", **{**FAST, "epochs": 1})))
    bench_stack.bench_stack(None, train_slices=2000, test_slices=200)
    out = capsys.readouterr().out
    assert "stack_competition_scale_seconds:" in out and "stack_oof_stacked_log_loss:" in out


