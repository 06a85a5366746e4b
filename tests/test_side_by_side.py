"""Folds side by side (`make recipe` on several GPUs): one `train` process per device, each fold the same as one
trained in this process; a failed fold is named in one line and does not stop the others. Run here on CPU with two
pretend devices (CUDA_VISIBLE_DEVICES means nothing to a CPU build of torch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train_helpers
from ich_kaggle import train
from ich_kaggle.core import config
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Layout, Run
from ich_kaggle.demo import fold_jobs
from ich_kaggle.models.checkpoint import read_checkpoint
from ich_kaggle.train.side_by_side import Job, run_jobs

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [*train_helpers.FAST, "model.backbone=small_cnn", "train.epochs=1", "cv.k=2"]


def test_folds_side_by_side_equal_folds_trained_here(tmp_path, monkeypatch):
    from ich_kaggle.data import folds, preprocess, synth

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(ROOT)
    data = synth.write_competition(tmp_path / "comp", seed=4, studies=6, slices=5, size=32)
    layout = Layout.of(data, tmp_path / "work")
    cfg = config.load("tiny", SETTINGS)
    folds.fold_table(layout, cfg.cv)
    preprocess.ensure(layout)
    jobs = fold_jobs(cfg, "tiny", SETTINGS)
    assert [(j.config, j.fold, j.name) for j in jobs] == [("tiny", 0, "tiny"), ("tiny", 1, "tiny")]
    runs = tmp_path / "runs"
    broken = Job("tiny", 0, [*SETTINGS, "train.lr=-1"], "broken")  # fails at once: a bad setting
    with pytest.raises(UserError, match=r"1 of 3 fold\(s\) failed: broken fold 0 \(.*broken_fold0.log\); read the"):
        run_jobs([broken, *jobs], ["0", "1"], data, layout.work, runs, tmp_path / "logs")
    assert "train.lr" in (tmp_path / "logs" / "broken_fold0.log").read_text()
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "broken_fold0.log",
        "tiny_fold0.log",
        "tiny_fold1.log",
    ]
    assert Run.of(runs, "tiny").finished([0, 1]) == [0, 1]  # the failure stopped neither of the others
    here = train.train_fold(cfg, layout, 1, runs=tmp_path / "here")
    a = read_checkpoint(runs / "tiny" / "fold1" / "best.pt")["model"]
    b = read_checkpoint(here / "best.pt")["model"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
