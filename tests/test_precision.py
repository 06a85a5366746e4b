"""Precision by compute capability (monkeypatched: no GPU here): T4 -> fp16, A100 -> bf16, P100 -> a clear stop,
for training (engine.loop's autocast and GradScaler) and inference (predict) alike."""

from __future__ import annotations

import warnings

import pytest
import torch

from ich_kaggle.core import config
from ich_kaggle.core.errors import UserError
from ich_kaggle.engine import loop, precision
from ich_kaggle.predict import stage as predict

# what Kaggle's CUDA 12.8 torch wheel is built for (no sm_60: Pascal is gone)
KAGGLE_ARCHES = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
GPUS = {
    (7, 5): "Tesla T4",
    (8, 0): "NVIDIA A100-SXM4-80GB",
    (6, 0): "Tesla P100-PCIE-16GB",
    (8, 6): "RTX 3090",
    (7, 0): "Tesla V100",
}
CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a GPU of the given capability is device 0."""

    def set_cap(cap, arches=KAGGLE_ARCHES):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPUS[cap])
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arches))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 answers (emulation)

    return set_cap


@pytest.mark.parametrize(
    "cap, requested, amp, scaler",
    [
        ((7, 5), "bf16", "fp16", True),  # T4: is_bf16_supported() says True, cuDNN has no bf16 convolutions
        ((7, 0), "bf16", "fp16", True),
        ((8, 0), "bf16", "bf16", False),
        ((8, 6), "bf16", "bf16", False),
        ((8, 0), "fp16", "fp16", True),  # asked for fp16: kept
        ((7, 5), "none", "none", False),
    ],
)
def test_precision_from_capability(gpu, cap, requested, amp, scaler):
    gpu(cap)
    got = precision.choose(requested, CUDA)
    assert (got.amp, got.scaler) == (amp, scaler)
    assert GPUS[cap] in got.describe() and f"{cap[0]}.{cap[1]}" in got.describe()


def test_p100_stops_with_the_reason(gpu):
    gpu((6, 0))
    with pytest.raises(UserError) as e:
        precision.choose("bf16", CUDA)
    msg = str(e.value)
    assert "\n" not in msg and "Tesla P100" in msg and "compute capability 6.0" in msg
    assert "no CUDA kernels" in msg and "NvidiaTeslaT4" in msg  # says why and what to do
    gpu((6, 0), arches=["sm_60", "sm_70"])  # a torch built for Pascal runs it, in float32 (no tensor cores)
    assert precision.choose("bf16", CUDA).amp == "none"


def test_cpu_keeps_its_autocast():
    cpu = torch.device("cpu")
    assert precision.choose("bf16", cpu).amp == "bf16" and precision.choose("fp16", cpu).amp == "bf16"
    assert precision.choose("none", cpu).amp == "none" and not precision.choose("fp16", cpu).scaler


def test_training_and_inference_use_it(gpu):
    cfg = config.load("tiny", ["train.amp=bf16"])
    gpu((7, 5))
    with warnings.catch_warnings():  # CUDA autocast where there is no CUDA: built (then disabled) with a warning
        warnings.simplefilter("ignore")
        ctx = loop.autocast(cfg, CUDA)
    assert ctx.fast_dtype == torch.float16
    assert predict.inference_precision(cfg, CUDA).amp == "fp16"
    assert predict.inference_precision(cfg, torch.device("cpu")).amp == "none"  # float32 on CPU, as before
    gpu((8, 0))
    assert predict.inference_precision(cfg, CUDA).amp == "bf16"
    gpu((6, 0))
    with pytest.raises(UserError, match="Tesla P100"):
        loop.autocast(cfg, CUDA)
    with pytest.raises(UserError, match="Tesla P100"):
        predict.inference_precision(cfg, CUDA)


# --- make gpu-check: what can be checked without a GPU ----------------------------------------------------------
def test_gpu_check_without_cuda_is_one_line():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "ich_kaggle", "gpu-check"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no CUDA device visible (CUDA_VISIBLE_DEVICES=''): torch {torch.__version__} sees none, and make "
        f"gpu-check checks the GPU paths; run it on a machine with an NVIDIA GPU"
    ]


def test_gpu_check_verdict_on_the_loss():
    from ich_kaggle.bench.gpu import loss_problem

    assert loss_problem([0.30, 0.25, 0.21]) is None
    assert "did not fall" in loss_problem([0.30, 0.31, 0.30])
    assert "not finite in epoch(s) [2]" in loss_problem([0.30, float("nan"), 0.2])
    assert "not finite" in loss_problem([0.3, float("inf")]) and loss_problem([]) == "no epoch finished"
