"""Every registry builds what it declares: each provider registers exactly its declared names, and every backbone,
pooling, loss, optimizer, scheduler, TTA view, window and stack model is built and used once (tiny inputs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ich_kaggle.core import config, registry
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.labels import LABELS
from ich_kaggle.core.registry import (
    BACKBONES,
    LOSSES,
    OPTIMIZERS,
    POOLS,
    RECIPES,
    SCHEDULERS,
    STACK_MODELS,
    TTA,
    TTA_NEEDS,
    WINDOWS,
)

REGISTRIES = [BACKBONES, LOSSES, OPTIMIZERS, SCHEDULERS, POOLS, STACK_MODELS, TTA, WINDOWS, RECIPES]


@pytest.mark.parametrize("reg", REGISTRIES, ids=lambda r: r.kind)
def test_each_provider_registers_what_it_declares(reg):
    """A declared name resolves once its provider is imported; the package registers no name it did not declare
    (names registered by tests, e.g. train_helpers' backbone, are not the package's)."""
    for name in reg.declared:
        reg.get(name)  # LookupError when the provider registers nothing under a declared name
    ours = [
        n
        for n in reg.registered()
        if (getattr(reg.find(n), "__module__", None) or "ich_kaggle").startswith("ich_kaggle")
    ]
    assert set(ours) <= set(reg.declared), f"declare {sorted(set(ours) - set(reg.declared))} in core/registry.py"


def test_tta_needs_name_views_and_augmentations():
    augment = {f.name for f in dataclasses.fields(config.AugmentConfig)}
    for view, needs in TTA_NEEDS.items():
        assert view in TTA.declared and set(needs) <= augment, view


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_builds_and_runs_a_forward_step(name):
    """pretrained=False (no weights needed). Built on the meta device: the architecture, the adapted first conv (5
    channels) and the head are wired as for training, without paying for random initialisation of 25-46M weights;
    the from-scratch and the small ones also run on real numbers."""
    from ich_kaggle.models.backbones import build_single

    cfg = config.ModelConfig(backbone=name, pretrained=False)
    real = name in ("small_cnn", "tu-tf_efficientnet_lite0")
    device = torch.device("cpu" if real else "meta")
    with device:
        net = build_single(cfg, in_channels=5).eval()
        with torch.no_grad():
            out = net(torch.rand(2, 5, 32, 32))
    assert out.shape == (2, len(LABELS))
    if real:
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", POOLS.names())
def test_pool_builds_from_the_registry(name):
    from ich_kaggle.models.heads import build_pool

    pool = build_pool(name)
    x = torch.rand(2, 4, 3, 3) + 0.1
    out = pool(x)
    assert out.shape == (2, pool.out_features(4)) and torch.isfinite(out).all()


@pytest.mark.parametrize("class_weights", ["metric", "balanced"])
@pytest.mark.parametrize("name", LOSSES.names())
def test_loss_builds_and_backpropagates(name, class_weights):
    from ich_kaggle.engine.losses import build_loss

    cfg = config.load("tiny", [f"train.loss={name}", f"train.class_weights={class_weights}"])
    labels = np.random.default_rng(0).integers(0, 2, size=(16, len(LABELS)))
    loss_fn = build_loss(cfg, labels)
    logits = torch.randn(16, len(LABELS), requires_grad=True)
    loss = loss_fn(logits, torch.from_numpy(labels).float())
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0 and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("scheduler", SCHEDULERS.names())
@pytest.mark.parametrize("optimizer", OPTIMIZERS.names())
def test_optimizer_and_scheduler_take_a_step(optimizer, scheduler):
    from ich_kaggle.engine.optim import build_optimizer, build_scheduler

    cfg = config.load("tiny", [f"train.optimizer={optimizer}", f"train.scheduler={scheduler}", "train.epochs=2"])
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    before = net.weight.detach().clone()
    opt = build_optimizer(cfg, net)
    sched = build_scheduler(cfg, opt, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        opt.zero_grad()
        net(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert not torch.equal(before, net.weight) and all(lr > 0 for lr in lrs)
    if scheduler != "constant":
        assert lrs[-1] < max(lrs)  # the schedule anneals


@pytest.mark.parametrize("name", TTA.names())
def test_tta_view_keeps_the_shape_and_moves_pixels(name):
    x = torch.zeros(1, 2, 20, 20)
    x[0, 0, 5, 3] = 1
    out = TTA.get(name)(x)
    assert out.shape == x.shape
    assert torch.equal(out, x) == (name == "identity")


@pytest.mark.parametrize("name", WINDOWS.names())
def test_window_maps_its_range_to_0_1(name):
    from ich_kaggle.data.windows import apply_windows, named

    ((center, width),) = named([name])
    hu = np.array([[center - width, center, center + width]], dtype=np.float32)
    np.testing.assert_allclose(apply_windows(hu, [(center, width)])[0, :, 0], [0.0, 0.5, 1.0], atol=1e-6)


def test_recipes_resolve():
    assert RECIPES.get("standard") is None
    assert callable(RECIPES.get("mil"))


@pytest.fixture(scope="module")
def sequences():
    from ich_kaggle.stack.sequences import build_sequences, logit
    from ich_kaggle.stack.simulate import simulate

    sim = simulate(n_series=24, test_series=0, k=3, seed=2, noise=1.0)
    frame = sim.folds.merge(sim.meta[["image_id", "slice_rank", "z", "series_len"]], on="image_id")
    frame = frame.merge(sim.oof, on="image_id", suffixes=("", "_p"))
    values = logit(frame[[f"{c}_p" for c in LABELS]].to_numpy())
    return build_sequences(frame, values, frame[list(LABELS)].to_numpy(np.float32), frame["fold"].to_numpy())


@pytest.mark.parametrize("name", STACK_MODELS.names())
def test_stack_model_fits_and_predicts(name, sequences):
    scfg = config.StackConfig(model=name, hidden=8, layers=1, epochs=1, batch_series=8, max_steps=0)
    stacker = STACK_MODELS.build(name)
    curve: list[dict] = []
    model = stacker.fit(sequences, scfg, 1, 0, curve)
    p = stacker.predict(model, sequences, scfg)
    assert p.shape == sequences.y.shape and np.isfinite(p).all() and 0 <= p.min() and p.max() <= 1
    assert (p[~sequences.mask] == 0).all()  # padding predicts nothing


def test_a_closed_registry_answers_an_unknown_name_without_importing_its_provider():
    reg = registry.Registry("demo kind", registry.provided_by("ich_kaggle.no_such_module", "a", "b"))
    assert "a" in reg and "zzz" not in reg
    with pytest.raises(UserError, match=r"k='zzz' is not one of a, b"):
        reg.check("zzz", "k")
    with pytest.raises(ModuleNotFoundError):
        reg.get("a")
