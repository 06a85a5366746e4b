"""DDP on CPU (gloo): 2 processes with global batch 8 (4 per rank) == 1 process with batch 8.

The equivalence test uses a BatchNorm-free backbone: SyncBatchNorm is CUDA-only, so on CPU each rank normalises
its own half batch and BatchNorm nets differ slightly by design (on CUDA the engine converts to SyncBatchNorm).
Everything else is the real path: env-var detection, process group, DistributedSampler, DDP gradient averaging,
sharded validation gathered across ranks, rank-0-only files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from ich_kaggle.core import config
from ich_kaggle import models, train
from ich_kaggle.models.checkpoint import read_checkpoint
from ich_kaggle.core.layout import Layout
from train_helpers import NAME as NONORM, experiment_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = [
    f"model.backbone={NONORM}",
    "model.pretrained=false",
    "model.dropout=0",
    "data.image_size=32",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.max_images_per_epoch=32",
    "train.epochs=2",
    "train.lr=0.003",
    "cv.k=3",
    "cv.seed=0",
    "augment.window_jitter=0.5",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, work: str, runs: str, overrides: list[str]) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CUDA_VISIBLE_DEVICES="",
    )
    torch.set_num_threads(1)
    train.train_fold(config.load("tiny", overrides), Layout.of(data, work), 0, runs=runs)


@pytest.fixture(scope="module")
def comp(tmp_path_factory) -> Layout:
    from ich_kaggle.data import folds, preprocess, synth

    root = tmp_path_factory.mktemp("ddp")
    layout = Layout.of(synth.write_competition(root / "comp", seed=1, studies=12, slices=8, size=48), root / "work")
    folds.load_folds(layout, k=3, seed=0)
    preprocess.ensure(layout)
    return layout


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(comp, tmp_path):
    single = train.train_fold(config.load("tiny", OVERRIDES), comp, 0, runs=tmp_path / "single")
    mp.spawn(
        _worker,
        args=(2, _free_port(), str(comp.data), str(comp.work), str(tmp_path / "ddp"), OVERRIDES),
        nprocs=2,
        join=True,
    )
    ddp = tmp_path / "ddp" / "tiny" / "fold0"
    assert json.loads((ddp / "done.json").read_text())["world_size"] == 2
    ws, wd = read_checkpoint(single / "last.pt")["model"], read_checkpoint(ddp / "last.pt")["model"]
    assert ws.keys() == wd.keys()
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-4, atol=1e-5)
    # it really trained: weights moved away from the shared initialisation
    torch.manual_seed(42)
    init = models.build_model(config.load("tiny", OVERRIDES).model, in_channels=3).state_dict()
    assert any(not torch.allclose(init[k], ws[k]) for k in ws)
    ls, ld = pd.read_csv(single / "log.csv"), pd.read_csv(ddp / "log.csv")
    np.testing.assert_allclose(ld["train_loss"], ls["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(ld["val_weighted_log_loss"], ls["val_weighted_log_loss"], rtol=1e-4)
    os_, od = pd.read_csv(single / "oof.csv"), pd.read_csv(ddp / "oof.csv")
    assert list(os_["image_id"]) == list(od["image_id"])  # gathered shards back in fold order, no duplicates
    np.testing.assert_allclose(od.iloc[:, 1:].to_numpy(), os_.iloc[:, 1:].to_numpy(), atol=1e-4)


def test_global_batch_must_divide_by_world_size():
    from ich_kaggle.engine.dist import DistInfo, per_rank_batch
    from ich_kaggle.core.errors import UserError

    assert per_rank_batch(8, DistInfo(world_size=2)) == 4
    with pytest.raises(UserError, match="must divide"):
        per_rank_batch(9, DistInfo(world_size=2))


@pytest.mark.slow
def test_torchrun_cli_trains_tiny_config(comp, tmp_path):
    """The documented command: torchrun --nproc_per_node=2 -m ich_kaggle train (BatchNorm model, gloo)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(_free_port()),
        "-m",
        "ich_kaggle",
        "train",
        "--fold",
        "1",
        *experiment_args(
            "tiny",
            comp.data,
            comp.work,
            tmp_path,
            "model.pretrained=false",
            "data.image_size=32",
            "train.epochs=1",
            "train.batch_size=8",
            "train.max_images_per_epoch=32",
            "cv.k=3",
            "cv.seed=0",
        ),
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fdir = tmp_path / "tiny" / "fold1"
    assert json.loads((fdir / "done.json").read_text())["world_size"] == 2
    folds = pd.read_csv(comp.folds_csv)
    assert len(pd.read_csv(fdir / "oof.csv")) == (folds["fold"] == 1).sum()
