"""Test helpers: a BatchNorm-free test backbone (split batches, as accumulation and DDP make them, then give exactly
the full batch's gradients), the tiny training overrides, the settings of the session's trained ensemble, and the
CLI run in-process."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace

import yaml
from torch import nn

from ich_kaggle import models

NAME = "test_nonorm_cnn"

# tiny and fast training overrides shared by the train and predict tests: random init, 32 px, few images, 3 folds
FAST = [
    "model.pretrained=false",
    "data.image_size=32",
    "train.batch_size=8",
    "train.max_images_per_epoch=32",
    "cv.k=3",
    "cv.seed=0",
    "data.num_workers=0",
]


class NoNormCNN(models.Backbone):
    """Two strided convolutions, no normalisation layer."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.out_channels = 16

    def forward(self, x):
        return self.net(x)

    def last_stage(self):
        return [self.net[2]]

    def weight_target(self):
        raise NotImplementedError


models.register(NAME)(NoNormCNN)


# --- the two-member ensemble that several files read (conftest's session fixture `pair`) -------------------------
# tiny + tiny_bone, 1 epoch, 2 folds: every reader passes exactly these --set overrides and member_set, so the
# members' four folds, trained once per session, are "already trained" for each of them
PAIR_SETTINGS = [
    *FAST,
    "cv.k=2",
    "train.epochs=1",
    "stack.model=conv",
    "stack.epochs=2",
    "stack.hidden=8",
    "stack.batch_series=4",
]
PAIR_MEMBER_SET = ["train.seed=1"]


def pair_yaml(path: Path, combine: str = "logit", **extra) -> Path:
    """An ensemble YAML over the session's trained members: a reader writes its own (its stem names the ensemble's
    run folder), so its predictions, stack and choice stay apart from those of the other readers."""
    ensemble = {"members": ["tiny", "tiny_bone"], "combine": combine, "member_set": PAIR_MEMBER_SET}
    path.write_text(yaml.safe_dump({"ensemble": ensemble, "cv": {"k": 2}, **extra}))
    return path


def experiment_args(config: str | Path, data: Path, work: Path, runs: Path, *sets: str) -> list[str]:
    """The flags that name an experiment for a CLI command: config, data, work and runs folders, `--set` overrides."""
    args = ["--config", str(config), "--data", str(data), "--work", str(work), "--runs", str(runs)]
    return args + (["--set", *sets] if sets else [])


def cli(*args: str) -> SimpleNamespace:
    """The CLI's `main` in this process (a `python -m ich_kaggle` would spend most of its time importing torch and
    timm again): its exit code and what it printed."""
    from ich_kaggle.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
