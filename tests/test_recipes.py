"""The five published recipes: each config trains briefly on tiny synthetic data, and each mechanism is checked
directly (MIL gradient through the max slice, smoothness term, frozen layers, progressive sizes, probability-averaging
ensemble, partial fine-tuning, inverse-frequency weights from the fold, random vs patient split)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from ich_kaggle.core.labels import LABELS
from ich_kaggle.core import config
from ich_kaggle.engine import losses
from ich_kaggle import train
from ich_kaggle.core.config import ModelConfig
from ich_kaggle.engine import loop
from ich_kaggle.core.errors import UserError
from ich_kaggle.data.windows import named
from ich_kaggle.models import build_model
from ich_kaggle.models.checkpoint import load_checkpoint, read_checkpoint
from ich_kaggle.core.layout import Layout
from ich_kaggle.models import ensemble
from ich_kaggle.recipes import mil
from ich_kaggle.data import folds as split

RECIPES = [
    "mil_resnet18",
    "tricks_resnet18",
    "small_cnn",
    "resnet50_partial",
    "resnext50_seresnet50",
    "seresnext50_tta",
]
# CPU-tiny: random init, 32 px, a handful of images per epoch, fp32
FAST = [
    "model.pretrained=false",
    "data.image_size=32",
    "train.batch_size=6",
    "train.max_images_per_epoch=12",
    "cv.k=3",
    "cv.seed=0",
    "data.num_workers=0",
    "train.epochs=1",
    "train.amp=none",
    "train.channels_last=false",
    "train.warmup_epochs=0",
]


@pytest.fixture(scope="module")
def comp(tmp_path_factory) -> Layout:
    from ich_kaggle.data import folds, synth

    root = tmp_path_factory.mktemp("recipes")
    data = synth.write_competition(root / "comp", seed=0, studies=8, slices=6, size=64)
    layout = Layout.of(data, root / "work")
    folds.load_folds(layout, k=3, seed=0)
    return layout


def _cfg(name: str, *extra: str) -> config.Config:
    return config.load(name, [*FAST, *extra])


class Spy:
    """Records the network's initial weights and the shape of every training batch of a train_fold call."""

    def __init__(self, monkeypatch) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.shapes: list[list[tuple[int, ...]]] = []
        build, epoch = loop.build_network, loop.train_epoch

        def build_network(cfg, info):
            model, net = build(cfg, info)
            self.initial = copy.deepcopy(net.state_dict())
            return model, net

        def train_epoch(model, loader, *args, **kwargs):
            shapes: list[tuple[int, ...]] = []
            handle = model.register_forward_pre_hook(lambda _m, inputs: shapes.append(tuple(inputs[0].shape)))
            try:
                return epoch(model, loader, *args, **kwargs)
            finally:
                handle.remove()
                self.shapes.append(shapes)

        monkeypatch.setattr(loop, "build_network", build_network)
        monkeypatch.setattr(loop, "train_epoch", train_epoch)

    def changed(self, fdir) -> dict[str, bool]:
        final = read_checkpoint(fdir / "last.pt")["model"]
        return {
            k: not torch.equal(v, final[k])
            for k, v in self.initial.items()
            if v.is_floating_point() and "running_" not in k
        }


def test_every_recipe_config_loads():
    for name in RECIPES:
        cfg = config.load(name)
        assert cfg.name == name and cfg.description
    assert config.load("mil_resnet18").recipe.kind == "mil"
    assert config.load("tricks_resnet18").train.progressive_sizes == [64, 128, 224, 256]
    assert config.load("tricks_resnet18").data.min_brain_fraction == pytest.approx(0.2)
    assert config.load("resnet50_partial").model.freeze == "partial"
    assert ensemble.member_names(config.load("resnext50_seresnet50").model.backbone) == [
        "resnext50_32x4d",
        "se_resnet50",
    ]
    tta = config.load("seresnext50_tta")
    assert named(tta.data.windows) == [(40, 80), (80, 200), (40, 380)]
    assert tta.train.epochs == 3 and tta.train.optimizer == "adam" and "hflip" in tta.tta.transforms
    with pytest.raises(UserError, match="cv.split"):
        config.load("small_cnn", ["cv.split=shuffled"])
    with pytest.raises(UserError, match="recipe.kind"):  # recipe mistakes fail when the config is loaded
        config.load("small_cnn", ["recipe.kind=bagging"])
    with pytest.raises(UserError, match="unknown config key 'recipe.mil.bag_sise'"):
        config.load("mil_resnet18", ["recipe.mil.bag_sise=4"])
    with pytest.raises(UserError, match="recipe.mil.bag_size"):
        config.load("mil_resnet18", ["recipe.mil.bag_size=2"])


# --- MIL -------------------------------------------------------------------------------------------------------


def test_mil_loss_gradient_flows_only_through_the_max_slice():
    torch.manual_seed(0)
    logits = torch.randn(7, len(LABELS), requires_grad=True)
    y = torch.tensor([1.0, 0, 1, 0, 0, 1])
    loss = mil.mil_loss(logits, y)
    top = logits.detach().max(dim=0)
    expected = torch.nn.functional.binary_cross_entropy(torch.sigmoid(top.values), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    grad = logits.grad
    for c in range(len(LABELS)):
        winner = int(top.indices[c])
        assert grad[winner, c] != 0
        assert torch.count_nonzero(grad[:, c]) == 1, f"label {c}: non-max slices got gradient"
    # with a focal per-label loss and label weights: still only the max slice
    focal = losses.FocalLoss(torch.tensor([2.0, 1, 1, 1, 1, 1]))
    logits.grad = None
    mil.mil_loss(logits, y, focal.weights, focal.per_label).backward()
    assert (torch.count_nonzero(logits.grad, dim=0) == 1).all()


def test_smoothness_is_zero_for_smooth_embeddings_and_positive_for_a_jump():
    t = torch.arange(8, dtype=torch.float32)[:, None]
    smooth = torch.cat([t * 0.5, 1 - t * 0.25, torch.zeros(8, 3)], dim=1)  # constant-speed trajectory
    assert mil.smoothness(smooth).item() == pytest.approx(0.0, abs=1e-5)
    assert mil.smoothness(smooth * 0.0).item() == pytest.approx(0.0, abs=1e-5)  # a constant embedding
    jumpy = smooth.clone()
    jumpy[5:] += torch.tensor([3.0, 0, 0, 0, 0])  # a jump between slices 4 and 5
    step = float(torch.linalg.vector_norm(smooth[1] - smooth[0]))
    jump = float(torch.linalg.vector_norm(jumpy[5] - jumpy[4]))
    assert mil.smoothness(jumpy).item() == pytest.approx(jump - step, rel=1e-4)  # the one triple anchored at 4
    assert mil.smoothness(jumpy).item() > 1.0
    # the paper's margin: every triple of a constant-speed trajectory costs exactly the margin
    assert mil.smoothness(smooth, margin=0.1).item() == pytest.approx(0.1 * 6, rel=1e-4)
    assert mil.smoothness(jumpy, reduction="mean").item() == pytest.approx((jump - step) / 6, rel=1e-4)
    e = torch.zeros(5, 4, requires_grad=True)  # identical embeddings: finite gradient
    mil.smoothness(e, margin=0.1).backward()
    assert torch.isfinite(e.grad).all()
    assert mil.smoothness(smooth[:2]).item() == 0.0


def test_bags_follow_slice_order_and_subsample_evenly():
    frame = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e"], "series_id": ["s1", "s2", "s1", "s1", "s2"]})
    meta = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e"], "slice_rank": [2, 1, 0, 1, 0]})
    bags, codes = mil.series_bags(frame, meta)
    assert [list(b) for b in bags] == [[2, 3, 0], [4, 1]]
    assert list(codes) == [0, 1, 0, 0, 1]
    rows = np.arange(40)
    sub = mil.subsample_bag(rows, 8, np.random.default_rng(0))
    assert len(sub) == 8 and (np.diff(sub) > 0).all() and sub[0] < 5 and sub[-1] >= 35
    assert list(mil.subsample_bag(rows[:5], 8, np.random.default_rng(0))) == list(range(5))


def test_mil_recipe_trains_with_scan_bags_and_writes_per_slice_oof(comp, tmp_path, monkeypatch):
    calls: list[dict] = []
    real = mil.MILBatchLoss.__call__

    def spy(self, model, x, y, idx):
        loss = real(self, model, x, y, idx)
        calls.append(dict(self.last, batch=len(x)))
        return loss

    monkeypatch.setattr(mil.MILBatchLoss, "__call__", spy)
    shapes = Spy(monkeypatch)
    cfg = _cfg(
        "mil_resnet18", "recipe.mil.bag_size=4", "recipe.mil.scan_only_fraction=0.5", "train.max_images_per_epoch=6"
    )
    fdir = train.train_fold(cfg, comp, 0, runs=tmp_path)
    assert calls, "the MIL batch loss was not used"
    assert all(c["bag"] == 4 and np.isfinite(c["mil"]) and c["smooth"] >= 0 for c in calls)
    # mixed batches: one forward pass over the slice-labelled batch and the scan-labelled bag together
    assert [s[0] for s in shapes.shapes[0]] == [c["batch"] + c["bag"] for c in calls]
    folds = pd.read_csv(comp.folds_csv, dtype={"image_id": str})
    oof = pd.read_csv(fdir / "oof.csv", dtype={"image_id": str})
    assert list(oof.columns) == ["image_id", *LABELS]
    assert sorted(oof["image_id"]) == sorted(folds.loc[folds["fold"] == 0, "image_id"])  # one row per slice


@pytest.mark.slow
def test_mil_resume_and_worker_count_do_not_change_the_result(comp, tmp_path):
    # small_cnn: ResNet-18's CPU backward is not bit-reproducible run to run (even with the plain engine loop)
    mil_args = ["recipe.mil.bag_size=3", "train.epochs=2", "train.max_images_per_epoch=6", "model.backbone=small_cnn"]
    cfg = _cfg("mil_resnet18", *mil_args)
    a = train.train_fold(cfg, comp, 1, runs=tmp_path / "a")
    cfg_workers = _cfg("mil_resnet18", *mil_args, "data.num_workers=1")
    b = train.train_fold(cfg_workers, comp, 1, runs=tmp_path / "b", stop_after_epochs=1)
    assert not (b / "oof.csv").exists()
    train.train_fold(cfg_workers, comp, 1, runs=tmp_path / "b")  # resumes at epoch 2
    wa, wb = read_checkpoint(a / "last.pt")["model"], read_checkpoint(b / "last.pt")["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    pd.testing.assert_frame_equal(pd.read_csv(a / "oof.csv"), pd.read_csv(b / "oof.csv"))


def test_mil_oversamples_bags_of_rare_subtypes(comp):
    from ich_kaggle.data.dataset import SliceDataset
    from ich_kaggle.data.meta import load_meta
    from ich_kaggle.engine.dist import DistInfo

    cfg = _cfg("mil_resnet18")
    frame = pd.read_csv(comp.folds_csv, dtype={"image_id": str})
    meta = load_meta(comp)
    series = frame["series_id"].unique()
    assert len(series) >= 6
    frame[list(LABELS)] = 0  # one epidural scan, four subdural scans, the rest negative
    frame.loc[frame["series_id"] == series[0], ["any", "epidural"]] = 1
    frame.loc[frame["series_id"].isin(series[1:5]), ["any", "subdural"]] = 1
    ds = SliceDataset(frame, comp, cfg, train=True, meta=meta)
    net = build_model(ModelConfig(backbone="small_cnn", pretrained=False))
    bl = mil.MILBatchLoss(
        cfg, train_ds=ds, meta=meta, loss_fn=losses.build_loss(cfg, ds.labels), net=net, info=DistInfo()
    )
    bl.start_epoch(0, 32)
    counts = np.bincount(bl.plan, minlength=len(bl.bags))
    epidural = bl.scan_labels[:, 1] > 0
    assert epidural.sum() == 1 and bl.scan_labels[:, 5].sum() == 4
    assert counts[epidural].item() == 2 and (counts[~epidural] == 1).all()  # sqrt(4 / 1) repeats of the rare scan
    rows, label = bl.bag_rows(0)
    assert (np.diff(meta.set_index("image_id").loc[frame["image_id"].to_numpy()[rows], "slice_rank"]) > 0).all()
    assert (label == ds.labels[rows].max(axis=0)).all()
    x, label2 = bl.next_bag()  # the loader's first bag is the plan's first
    assert x.shape == (len(rows), 3, 32, 32) and (label2 == label).all()
    assert torch.equal(x[0], bl.ds[int(rows[0])][0])
    # every slice of a bag shares one augmentation draw (flip, rotation, jitter): drawn per series
    assert all(bl.ds._rng(int(r)).random() == bl.ds._rng(int(rows[0])).random() for r in rows)


# --- bag of tricks ----------------------------------------------------------------------------------------------


def test_tricks_freeze_backbone_progressive_sizes_and_brain_filter(comp, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    cfg = _cfg(
        "tricks_resnet18",
        "train.epochs=3",
        "train.progressive_sizes=[24,32]",
        "data.image_size=40",
        "train.max_images_per_epoch=6",
    )
    fdir = train.train_fold(cfg, comp, 1, runs=tmp_path)
    # progressive resizing: epoch 1 at 24 px, epoch 2 at 32 px, then data.image_size
    assert [{s[-1] for s in epoch} for epoch in spy.shapes] == [{24}, {32}, {40}]
    assert pd.read_csv(fdir / "log.csv")["epoch"].tolist() == [1, 2, 3]
    changed = spy.changed(fdir)
    convs = [k for k in changed if k.startswith("backbone.") and k.endswith("conv1.weight")]
    bns = [k for k in changed if k.startswith("backbone.") and ".bn" in k and k.endswith(".weight")]
    assert convs and bns
    assert not any(changed[k] for k in convs), "frozen convolutions changed"
    assert any(changed[k] for k in bns), "BatchNorm did not train"
    assert changed["head.fc.weight"] and changed["head.fc.bias"]
    # near-empty slices dropped from training (never from validation): the brain fractions were computed
    fractions = pd.read_csv(comp.work / "brain_fraction.csv")
    done = json.loads((fdir / "done.json").read_text())
    folds = pd.read_csv(comp.folds_csv, dtype={"image_id": str})
    train_ids = folds.loc[folds["fold"] != 1, "image_id"]
    low = fractions.set_index("image_id").loc[train_ids, "brain_fraction"] < 0.2
    kept = int((~low).sum() + (low & (folds.set_index("image_id").loc[train_ids, "any"] > 0)).sum())
    assert done["n_train"] == kept and done["n_val"] == int((folds["fold"] == 1).sum())


@pytest.mark.slow
def test_tricks_lr_finder_plots_loss_against_lr(comp, tmp_path):
    cfg = _cfg("tricks_resnet18", "train.progressive_sizes=[]", "train.max_images_per_epoch=6")
    lr = train.lr_find(cfg, comp, 0, runs=tmp_path)
    fdir = tmp_path / "tricks_resnet18" / "fold0"
    sweep = pd.read_csv(fdir / "lr_find.csv")
    assert (fdir / "lr_find.png").stat().st_size > 0 and len(sweep) >= 10
    assert (np.diff(sweep["lr"]) > 0).all() and sweep["lr"].min() <= lr <= sweep["lr"].max()
    assert not (fdir / "last.pt").exists()  # the sweep leaves the fold's training state alone


# --- small CNN vs ResNet-50 (Foo) -------------------------------------------------------------------------------


def test_small_cnn_trains_with_inverse_frequency_weights_from_the_fold(comp, tmp_path, monkeypatch):
    seen: list[np.ndarray] = []
    built: list[torch.nn.Module] = []
    real = losses.build_loss

    def spy_loss(cfg, labels=None):
        seen.append(np.asarray(labels))
        built.append(real(cfg, labels))
        return built[-1]

    monkeypatch.setattr(losses, "build_loss", spy_loss)
    spy = Spy(monkeypatch)
    cfg = _cfg("small_cnn", "train.epochs=2", "train.lr=0.05")
    fdir = train.train_fold(cfg, comp, 2, runs=tmp_path)
    folds = pd.read_csv(comp.folds_csv)
    fold_labels = folds.loc[folds["fold"] != 2, list(LABELS)].to_numpy(dtype=np.float32)
    np.testing.assert_array_equal(seen[0], fold_labels)  # the training fold's labels, not all labels
    loss = built[0]
    assert isinstance(loss, losses.BalancedBCE)
    n, pos = len(fold_labels), np.maximum(fold_labels.sum(axis=0), 1)
    np.testing.assert_allclose(loss.pos_weight.numpy(), n / (2 * pos), rtol=1e-6)
    np.testing.assert_allclose(loss.neg_weight.numpy(), n / (2 * np.maximum(n - fold_labels.sum(axis=0), 1)), rtol=1e-6)
    assert loss.pos_weight[1] > loss.pos_weight[0]  # epidural is rarer than any: weighs more
    # it trained: every parameter moved, two logged epochs, finite OOF
    assert all(spy.changed(fdir).values())
    log = pd.read_csv(fdir / "log.csv")
    assert len(log) == 2 and np.isfinite(log["val_weighted_log_loss"]).all()
    assert {s[1:] for s in spy.shapes[0]} == {(3, 32, 32)}
    model, _ = load_checkpoint(fdir / "best.pt")
    assert type(model.backbone).__name__ == "SmallCNN"


def test_balanced_bce_matches_the_formula():
    y = np.array([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=np.float32)
    pos, neg = losses.balanced_weights(y)
    np.testing.assert_allclose(pos.numpy(), [1.0, 2.0, 2.0, 2.0, 2.0, 2.0])  # 4 / (2 * #pos), unseen counts as 1
    np.testing.assert_allclose(neg.numpy(), [1.0, 4 / 6, 0.5, 0.5, 0.5, 0.5])
    loss = losses.BalancedBCE(torch.ones(6), pos, neg)
    z = torch.zeros(1, 6)
    t = torch.tensor([[1.0, 0, 1, 0, 0, 0]])
    expected = -(pos * t * np.log(0.5) + neg * (1 - t) * np.log(0.5)).mean()
    assert loss(z, t).item() == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(UserError, match="balanced"):
        losses.balanced_weights(np.zeros((0, 6)))


@pytest.mark.slow
def test_resnet50_partial_trains_only_last_stage_and_head(comp, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    cfg = _cfg("resnet50_partial", "train.max_images_per_epoch=6", "train.lr=0.05")
    fdir = train.train_fold(cfg, comp, 0, runs=tmp_path)
    changed = spy.changed(fdir)
    trainable = {k for k in changed if k.startswith(("backbone.encoder.layer4.", "head."))}
    assert trainable and all(changed[k] for k in trainable if k.endswith(("weight", "bias")))
    frozen = [k for k in changed if k not in trainable]
    assert frozen and not any(changed[k] for k in frozen), [k for k in frozen if changed[k]][:3]
    assert (fdir / "oof.csv").exists()


# --- ensembles (Huang & Chen; Kotik) ----------------------------------------------------------------------------


def test_ensemble_averages_member_sigmoids_and_trains_members_separately():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="small_cnn+small_cnn", pretrained=False, dropout=0.0))
    assert isinstance(model, ensemble.EnsembleNet) and model.num_members == 2
    x = torch.rand(3, 3, 24, 24)
    model.eval()
    with torch.no_grad():
        members = model.members()
        p_members = torch.stack([torch.sigmoid(m(x)) for m in members])
        p = torch.sigmoid(model(x))
        feats = model.features(x)
    assert not torch.allclose(p_members[0], p_members[1])  # two different networks
    torch.testing.assert_close(p, p_members.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.sigmoid(model.classify(feats)), p, atol=1e-6, rtol=1e-5)
    assert feats.shape == (3, model.num_features) == (3, sum(m.num_features for m in members))
    # extreme logits stay finite (log-space average)
    big = ensemble.mean_probability_logit(torch.tensor([[[40.0], [-40.0]], [[90.0], [95.0]]]))
    assert torch.isfinite(big).all() and abs(big[0].item()) < 1e-4

    # training: the loss is the sum of the members' own losses -> each member gets exactly its own gradient
    cfg = config.load("tiny", ["model.backbone=small_cnn+small_cnn", "model.pretrained=false"])
    y = torch.tensor([[1.0, 0, 1, 0, 0, 0]] * 3)
    loss_fn = losses.build_loss(cfg, y.numpy())
    assert isinstance(loss_fn, ensemble.MemberSumLoss)
    model.train()
    out = model(x)
    assert out.shape == (3, 2 * len(LABELS))
    loss_fn(out, y).backward()
    joint = [p.grad.clone() for p in model.parameters()]
    single = losses.build_loss(config.load("tiny", ["model.backbone=small_cnn"]), y.numpy())
    for i, member in enumerate(members):
        model.zero_grad()
        single(member(x), y).backward()
        for (name, param), g in zip(model.named_parameters(), joint):
            if f".members.{i}." in name:
                torch.testing.assert_close(param.grad, g, msg=name)
    model.eval()
    assert loss_fn(model(x), y).shape == ()  # combined logits: the plain loss

    # a checkpoint round trip rebuilds the ensemble from the backbone string
    again = build_model(ModelConfig(backbone="small_cnn+small_cnn", pretrained=False))
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model(x))
    with pytest.raises(UserError, match="ensemble"):
        build_model(ModelConfig(backbone="small_cnn+", pretrained=False))


def test_ensemble_weights_must_be_a_folder_for_different_members(tmp_path):
    one = tmp_path / "resnet18.pth"
    one.write_bytes(b"x")
    with pytest.raises(UserError, match="folder holding each member"):
        build_model(ModelConfig(backbone="resnet18+resnet34", pretrained=True, weights=str(one)))


def test_ensemble_freeze_and_gradcam_apply_to_every_member():
    from ich_kaggle.report.gradcam import GradCAM

    model = build_model(ModelConfig(backbone="small_cnn+small_cnn", pretrained=False, freeze="partial"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("backbone.")} == {
        n for n, _ in model.named_parameters() if n.startswith("backbone.") and ".layers.1." in n
    }
    assert {n for n, _ in model.named_parameters() if n.startswith("head.")} <= trainable
    with GradCAM(model) as cam:
        maps, probs = cam(torch.rand(2, 3, 32, 32), 0)
    assert maps.shape[0] == 2 and probs.shape == (2, len(LABELS))


@pytest.mark.slow
def test_resnext50_seresnet50_recipe_trains_and_predicts_mean_probabilities(comp, tmp_path):
    cfg = _cfg("resnext50_seresnet50", "train.max_images_per_epoch=6")
    fdir = train.train_fold(cfg, comp, 1, runs=tmp_path)
    model, cfg2 = load_checkpoint(fdir / "best.pt")
    assert isinstance(model, ensemble.EnsembleNet) and cfg2.model.backbone == "resnext50_32x4d+se_resnet50"
    from ich_kaggle.data.dataset import SliceDataset
    from ich_kaggle.data.transforms import build_eval_transforms

    oof = pd.read_csv(fdir / "oof.csv", dtype={"image_id": str})
    ds = SliceDataset(oof.head(3), comp, cfg2, transform=build_eval_transforms(cfg2))
    x = torch.stack([ds[i][0] for i in range(3)])
    with torch.no_grad():
        mean = torch.stack([torch.sigmoid(m(x)) for m in model.members()]).mean(0).numpy()
    np.testing.assert_allclose(mean, oof[list(LABELS)].to_numpy()[:3], atol=1e-5)
    emb = np.load(fdir / "oof_embeddings.npz")
    assert emb["emb"].shape == (len(oof), 2048 + 2048)
    # the paper's evaluation: thresholded F1 per subtype and Grad-CAM maps, through the ensemble
    from ich_kaggle.report import stage as report

    page = report.make_report(
        cfg, comp, runs=tmp_path, threshold=0.5, gradcam=2, sections=["thresholds", "series", "gradcam"]
    )
    assert (page.parent / "f1.png").exists() and (page.parent / "gradcam_errors.png").exists()
    # true positives only at p >= threshold: a gallery, or a note that this barely trained pair has none
    assert (page.parent / "gradcam_positives.png").exists() or "No Grad-CAM positives to show" in page.read_text()
    f1 = pd.read_csv(page.parent / "thresholds.csv").set_index("label")
    assert list(f1.index) == list(LABELS) and f1["F1"].between(0, 1).all()


@pytest.mark.slow
def test_seresnext50_tta_recipe_trains_two_averaged_models(comp, tmp_path):
    cfg = _cfg("seresnext50_tta", "train.max_images_per_epoch=4", "train.batch_size=4")
    fdir = train.train_fold(cfg, comp, 2, runs=tmp_path)
    model, _ = load_checkpoint(fdir / "best.pt")
    assert model.num_members == 2 and ensemble.member_names(model.backbone_name) == ["se_resnext50_32x4d"] * 2
    log = pd.read_csv(fdir / "log.csv")
    assert np.isfinite(log["val_weighted_log_loss"]).all()


# --- random vs patient split ------------------------------------------------------------------------------------


def patients_in_several_folds(table: pd.DataFrame) -> list[str]:
    """Patients whose slices sit in more than one fold (always empty for a patient split)."""
    n = table.groupby(table["patient_id"].astype(str))["fold"].nunique()
    return sorted(n[n > 1].index)


def test_random_split_puts_a_patient_in_two_folds_patient_split_never(comp, tmp_path):
    from ich_kaggle.data import folds as folds_mod

    patient = folds_mod.load_folds(comp, k=3, seed=0)
    assert patients_in_several_folds(patient) == []
    cfg = _cfg("small_cnn", "cv.split=random")
    rand = split.fold_table(comp, cfg.cv)
    assert patients_in_several_folds(rand)
    assert sorted(np.bincount(rand["fold"])) == sorted(np.bincount(np.arange(len(rand)) % 3))  # equal sizes
    pd.testing.assert_frame_equal(split.fold_table(comp, cfg.cv), rand)  # deterministic
    assert split.fold_table(comp, _cfg("small_cnn").cv).equals(patient.assign(image_id=patient["image_id"].astype(str)))
    # the engine validates on the random fold: some validation patient is also in its training set
    fdir = train.train_fold(cfg, comp, 0, runs=tmp_path)
    oof = pd.read_csv(fdir / "oof.csv", dtype={"image_id": str})
    assert sorted(oof["image_id"]) == sorted(rand.loc[rand["fold"] == 0, "image_id"].astype(str))
    val_patients = set(rand.loc[rand["fold"] == 0, "patient_id"])
    assert val_patients & set(rand.loc[rand["fold"] != 0, "patient_id"])


@pytest.mark.slow
def test_ensemble_with_random_split_goes_through_predict(comp, tmp_path):
    """predict/stack need no change for an ensemble; predict's OOF follows the random folds training used."""
    from ich_kaggle.predict import stage as predict

    cfg = _cfg(
        "resnext50_seresnet50",
        "model.backbone=small_cnn+small_cnn",
        "cv.split=random",
        "train.max_images_per_epoch=6",
        "stack.use_embeddings=true",
        "stack.embedding_space=mixture",
    )
    for fold in range(cfg.cv.k):
        train.train_fold(cfg, comp, fold, runs=tmp_path)
    out = predict.predict(cfg, comp, runs=tmp_path)
    rand = split.fold_table(comp, cfg.cv)
    oof = pd.read_csv(out / "oof.csv", dtype={"image_id": str})
    assert sorted(oof["image_id"]) == sorted(rand["image_id"].astype(str))
    for fold in range(cfg.cv.k):  # each image predicted by the fold model that validated on it
        fold_oof = pd.read_csv(tmp_path / cfg.name / f"fold{fold}" / "oof.csv", dtype={"image_id": str})
        assert set(fold_oof["image_id"]) == set(rand.loc[rand["fold"] == fold, "image_id"].astype(str))
    test = pd.read_csv(out / "test.csv")
    assert list(test.columns) == ["image_id", *LABELS] and len(test) > 0
    assert np.load(out / "test_embeddings.npz")["emb"].shape[1] == 2 * 64
