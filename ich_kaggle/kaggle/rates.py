"""Images per second of one Kaggle T4, per backbone and image size: measured (`make kernel-gpu-check`, kept in
`kaggle_rates.yaml`, a file the user commits) or, until then, estimated and said to be.

The estimates (no T4 was available to this work): ResNet-50 mixed-precision training on one T4 is about 250 img/s at
224 px in NVIDIA's DeepLearningExamples (PyTorch ConvNets) tables; scaled by pixel count to 512 px (/5.2) that is
~48 img/s, and SE-ResNeXt-50's grouped convolutions and SE blocks run at about 0.6x ResNet-50's speed -> ~29 img/s.
Inference (no backward pass) runs about 3x the training rate. Two T4s under DDP are taken as 1.8x one. Other sizes
scale by pixel count.

The measured file (`kaggle_rates.yaml` in the working directory, or $ICH_KAGGLE_RATES):
    se_resnext50_32x4d:
      512: {train: 31.0, infer: 98.0, gpu: Tesla T4, measured: 2026-12-07}
Each figure is the model's forward(+backward) rate on one T4 with the precision training picks (fp16 on a T4),
random inputs: the data loader is not in it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..core.errors import UserError

RATES_FILE = "kaggle_rates.yaml"
RATES_ENV = "ICH_KAGGLE_RATES"
T4_TRAIN_IMAGES_PER_S_512 = {
    "se_resnext50_32x4d": 29.0,
    "se_resnext101_32x4d": 17.0,
    "resnet50": 48.0,
    "resnet18": 140.0,
    "tu-tf_efficientnet_lite0": 110.0,
    "small_cnn": 2000.0,
}
DEFAULT_BACKBONE = "se_resnext50_32x4d"
INFERENCE_SPEEDUP = 3.0
TWO_GPU_SCALING = 1.8


@dataclass(frozen=True)
class Rate:
    train: float  # images/s of one T4, training (forward + backward)
    infer: float  # images/s of one T4, inference
    measured: bool
    source: str

    def describe(self) -> str:
        return (
            f"{self.train:.0f} train / {self.infer:.0f} inference img/s per T4 "
            f"[{'measured, ' if self.measured else 'ESTIMATE, '}{self.source}]"
        )


def rates_path() -> Path:
    return Path(os.environ.get(RATES_ENV) or RATES_FILE)


def measured_rates(path: Path | None = None) -> dict[str, dict[int, dict]]:
    """backbone -> size -> {train, infer, ...} from the rates file (empty when there is none)."""
    path = path or rates_path()
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({e}); fix it or delete it to use the estimates") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must map backbone -> size -> {{train, infer}}; fix it or delete it")
    return {str(b): {int(s): dict(v) for s, v in (sizes or {}).items()} for b, sizes in data.items()}


def rate(backbone: str, size: int, path: Path | None = None) -> Rate:
    """One T4's rates for `backbone` (a `a+b` model: its parts one after the other) at `size` px."""
    measured = measured_rates(path)
    parts = backbone.split("+")
    if all(size in measured.get(p, {}) for p in parts):
        train = 1 / sum(1 / float(measured[p][size]["train"]) for p in parts)
        infer = 1 / sum(
            1 / float(measured[p][size].get("infer", measured[p][size]["train"] * INFERENCE_SPEEDUP)) for p in parts
        )
        return Rate(train, infer, True, f"{path or rates_path()}")
    scale = (512 / size) ** 2
    train = scale / sum(
        1 / T4_TRAIN_IMAGES_PER_S_512.get(p, T4_TRAIN_IMAGES_PER_S_512[DEFAULT_BACKBONE]) for p in parts
    )
    return Rate(
        train,
        train * INFERENCE_SPEEDUP,
        False,
        f"documented rate for {backbone} at {size} px in ich_kaggle/kaggle/rates.py; measure with "
        f"make kernel-gpu-check",
    )


# --- inside the GPU-check kernel ------------------------------------------------------------------------------------
def measure(backbone: str, size: int, in_channels: int = 3, batch: int = 16, steps: int = 10) -> dict:
    """Training and inference images/s of one GPU for `backbone` at `size` (random weights and inputs, the precision
    training picks, channels_last)."""
    import torch

    from ..core.config import ModelConfig
    from ..engine.precision import choose
    from ..models import build_model

    device = torch.device("cuda", 0)
    precision = choose("bf16", device)
    model = build_model(ModelConfig(backbone=backbone, pretrained=False), in_channels=in_channels)
    model = model.to(device).to(memory_format=torch.channels_last)
    x = torch.rand(batch, in_channels, size, size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.rand(batch, model.num_classes, device=device)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.scaler)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def timed(step, n: int) -> float:
        step()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize(device)
        return n * batch / (time.perf_counter() - start)

    def train_step() -> None:
        with precision.autocast():
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    model.train()
    train = timed(train_step, steps)
    model.eval()

    @torch.no_grad()
    def infer_step() -> None:
        with precision.autocast():
            model(x)

    infer = timed(infer_step, steps)
    return {
        "train": round(train, 1),
        "infer": round(infer, 1),
        "gpu": torch.cuda.get_device_name(device),
        "precision": precision.amp,
        "batch": batch,
        "measured": time.strftime("%Y-%m-%d"),
    }
