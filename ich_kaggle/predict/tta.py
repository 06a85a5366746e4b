"""Test-time augmentation on (B, C, H, W) batches, on the device; each view is registered in `core.registry.TTA`."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..core.registry import TTA

SHIFT_FRACTION = 0.05  # `shift` TTA: right and down by 5 % of the image size
SCALE_FACTOR = 1.1  # `scale` TTA: zoom in by 10 %, centre crop


def shift(x: torch.Tensor, fraction: float = SHIFT_FRACTION) -> torch.Tensor:
    """Right and down by `fraction` of the size (negative: left and up); the border comes in black."""
    h, w = x.shape[-2:]
    dy, dx = max(1, round(h * abs(fraction))), max(1, round(w * abs(fraction)))
    out = torch.zeros_like(x)
    if fraction >= 0:
        out[..., dy:, dx:] = x[..., : h - dy, : w - dx]
    else:
        out[..., : h - dy, : w - dx] = x[..., dy:, dx:]
    return out


def transpose(x: torch.Tensor) -> torch.Tensor:
    """Rows <-> columns (a square image stays square): the view of `augment.transpose`."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return x.transpose(-1, -2).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def scale(x: torch.Tensor, factor: float = SCALE_FACTOR) -> torch.Tensor:
    h, w = x.shape[-2:]
    big = F.interpolate(x, size=(round(h * factor), round(w * factor)), mode="bilinear", align_corners=False)
    top, left = (big.shape[-2] - h) // 2, (big.shape[-1] - w) // 2
    crop = big[..., top : top + h, left : left + w]
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return crop.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


# the views declared in core.registry.TTA (which also says, in TTA_NEEDS, what training must show for each)
TTA.register("identity", lambda x: x)
TTA.register("hflip", lambda x: x.flip(-1))
TTA.register("shift", shift)
TTA.register("shift_back", lambda x: shift(x, -SHIFT_FRACTION))
TTA.register("scale", scale)
TTA.register("transpose", transpose)
TTA.register("hflip_transpose", lambda x: transpose(x.flip(-1)))  # a 90-degree rotation


def tta_forward(
    net: torch.nn.Module, x: torch.Tensor, transforms: list[str], average: str = "prob", want_features: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probabilities (B, 6) averaged over the transforms in probability or logit space, mean pooled features)."""
    probs, logits, feats = [], [], []
    for name in transforms or ["identity"]:
        f = net.features(TTA.get(name, "tta.transforms")(x))
        z = net.classify(f).float()
        logits.append(z)
        probs.append(torch.sigmoid(z))
        if want_features:
            feats.append(f.float())
    p = torch.sigmoid(torch.stack(logits).mean(0)) if average == "logit" else torch.stack(probs).mean(0)
    return p, (torch.stack(feats).mean(0) if want_features else None)
