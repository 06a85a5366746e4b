"""Configs: every shipped YAML loads, overrides are typed, mistakes are one clear line."""

import subprocess
import sys

import pytest

from ich_kaggle.core import config
from ich_kaggle.core.errors import UserError
from ich_kaggle.data.windows import named


@pytest.mark.parametrize("name", config.available())
def test_every_shipped_config_loads_and_round_trips(name, tmp_path):
    cfg = config.load(name)
    assert cfg.name == name
    assert config.from_dict(cfg.to_dict()) == cfg
    config.dump(cfg, tmp_path / "resolved.yaml")
    assert config.load(str(tmp_path / "resolved.yaml")).to_dict() | {"name": name} == cfg.to_dict()


def test_default_is_the_proven_recipe():
    cfg = config.load("seresnext50_512")
    assert cfg.model.backbone == "se_resnext50_32x4d"
    assert cfg.data.image_size == 512
    assert named(cfg.data.windows) == [(40, 80), (80, 200), (40, 380)]


def test_overrides_are_typed():
    cfg = config.load(
        "tiny",
        [
            "train.epochs=3",
            "train.lr=1e-4",
            "data.windows=brain,bone",
            "train.compile=true",
            "data.neighbors=1",
            "model.weights=/x/y.pth",
        ],
    )
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.compile) == (3, 1e-4, True)
    assert cfg.data.windows == ["brain", "bone"] and cfg.data.in_channels == 6
    assert cfg.model.weights == "/x/y.pth"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epcohs=3", "unknown config key 'train.epcohs'"),
        ("trian.epochs=3", "unknown config key 'trian'"),
        ("train.epochs=three", "expected int"),
        ("model.pool=max", "model.pool='max' is not one of"),
        ("data.windows=brain,lung", "data.windows='lung' is not one of brain, subdural"),
        ("train", "must look like key=value"),
        ("train=3", "is a section"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        config.load("tiny", [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.image_size=0", r"data.image_size=0 must be at least 8"),
        ("data.image_size=-64", r"data.image_size=-64 must be at least 8"),
        ("train.lr=-0.001", r"train.lr=-0.001 must be above 0"),
        ("model.dropout=1.5", r"model.dropout=1.5 must be in \[0, 1\]"),
        ("data.num_workers=-2", r"data.num_workers=-2 must be at least -1"),
        ("train.max_images_per_epoch=-1", r"train.max_images_per_epoch=-1 must be at least 0"),
        ("augment.crop_scale=[0.5,1.5]", r"augment.crop_scale=\[0.5, 1.5\] must be \[low, high\]"),
        ("augment.hflip=2", r"augment.hflip=2.0 must be in \[0, 1\]"),
        ("augment.window_jitter=1.01", r"augment.window_jitter=1.01 must be in \[0, 1\]"),
        ("cv.folds=[0,7]", r"cv.folds=7 must be in \[0, 4\]"),
        ("train.loss=hinge", r"train.loss='hinge' is not one of bce, focal"),
        (
            "tta.transforms=identity,vflip",
            r"tta.transforms='vflip' is not one of identity, hflip, shift, shift_back, scale, transpose",
        ),
        ("stack.model=lstm", r"stack.model='lstm' is not one of gru, conv, gru_conv"),
        ("model.backbone=seresnext50", r"unknown backbone 'seresnext50' \(model.backbone\); did you mean"),
    ],
)
def test_values_are_checked_when_the_config_loads(override, message):
    """Each section checks its own knobs at load time: one line naming the key, not an error deep in a run."""
    with pytest.raises(UserError, match=message) as err:
        config.load("tiny", [override])
    assert str(err.value).startswith("config 'tiny': ") and "\n" not in str(err.value)


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        config.load(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  backbon: resnet18\n")
    with pytest.raises(UserError, match=r"typo.yaml: unknown config key 'model.backbon'"):
        config.load(str(typo))


def test_cli_prints_one_line_not_a_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "ich_kaggle", "train", "--config", "nope"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown config 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr
