"""Runs: RUN= names an experiment folder, --force keeps the old fold until the new one is done, folds record what
made them (data, code, packages) and runs of different data are never mixed."""

from __future__ import annotations

import json

import pytest

from ich_kaggle import train
from ich_kaggle.core import config
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Layout, Run
from ich_kaggle.engine import loop
from train_helpers import FAST  # tiny and fast: random init, 32 px, few images per epoch


@pytest.fixture(scope="module")
def comp(competition, tmp_path_factory) -> Layout:
    """The session's synthetic competition (shared, read only) with this module's own work folder."""
    return Layout.of(competition(seed=0), tmp_path_factory.mktemp("runs") / "work")


def _cfg(*extra: str, run: str | None = None) -> config.Config:
    return config.load("tiny", [*FAST, "train.epochs=1", *extra], run=run)


class Boom(RuntimeError):
    pass


def exploding_loss(cfg, **_):
    """A recipe's batch loss that fails on the first batch: a retrain interrupted mid-training."""

    class Loss:
        def start_epoch(self, epoch, size):
            pass

        def __call__(self, model, x, y, idx):
            raise Boom("interrupted")

    return Loss()


@pytest.mark.slow
def test_new_run_trains_beside_the_old_and_force_keeps_the_old_fold_until_the_new_is_done(comp, tmp_path):
    runs = tmp_path / "runs"
    old = train.train_fold(_cfg(), comp, 0, runs=runs)
    assert old == runs / "tiny" / "fold0"
    done = json.loads((old / "done.json").read_text())
    assert set(done["packages"]) == {"torch", "timm", "numpy", "pandas", "pydicom"} and done["packages"]["torch"]
    assert done["code"] is None or {"commit", "dirty"} <= set(done["code"])  # None outside git
    assert done["data"]["path"] == str(comp.data.resolve()) and done["data"]["images"]

    # a changed setting: refused in the old run (naming RUN=), trained beside it under a new RUN
    with pytest.raises(UserError, match="different config.*train.lr.*--run <new name>.*--force"):
        train.train_fold(_cfg("train.lr=0.5"), comp, 0, runs=runs)
    beside = train.train_fold(_cfg("train.lr=0.5", run="tiny-lr"), comp, 0, runs=runs)
    assert beside == runs / "tiny-lr" / "fold0" and (beside / "done.json").exists()
    assert config.load(str(beside / "config.yaml")).name == "tiny-lr"
    assert (old / "done.json").exists()

    # --force, interrupted mid-training: the old finished fold is untouched and still the one stages read
    best = (old / "best.pt").read_bytes()
    with pytest.raises(Boom):
        loop.train_fold(_cfg("train.lr=0.5"), comp, 0, runs=runs, force=True, batch_loss=exploding_loss)
    assert (old / "best.pt").read_bytes() == best and Run(runs / "tiny").finished([0]) == [0]
    assert (runs / "tiny" / "fold0.new").is_dir() and not (runs / "tiny" / "fold0.new" / "done.json").exists()
    # --force that finishes: the new fold replaces the old one, nothing left aside
    assert train.train_fold(_cfg("train.lr=0.5"), comp, 0, runs=runs, force=True) == old
    assert (old / "best.pt").read_bytes() != best and (old / "done.json").exists()
    assert config.load(str(old / "config.yaml")).train.lr == 0.5
    assert sorted(p.name for p in (runs / "tiny").iterdir()) == ["fold0"]


def test_ensemble_run_names_its_members(tmp_path):
    cfg = config.load("demo", run="demo-b")
    from ich_kaggle.core import ensemble

    members = ensemble.load_members(cfg)
    assert cfg.name == "demo-b" and [m.name for m in members] == ["demo-b.tiny", "demo-b.tiny_bone"]
    assert ensemble.member_names(cfg) == ["demo-b.tiny", "demo-b.tiny_bone"]
    assert [m.name for m in ensemble.load_members(config.load("demo"))] == ["tiny", "tiny_bone"]
    with pytest.raises(UserError, match="RUN='a/b'"):
        config.load("tiny", run="a/b")


def test_runs_of_different_data_are_not_mixed(comp, competition, tmp_path):
    runs = tmp_path / "runs"
    train.train_fold(_cfg(), comp, 1, runs=runs)
    other = Layout.of(competition(seed=1), tmp_path / "work_other")
    with pytest.raises(UserError, match="trained on the data folder .*comp.*--run <new name>"):
        train.train_fold(_cfg(), other, 1, runs=runs)
