"""Training engine end to end on tiny data (CPU): files, log columns, resume == uninterrupted, OOF, checkpoints."""

from __future__ import annotations

import logging
import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

from ich_kaggle.core.labels import LABELS
from ich_kaggle.core import config
from ich_kaggle import train
from ich_kaggle.engine.logs import LOG_COLUMNS
from ich_kaggle.engine.optim import build_optimizer, build_scheduler, warmup_cosine
from ich_kaggle.core.errors import UserError
from ich_kaggle.models.checkpoint import clean_state_dict, load_checkpoint, read_checkpoint
from ich_kaggle.core.layout import Layout
from train_helpers import FAST  # tiny and fast: random init, 32 px, few images per epoch


@pytest.fixture(scope="module")
def comp(competition, tmp_path_factory) -> Layout:
    """The session's synthetic competition (shared, read only) with this module's own work folder."""
    return Layout.of(competition(seed=0), tmp_path_factory.mktemp("train") / "work")


def _cfg(*extra: str) -> config.Config:
    return config.load("tiny", [*FAST, *extra])


def test_one_epoch_writes_every_output(comp, tmp_path, caplog):
    cfg = _cfg("train.epochs=1")
    fdir = train.train_fold(cfg, comp, 0, runs=tmp_path / "runs")
    assert fdir == tmp_path / "runs" / "tiny" / "fold0"
    for name in (
        "best.pt",
        "last.pt",
        "log.csv",
        "curves.png",
        "oof.csv",
        "oof_embeddings.npz",
        "config.yaml",
        "train.log",
        "done.json",
    ):
        assert (fdir / name).exists(), name
    log = pd.read_csv(fdir / "log.csv")
    assert list(log.columns) == LOG_COLUMNS and len(log) == 1
    assert log["train_images_per_s"].iloc[0] > 0 and np.isfinite(log["val_weighted_log_loss"].iloc[0])
    folds = pd.read_csv(comp.folds_csv)
    val = folds[folds["fold"] == 0]
    oof = pd.read_csv(fdir / "oof.csv")
    assert list(oof.columns) == ["image_id", *LABELS]
    assert sorted(oof["image_id"]) == sorted(val["image_id"].astype(str))
    assert oof[list(LABELS)].to_numpy().min() > 0 and oof[list(LABELS)].to_numpy().max() < 1
    emb = np.load(fdir / "oof_embeddings.npz")
    assert emb["emb"].dtype == np.float16 and emb["emb"].shape[0] == len(val)
    assert list(emb["image_id"]) == list(oof["image_id"])
    assert config.load(str(fdir / "config.yaml")).train.epochs == 1
    # the validation metric logged for the only epoch is the OOF metric of best.pt
    from ich_kaggle.core import metrics

    truth = val.set_index("image_id").loc[oof["image_id"], list(LABELS)].to_numpy()
    score = metrics.weighted_log_loss(truth, oof[list(LABELS)].to_numpy())
    assert score == pytest.approx(log["val_weighted_log_loss"].iloc[0], rel=1e-4)
    assert json.loads((fdir / "done.json").read_text())["n_val"] == len(val)

    # load_checkpoint rebuilds the network without any weights file and reproduces the OOF predictions
    model, cfg2 = load_checkpoint(fdir / "best.pt")
    assert not model.training and cfg2.to_dict() == cfg.to_dict()
    from ich_kaggle.data.dataset import SliceDataset
    from ich_kaggle.data.transforms import build_eval_transforms

    ds = SliceDataset(oof.head(4), comp, cfg2, transform=build_eval_transforms(cfg2))
    x = torch.stack([ds[i][0] for i in range(4)])
    with torch.no_grad():
        p = torch.sigmoid(model(x)).numpy()
    np.testing.assert_allclose(p, oof[list(LABELS)].to_numpy()[:4], atol=1e-5)

    # a finished fold is not retrained, and skipping it writes nothing (it works in a read-only runs folder)
    mtime = (fdir / "best.pt").stat().st_mtime_ns
    before = {p.name: p.stat().st_mtime_ns for p in fdir.iterdir()}
    with caplog.at_level(logging.INFO, logger="ich_kaggle"):
        train.train_fold(cfg, comp, 0, runs=tmp_path / "runs")
    assert (fdir / "best.pt").stat().st_mtime_ns == mtime
    assert "already trained" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in fdir.iterdir()} == before
    # --force starts again
    train.train_fold(cfg, comp, 0, runs=tmp_path / "runs", force=True)
    assert (fdir / "best.pt").stat().st_mtime_ns != mtime


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted(comp, tmp_path):
    cfg = _cfg("train.epochs=2", "augment.window_jitter=0.5", "train.scheduler=onecycle")
    a = train.train_fold(cfg, comp, 1, runs=tmp_path / "a")
    b = train.train_fold(cfg, comp, 1, runs=tmp_path / "b", stop_after_epochs=1)
    assert (b / "last.pt").exists() and not (b / "oof.csv").exists()
    assert read_checkpoint(b / "last.pt")["epoch"] == 1
    train.train_fold(cfg, comp, 1, runs=tmp_path / "b")
    assert "resuming fold 1 of tiny from epoch 1/2" in (b / "train.log").read_text()
    wa = read_checkpoint(a / "last.pt")["model"]
    wb = read_checkpoint(b / "last.pt")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la, lb = pd.read_csv(a / "log.csv"), pd.read_csv(b / "log.csv")
    np.testing.assert_allclose(la["val_weighted_log_loss"], lb["val_weighted_log_loss"], rtol=1e-6)
    pd.testing.assert_frame_equal(pd.read_csv(a / "oof.csv"), pd.read_csv(b / "oof.csv"))


@pytest.mark.slow
def test_weight_average_is_validated_saved_and_resumed(comp, tmp_path):
    """train.ema: the moving average of the weights is what is validated and kept as best.pt; last.pt holds the
    raw weights and the average, and a resumed run ends at the same average as an uninterrupted one."""
    from ich_kaggle.models.checkpoint import load_checkpoint

    cfg = _cfg("train.epochs=2", "train.ema=0.9")
    a = train.train_fold(cfg, comp, 1, runs=tmp_path / "a")
    last, best = read_checkpoint(a / "last.pt"), read_checkpoint(a / "best.pt")
    assert last["ema"]["steps"] == 2 * 4  # 32 images per epoch in batches of 8: one update per optimizer step
    average, raw = last["ema"]["weights"], last["model"]
    moved = [k for k in raw if raw[k].is_floating_point() and not torch.equal(raw[k], average[k])]
    assert len(moved) > len(raw) // 2  # the average is not the raw weights
    kept = best["model"]
    assert all(torch.equal(kept[k], average[k]) for k in kept) if best["epoch"] == 2 else kept.keys() == raw.keys()
    net, _ = load_checkpoint(a / "best.pt")  # the average loads as an ordinary model
    x = torch.rand(2, 3, 32, 32)
    assert torch.isfinite(net.eval()(x)).all()

    b = train.train_fold(cfg, comp, 1, runs=tmp_path / "b", stop_after_epochs=1)
    assert read_checkpoint(b / "last.pt")["ema"]["steps"] == 4
    train.train_fold(cfg, comp, 1, runs=tmp_path / "b")
    resumed = read_checkpoint(b / "last.pt")["ema"]["weights"]
    assert all(torch.equal(resumed[k], average[k]) for k in average)
    pd.testing.assert_frame_equal(pd.read_csv(a / "oof.csv"), pd.read_csv(b / "oof.csv"))


def test_weight_average_hook_state_round_trip_mid_run(tmp_path):
    """The EMA hook's state_dict, saved mid-run and loaded into a fresh hook on a fresh network (what a resumed fold
    does with last.pt), ends at the same average as a run that never stopped; a last.pt without it is one line."""
    from ich_kaggle.engine.ema import WeightAverage
    from ich_kaggle.engine.hooks import Hooks

    def steps(net, hooks, which):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)  # stateless: a fresh one per leg changes nothing
        for i in which:
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
            hooks.after_step()

    def fresh(seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        return net, Hooks([WeightAverage(net, 0.9)])

    net_a, hooks_a = fresh(0)
    steps(net_a, hooks_a, range(6))
    net_b, hooks_b = fresh(0)
    steps(net_b, hooks_b, range(3))
    torch.save({"model": net_b.state_dict(), **hooks_b.state_dict()}, tmp_path / "last.pt")
    ckpt = torch.load(tmp_path / "last.pt")
    assert set(ckpt) == {"model", "ema"} and ckpt["ema"]["steps"] == 3  # the key checkpoints have always used
    net_c, hooks_c = fresh(1)  # other initial weights: everything must come from the checkpoint
    net_c.load_state_dict(ckpt["model"])
    hooks_c.load_state_dict(ckpt, tmp_path / "last.pt")
    steps(net_c, hooks_c, range(3, 6))
    done, resumed = hooks_a.weights(net_a).state_dict(), hooks_c.weights(net_c).state_dict()
    assert hooks_c.weights(net_c) is not net_c and list(hooks_c)[0].steps == 6
    assert all(torch.equal(done[k], resumed[k]) for k in done)
    with pytest.raises(UserError, match=r"last.pt holds no 'ema' state.*--force"):
        hooks_c.load_state_dict({"model": ckpt["model"]}, tmp_path / "last.pt")


def test_steps_per_epoch_are_the_loader_length():
    """`batches_per_epoch` counts what `train_loader` yields without building it, on one rank and several."""
    from ich_kaggle.engine.dist import DistInfo
    from ich_kaggle.engine.plan import batches_per_epoch, train_loader

    cfg = _cfg()
    for rows in (1, 5, 8, 9, 31, 32, 33, 100):
        for world in (1, 2, 3, 4):
            for batch in (1, 3, 8, 40):
                ranks = [DistInfo(rank=r, world_size=world) for r in range(world)]
                counts = {len(train_loader(range(rows), np.arange(rows), cfg, info, batch, 0)) for info in ranks}
                assert counts == {batches_per_epoch(rows, DistInfo(world_size=world), batch)}, (rows, world, batch)


def test_resume_with_changed_config_is_a_user_error(comp, tmp_path):
    cfg = _cfg("train.epochs=2")
    cut = train.train_fold(cfg, comp, 2, runs=tmp_path, stop_after_epochs=1)
    with pytest.raises(UserError, match="different config.*train.lr.*--force"):
        train.train_fold(_cfg("train.epochs=2", "train.lr=0.5"), comp, 2, runs=tmp_path)
    with pytest.raises(UserError, match="different config.*data.crop_margin"):
        train.train_fold(_cfg("train.epochs=2", "data.crop_margin=0.08"), comp, 2, runs=tmp_path)
    with pytest.raises(UserError, match="fold 7 does not exist"):
        train.train_fold(cfg, comp, 7, runs=tmp_path)
    # a fold cut before a key existed: trained as that key's behaviour was then. Before `data.crop_square`, crops
    # were stretched (not today's default): refused; before `data.crop_margin`, the margin was its default: resumes
    last = cut / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    del ckpt["config"]["data"]["crop_margin"]
    square = ckpt["config"]["data"].pop("crop_square")
    torch.save(ckpt, last)
    with pytest.raises(UserError, match=r"different config.*data.crop_square\b"):
        train.train_fold(cfg, comp, 2, runs=tmp_path)
    ckpt["config"]["data"]["crop_square"] = square
    torch.save(ckpt, last)
    fdir = train.train_fold(cfg, comp, 2, runs=tmp_path)
    assert list(pd.read_csv(fdir / "log.csv")["epoch"]) == [1, 2]


def test_corrupt_cache_file_is_skipped_not_fatal(comp, tmp_path):
    from ich_kaggle.data import cache, preprocess
    from ich_kaggle.data.folds import load_folds

    layout = Layout.of(comp.data, tmp_path / "work")  # a private cache we may damage
    preprocess.ensure(layout)
    folds = load_folds(layout, k=3, seed=0)
    victims = folds[folds["fold"] != 0]["image_id"].astype(str).head(3).tolist()

    def damage(image_id: str, data: bytes) -> None:  # as bit rot: size and mtime kept, so preprocess does not see it
        path = cache.cache_path(layout, image_id)
        st = path.stat()
        path.write_bytes((data * (st.st_size // len(data) + 1))[: st.st_size])
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    for image_id in victims:
        damage(image_id, b"this is not a cached slice")
    fdir = train.train_fold(_cfg("train.epochs=1", "train.max_images_per_epoch=0"), layout, 0, runs=tmp_path / "runs")
    assert (fdir / "oof.csv").exists()
    text = (fdir / "train.log").read_text()
    assert all(v in text for v in victims) and "replaced by another training image" in text
    # a cache that is broken throughout ends the run with one line saying what to do, even from a worker process
    for image_id in folds["image_id"].astype(str):
        damage(image_id, b"garbage")
    with pytest.raises(UserError, match="unreadable images in a row") as err:
        train.train_fold(_cfg("train.epochs=1", "data.num_workers=1"), layout, 0, runs=tmp_path / "runs2")
    assert "\n" not in str(err.value)


def test_schedules_and_optimizers():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.01)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 6))
    for opt, sched in (("adamw", "cosine"), ("adam", "onecycle"), ("sgd", "constant")):
        cfg = config.load(
            "tiny",
            [
                f"train.optimizer={opt}",
                f"train.scheduler={sched}",
                "train.nesterov=true",
                "train.warmup_epochs=1",
                "train.epochs=2",
            ],
        )
        o = build_optimizer(cfg, net)
        assert [g["weight_decay"] for g in o.param_groups] == [cfg.train.weight_decay, 0.0]  # no decay on norm/bias
        s = build_scheduler(cfg, o, steps_per_epoch=5)
        lrs = []
        for _ in range(10):
            lrs.append(o.param_groups[0]["lr"])
            o.step()
            s.step()
        assert max(lrs) == pytest.approx(cfg.train.lr, rel=0.05)
        if sched != "constant":
            assert lrs[-1] < cfg.train.lr / 5
        assert lrs[0] < cfg.train.lr  # warm-up
    assert isinstance(o, torch.optim.SGD) and o.param_groups[0]["nesterov"]


def test_lr_find_writes_plot_and_suggestion(comp, tmp_path, capsys):
    lr = train.lr_find(_cfg(), comp, 0, runs=tmp_path)
    fdir = tmp_path / "tiny" / "fold0"
    sweep = pd.read_csv(fdir / "lr_find.csv")
    assert (fdir / "lr_find.png").exists() and len(sweep) >= 10
    assert (np.diff(sweep["lr"]) > 0).all()
    assert sweep["lr"].min() <= lr <= sweep["lr"].max() and math.isfinite(lr)
    assert "suggested lr" in capsys.readouterr().out
    assert not (fdir / "last.pt").exists()


def test_checkpoint_prefixes_are_stripped():
    state = {"module._orig_mod.head.fc.weight": torch.ones(1), "_orig_mod.module.x": torch.zeros(1), "y": torch.ones(2)}
    assert list(clean_state_dict(state)) == ["head.fc.weight", "x", "y"]
    with pytest.raises(UserError, match="not found"):
        read_checkpoint("/nonexistent/best.pt")


@pytest.mark.slow
def test_real_mini_fold_oof_covers_the_fold(mini_dir, tmp_path):
    """Real RSNA slices: patient-grouped folds, one short epoch, OOF for every labelled slice of fold 0."""
    layout = Layout.of(mini_dir, tmp_path / "work")
    cfg = _cfg("train.epochs=1", "train.max_images_per_epoch=24", "cv.k=5")
    fdir = train.train_fold(cfg, layout, 0, runs=tmp_path / "runs")
    folds = pd.read_csv(layout.folds_csv)
    assert folds.groupby("patient_id")["fold"].nunique().max() == 1  # no patient in two folds
    oof = pd.read_csv(fdir / "oof.csv")
    assert sorted(oof["image_id"]) == sorted(folds.loc[folds["fold"] == 0, "image_id"].astype(str))
    assert oof[list(LABELS)].notna().all().all()


@pytest.mark.slow
def test_real_mini_all_folds_cover_all_616_slices(mini_dir, tmp_path):
    layout = Layout.of(mini_dir, tmp_path / "work")
    cfg = _cfg("train.epochs=1", "train.max_images_per_epoch=16", "cv.k=3", "data.image_size=24")
    oof = pd.concat(
        [pd.read_csv(train.train_fold(cfg, layout, k, runs=tmp_path / "runs") / "oof.csv") for k in range(3)]
    )
    assert len(oof) == oof["image_id"].nunique() == 616


def _weights(fdir):
    return read_checkpoint(fdir / "last.pt")["model"]


def test_gradient_accumulation_equals_the_full_batch(comp, tmp_path):
    """batch 4 x 2 accumulation steps == batch 8 (BatchNorm-free net, so half batches carry the same gradients)."""
    from train_helpers import NAME

    base = [f"model.backbone={NAME}", "model.dropout=0", "train.epochs=1", "train.lr=0.003"]
    full = train.train_fold(_cfg(*base), comp, 0, runs=tmp_path / "full")
    acc = train.train_fold(_cfg(*base, "train.batch_size=4", "train.accum_steps=2"), comp, 0, runs=tmp_path / "acc")
    wf, wa = _weights(full), _weights(acc)
    for k in wf:
        torch.testing.assert_close(wa[k], wf[k], rtol=1e-4, atol=1e-6)
    assert read_checkpoint(full / "last.pt")["scheduler"]["last_epoch"] == 4  # 32 images / 8 = 4 optimizer steps
    assert read_checkpoint(acc / "last.pt")["scheduler"]["last_epoch"] == 4


def test_amp_channels_last_progressive_sizes_oversampling_freeze(comp, tmp_path):
    """The optional paths run together: bf16 autocast on CPU, channels_last, 16 -> 32 px, oversampling, frozen body."""
    from train_helpers import NAME

    cfg = _cfg(
        f"model.backbone={NAME}",
        "train.epochs=2",
        "train.amp=bf16",
        "train.channels_last=true",
        "train.progressive_sizes=[16]",
        "train.balance=oversample",
        "model.freeze=backbone",
        "train.optimizer=sgd",
        "train.nesterov=true",
        "train.loss=focal",
        "train.class_weights=frequency",
        "data.min_brain_fraction=0.05",
        "data.neighbors=1",
    )
    fdir = train.train_fold(cfg, comp, 2, runs=tmp_path)
    log = pd.read_csv(fdir / "log.csv")
    assert len(log) == 2 and np.isfinite(log["train_loss"]).all()
    w0 = read_checkpoint(fdir / "last.pt")["model"]
    torch.manual_seed(cfg.train.seed)
    from ich_kaggle import models

    init = models.build_model(cfg.model, in_channels=9).state_dict()
    assert torch.equal(init["backbone.net.0.weight"], w0["backbone.net.0.weight"])  # frozen body did not move
    assert not torch.equal(init["head.fc.weight"], w0["head.fc.weight"])  # the head trained
    assert (comp.work / "brain_fraction.csv").exists()
    assert np.load(fdir / "oof_embeddings.npz")["emb"].shape[1] == 16
    # a config that asks for mixed precision is a GPU config: on the CPU one line says how slow it is, once
    warned = [ln for ln in (fdir / "train.log").read_text().splitlines() if "training on the CPU" in ln]
    assert len(warned) == 1 and "is a GPU config (train.amp=bf16)" in warned[0], warned
    assert re.search(r"[0-9.]+ images/s measured, ~[0-9.]+ h for the 64 training images left", warned[0]), warned


def test_min_brain_fraction_drops_empty_training_slices(comp):
    from ich_kaggle.data.dataset import drop_empty_slices

    folds = pd.read_csv(comp.folds_csv, dtype={"image_id": str})
    kept = drop_empty_slices(folds, comp, 0.05)
    frac = pd.read_csv(comp.work / "brain_fraction.csv").set_index("image_id")["brain_fraction"]
    dropped = set(folds["image_id"]) - set(kept["image_id"])
    assert dropped and all(frac[i] < 0.05 for i in dropped)  # the slices above/below the brain
    assert set(folds.loc[folds["any"] == 1, "image_id"]) <= set(kept["image_id"])  # positives always stay
    assert len(drop_empty_slices(folds, comp, 0.0)) == len(folds)


def test_cli_train_reports_user_errors_in_one_line(comp, tmp_path, capsys):
    from ich_kaggle.cli import main

    rc = main(
        [
            "train",
            "--config",
            "tiny",
            "--data",
            str(comp.data),
            "--work",
            str(comp.work),
            "--runs",
            str(tmp_path),
            "--fold",
            "9",
            "--set",
            "cv.k=3",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "fold 9 does not exist" in err
    assert not (tmp_path / "tiny" / "fold9").exists()


def test_stop_env_var_and_lr_suggestion(monkeypatch):
    from ich_kaggle.engine.loop import _stop_after
    from ich_kaggle.engine.lrfind import suggest_lr

    monkeypatch.delenv(train.STOP_ENV, raising=False)
    assert _stop_after(None) is None and _stop_after(2) == 2
    monkeypatch.setenv(train.STOP_ENV, "1")
    assert _stop_after(None) == 1
    lrs = np.logspace(-6, 0, 61)
    loss = 1.0 / (1 + np.exp(4 * (np.log10(lrs) + 3)))  # falls fastest at 1e-3
    loss[-10:] = np.linspace(0.1, 5, 10)  # diverges at the end
    assert 3e-4 < suggest_lr(lrs, loss) < 3e-3


def test_head_bias_starts_at_the_label_prior():
    from train_helpers import NAME

    from ich_kaggle import models
    from ich_kaggle.engine.loop import init_head_bias

    cfg = config.load("tiny", [f"model.backbone={NAME}", "model.pretrained=false"])
    net = models.build_model(cfg.model, in_channels=3)
    labels = np.zeros((200, 6))
    labels[:50, 0] = 1
    labels[:2, 1] = 1  # 1% epidural; subtypes never seen are clipped to 1e-4
    assert init_head_bias(net, labels) == 1
    p = torch.sigmoid(net.head.fc.bias.detach()).numpy()
    np.testing.assert_allclose(p, [0.25, 0.01, 1e-4, 1e-4, 1e-4, 1e-4], rtol=1e-4)
