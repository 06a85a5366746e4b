"""Forward+backward throughput and peak memory of one backbone at one size: what sizes/batches fit a device."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import nullcontext

import torch

from ..core.config import ModelConfig
from ..models.build import build_model


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def bench_forward_backward(
    backbone: str = "se_resnext50_32x4d",
    size: int = 512,
    batch: int = 4,
    in_channels: int = 3,
    steps: int = 3,
    warmup: int = 1,
    device: str | None = None,
) -> dict:
    """images/s of forward+backward (no optimizer step) with random weights, plus peak RSS / CUDA memory.

    On CUDA it runs as training does: bf16 autocast and channels_last. Warm-up steps are not timed.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(ModelConfig(backbone=backbone, pretrained=False), in_channels=in_channels).to(dev).train()
    x = torch.rand(batch, in_channels, size, size, device=dev)
    target = torch.rand(batch, model.num_classes, device=dev)
    cuda = dev.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def step() -> None:
        with autocast:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    return {
        "backbone": backbone,
        "size": size,
        "batch": batch,
        "in_channels": in_channels,
        "device": dev.type,
        "images_per_s": steps * batch / seconds,
        "seconds_per_step": seconds / steps,
        "peak_rss_mb": _peak_rss_mb(),
        "cuda_peak_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else 0.0,
    }
