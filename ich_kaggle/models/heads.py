"""The classification head and the network that joins it to a backbone.

The head is split into `pool` (feature map -> embedding) and `fc` (embedding -> logits) so that the
second-stage sequence model can reuse the pooled embedding (`ICHNet.features`) of every slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import POOLS


class GeM(nn.Module):
    """Generalized-mean pooling: a learnable exponent between average (p=1) and max (p->inf) pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        # Pool in float32: x**p overflows bf16/fp16 for large activations.
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
        return pooled.to(x.dtype)


@POOLS.register("avg")
class AvgPool(nn.Module):
    """(B, C, h, w) -> (B, C): the spatial mean."""

    def out_features(self, channels: int) -> int:
        return channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


@POOLS.register("avgmax")
class AvgMaxPool(AvgPool):
    """(B, C, h, w) -> (B, 2C): average and max concatenated."""

    def out_features(self, channels: int) -> int:
        return 2 * channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().forward(x), F.adaptive_max_pool2d(x, 1).flatten(1)], dim=1)


@POOLS.register("gem")
class GeMPool(AvgPool):
    """(B, C, h, w) -> (B, C) by `GeM` (held as `.gem`: checkpoints name its exponent `head.pool.gem.p`)."""

    def __init__(self) -> None:
        super().__init__()
        self.gem = GeM()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gem(x)


def build_pool(mode: str = "avg") -> nn.Module:
    """The pooling registered as `mode` in `core.registry.POOLS` (one line naming `model.pool` if unknown)."""
    return POOLS.build(mode, key="model.pool")


class Head(nn.Module):
    """Pooling + dropout + one Linear layer to `num_classes` logits."""

    def __init__(self, channels: int, num_classes: int = 6, pool: str = "avg", dropout: float = 0.0):
        super().__init__()
        self.pool = build_pool(pool)
        self.num_features = self.pool.out_features(channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, D) -> logits (B, num_classes)."""
        return self.fc(self.dropout(feats))


class ICHNet(nn.Module):
    """Backbone (image -> deepest feature map) + head (feature map -> 6 logits)."""

    def __init__(self, backbone: nn.Module, head: Head, backbone_name: str = "", in_channels: int = 3):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_name = backbone_name
        self.in_channels = in_channels

    @property
    def num_features(self) -> int:
        return self.head.num_features

    @property
    def num_classes(self) -> int:
        return self.head.fc.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> pooled embedding (B, num_features), before dropout."""
        return self.head.pool(self.backbone(x))

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))
