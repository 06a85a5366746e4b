"""TTA inference over folds: TTA maths, fold averaging, and the predict stage's files on a tiny trained model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import train_helpers
from ich_kaggle.core.labels import LABELS
from ich_kaggle.core import config, metrics
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Layout
from ich_kaggle.core.registry import TTA
from ich_kaggle.predict.stage import average_folds, predict, wide
from ich_kaggle.predict.tta import tta_forward

L = list(LABELS)
FAST = train_helpers.FAST


class FlipInvariant(nn.Module):
    """features(x) = conv(x + hflip(x)): exactly invariant to horizontal flips."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 6)
        self.num_features = 8

    def features(self, x):
        return self.conv(x + x.flip(-1)).mean((2, 3))

    def classify(self, f):
        return self.head(f)


def test_tta_of_a_flip_invariant_model_equals_no_tta():
    net = FlipInvariant().eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        p0, f0 = tta_forward(net, x, ["identity"])
        p1, f1 = tta_forward(net, x, ["identity", "hflip"])
        p2, _ = tta_forward(net, x, ["identity", "hflip"], average="logit")
        p3, _ = tta_forward(net, x, ["identity", "shift"])
    torch.testing.assert_close(p0, p1)
    torch.testing.assert_close(f0, f1)
    torch.testing.assert_close(p0, p2)
    assert not torch.allclose(p0, p3)  # a shift is not a symmetry of this model: TTA does change something


def test_tta_averages_in_probability_or_logit_space():
    net = FlipInvariant().eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        z = torch.stack([net.classify(net.features(TTA.get(t)(x))) for t in ("identity", "scale")])
        prob, _ = tta_forward(net, x, ["identity", "scale"], average="prob")
        logit, _ = tta_forward(net, x, ["identity", "scale"], average="logit")
    torch.testing.assert_close(prob, torch.sigmoid(z).mean(0))
    torch.testing.assert_close(logit, torch.sigmoid(z.mean(0)))


def test_tta_ops_keep_shape_and_move_content():
    x = torch.zeros(1, 1, 20, 20)
    x[0, 0, 5, 5] = 1
    x[0, 0, 5, 9] = 2  # right of the first point: tells a transpose from a flip
    for name in TTA.names():  # every registered view (tests/test_registry_build.py exercises each on its own too)
        assert TTA.get(name)(x).shape == x.shape, name
    assert TTA.get("shift")(x)[0, 0, 6, 6] == 1  # 5 % of 20 px = 1 px right and down
    assert TTA.get("shift_back")(x)[0, 0, 4, 4] == 1
    assert TTA.get("hflip")(x)[0, 0, 5, 14] == 1
    assert TTA.get("transpose")(x)[0, 0, 9, 5] == 2 and TTA.get("transpose")(x)[0, 0, 5, 5] == 1
    assert TTA.get("hflip_transpose")(x)[0, 0, 10, 5] == 2 and TTA.get("hflip_transpose")(x)[0, 0, 14, 5] == 1
    rot = torch.rot90(x, k=1, dims=(-2, -1))  # hflip then transpose is a quarter turn (counter-clockwise)
    assert torch.equal(TTA.get("hflip_transpose")(x), rot)


def test_a_tta_view_the_model_never_saw_is_refused():
    from ich_kaggle.core.errors import UserError

    with pytest.raises(
        UserError,
        match=r"tta.transforms has 'transpose', a view the model never sees in training "
        r"\(augment.transpose=0\)",
    ):
        config.load("tiny", ["tta.transforms=identity,transpose"])
    cfg = config.load("tiny", ["augment.transpose=0.5", "tta.transforms=identity,hflip,transpose,hflip_transpose"])
    assert cfg.tta.transforms[-1] == "hflip_transpose"


def test_fold_averaging_beats_single_folds():
    """Fold models = the same signal + their own errors: the average is better than every single fold."""
    rng = np.random.default_rng(0)
    y = (rng.random((2000, 6)) < 0.2).astype(np.float64)
    signal = np.where(y == 1, 1.0, -2.0)
    folds = [
        wide([f"ID_{i}" for i in range(2000)], 1 / (1 + np.exp(-(signal + rng.normal(0, 1.5, y.shape)))))
        for _ in range(5)
    ]
    single = [metrics.weighted_log_loss(y, f[L].to_numpy()) for f in folds]
    for average in ("prob", "logit"):
        mean = average_folds([folds[0]] + [f.sample(frac=1, random_state=1) for f in folds[1:]], average)
        assert list(mean["image_id"]) == list(folds[0]["image_id"])  # aligned by id, not by row order
        assert metrics.weighted_log_loss(y, mean[L].to_numpy()) < min(single) - 0.02
    with pytest.raises(ValueError):
        average_folds([folds[0], folds[1].iloc[:10]])


# --- the stage on a tiny trained model ---


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from ich_kaggle import train
    from ich_kaggle.data import synth

    root = tmp_path_factory.mktemp("predict")
    data = synth.write_competition(root / "comp", seed=0, studies=12, slices=8, size=64)
    layout = Layout.of(data, root / "work")
    cfg = config.load(
        "tiny",
        [
            *FAST,
            f"model.backbone={train_helpers.NAME}",
            "train.epochs=1",
            "tta.transforms=identity,hflip,shift,scale",
            "stack.model=conv",
            "stack.epochs=2",
            "stack.hidden=8",
            "stack.batch_series=4",
        ],
    )
    runs = root / "runs"
    for fold in (0, 1):  # fold 2 stays untrained: reported, not fatal
        train.train_fold(cfg, layout, fold, runs=runs)
    return cfg, layout, runs


def test_predict_writes_every_file(trained, capsys):
    cfg, layout, runs = trained
    out = predict(cfg, layout, runs=runs)
    assert out == runs / cfg.name / "predictions"
    printed = capsys.readouterr().out
    assert "fold(s) [2] not trained" in printed
    meta = pd.read_csv(layout.meta_csv)
    folds = pd.read_csv(layout.folds_csv)
    test_ids = sorted(meta.loc[meta["split"] == "test", "image_id"])
    test = pd.read_csv(out / "test.csv")
    assert list(test.columns) == ["image_id", *L] and sorted(test["image_id"]) == test_ids
    f0, f1 = pd.read_csv(out / "test_fold0.csv"), pd.read_csv(out / "test_fold1.csv")
    np.testing.assert_allclose(test[L].to_numpy(), (f0[L].to_numpy() + f1[L].to_numpy()) / 2, atol=1e-9)
    assert not (out / "test_fold2.csv").exists()
    oof = pd.read_csv(out / "oof.csv")
    assert sorted(oof["image_id"]) == sorted(folds.loc[folds["fold"].isin([0, 1]), "image_id"])
    # no second stage of this config reads embeddings: none written (issue 26; test_state covers the compact ones)
    assert not list(out.glob("*embeddings.npz"))
    values = np.concatenate([test[L].to_numpy(), oof[L].to_numpy()])
    assert np.isfinite(values).all() and values.min() > 0 and values.max() < 1
    assert list(pd.read_csv(out / "unreadable_test.csv").columns) == ["image_id", "reason"]
    # TTA matches the fold's own validation inference up to the augmentations: same images, close probabilities
    fold0_oof = pd.read_csv(runs / cfg.name / "fold0" / "oof.csv").set_index("image_id")
    ours = oof.set_index("image_id").loc[fold0_oof.index]
    assert np.abs(ours[L].to_numpy() - fold0_oof[L].to_numpy()).max() < 0.2


def test_predict_resumes_finished_folds(trained, capsys):
    import os

    cfg, layout, runs = trained
    out = predict(cfg, layout, runs=runs)
    first = pd.read_csv(out / "test.csv")
    capsys.readouterr()
    out = predict(cfg, layout, runs=runs)
    assert "fold(s) [0, 1] already predicted" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(out / "test.csv"), first)
    best = runs / cfg.name / "fold1" / "best.pt"
    later = (out / "oof_fold1.csv").stat().st_mtime + 10
    os.utime(best, (later, later))  # a retrained fold is predicted again
    predict(cfg, layout, runs=runs)
    assert "fold(s) [0] already predicted" in capsys.readouterr().out


def test_predict_then_stack(trained):
    from ich_kaggle.stack.stage import stack

    cfg, layout, runs = trained
    if not (runs / cfg.name / "predictions" / "oof.csv").exists():
        predict(cfg, layout, runs=runs)
    out = stack(cfg, layout, runs=runs, progress=False)
    test = pd.read_csv(runs / cfg.name / "predictions" / "test.csv")
    assert sorted(pd.read_csv(out / "test.csv")["image_id"]) == sorted(test["image_id"])
    assert list(pd.read_csv(out / "metrics.csv")["stage"]) == ["first_stage", "stacked"]


def test_unreadable_test_images_are_listed(trained, tmp_path):
    from ich_kaggle.predict.stage import unreadable_test

    cfg, layout, runs = trained
    meta = pd.read_csv(layout.meta_csv)
    test_ids = meta.loc[meta["split"] == "test", "image_id"].astype(str).tolist()
    sample = tmp_path / "sample.csv"
    pd.DataFrame({"ID": [f"{i}_{lab}" for i in [*test_ids, "ID_gone"] for lab in L], "Label": 0.5}).to_csv(
        sample, index=False
    )
    bad = unreadable_test(meta, set(test_ids[1:]), sample)
    assert set(bad["image_id"]) == {test_ids[0], "ID_gone"}


def _dir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_a_cache_file_damaged_after_preprocess_is_reported_not_predicted_blank(trained, tmp_path, capsys):
    """A cached test or validation image that no longer loads at predict time is left out and named, and the
    submission gives the test image the training prior, as for a DICOM that could not be read at all."""
    import shutil

    from ich_kaggle.core.metrics import read_truth
    from ich_kaggle.data import cache
    from ich_kaggle.submit.stage import submit

    cfg, layout, runs = trained
    work = Layout.of(layout.data, tmp_path / "work")
    shutil.copytree(layout.work, work.work, symlinks=True)  # a private cache we may damage
    runs2 = tmp_path / "runs"
    shutil.copytree(runs / cfg.name, runs2 / cfg.name, ignore=shutil.ignore_patterns("predictions", "stack"))
    meta, folds = pd.read_csv(work.meta_csv), pd.read_csv(work.folds_csv)
    test_victim = sorted(meta.loc[meta["split"] == "test", "image_id"])[3]
    oof_victim = sorted(folds.loc[folds["fold"] == 1, "image_id"])[0]
    for image_id in (test_victim, oof_victim):
        cache.cache_path(work, image_id).write_bytes(b"IHU3 damaged after preprocess")
    capsys.readouterr()
    out = predict(cfg, work, runs=runs2)
    printed = capsys.readouterr().out
    assert "cache: 2 new" in printed  # issue 21: made again from their DICOMs and predicted, never the prior
    test, oof = pd.read_csv(out / "test.csv"), pd.read_csv(out / "oof.csv")
    assert test_victim in set(test["image_id"]) and oof_victim in set(oof["image_id"])
    shutil.rmtree(out)
    # the same damage where the DICOMs are gone (a work folder copied elsewhere): left out and named
    for image_id in (test_victim, oof_victim):
        cache.cache_path(work, image_id).write_bytes(b"IHU3 damaged after preprocess")
    work = Layout.of(tmp_path / "no_dicoms", work.work)
    shutil.copy2(layout.train_csv, _dir(tmp_path / "no_dicoms") / layout.train_csv.name)
    shutil.copy2(layout.sample_csv, tmp_path / "no_dicoms" / layout.sample_csv.name)
    out = predict(cfg, work, runs=runs2)
    printed = capsys.readouterr().out
    assert "1 test image(s) could not be loaded" in printed and "1 fold 1 OOF image(s)" in printed
    test, oof = pd.read_csv(out / "test.csv"), pd.read_csv(out / "oof.csv")
    assert test_victim not in set(test["image_id"]) and oof_victim not in set(oof["image_id"])
    assert len(test) == (meta["split"] == "test").sum() - 1 and np.isfinite(test[L].to_numpy()).all()
    bad = pd.read_csv(out / "unreadable_test.csv")
    assert bad.set_index("image_id").loc[test_victim, "reason"] == "cache file unreadable at predict time"
    sub = pd.read_csv(submit(cfg, work, runs=runs2, out_dir=tmp_path / "subs"))
    given = sub.set_index("ID").loc[f"{test_victim}_any", "Label"]
    assert given == pytest.approx(read_truth(work.train_csv)["any"].mean(), abs=1e-6)  # the training prior


def test_no_trained_fold_is_a_user_error(tmp_path):
    cfg = config.load("tiny")
    with pytest.raises(UserError, match="make train") as err:
        predict(cfg, Layout.of(tmp_path / "data", tmp_path / "work"), runs=tmp_path / "runs")
    assert "\n" not in str(err.value)
