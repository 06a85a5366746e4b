"""Multi-backbone ensembles as one model (Huang & Chen: ResNeXt-50 + SE-ResNet-50; Kotik: two SE-ResNeXt-50s).

A `model.backbone` joined with `+` (`resnext50_32x4d+se_resnet50`) builds an `EnsembleNet`: every member is a
backbone + head on the same input. In eval mode its logits are logit(mean_m sigmoid(member logits)), the average of
the members' probabilities, so predict / stack / kernel / report use it like any single model (its embedding is the
members' embeddings side by side). In training mode it returns the members' logits side by side (B, M * K) and
`MemberSumLoss` adds up each member's own loss: the members share no parameter, so this is exactly training them
separately, but in one pass over the data and one checkpoint per fold.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelConfig
from ..core.errors import UserError
from .backbones import build_single, freeze
from .heads import Head, ICHNet

SEP = "+"


def member_names(backbone: str) -> list[str]:
    """`a+b+c` -> [a, b, c]; a plain backbone name -> [name]."""
    names = [n.strip() for n in backbone.split(SEP)]
    if any(not n for n in names):
        raise UserError(
            f"model.backbone={backbone!r}: an ensemble lists backbones joined by '+', e.g. "
            f"resnext50_32x4d+se_resnet50 (an empty name is not allowed)"
        )
    return names


def is_ensemble(backbone: str) -> bool:
    return SEP in backbone


def mean_probability_logit(member_logits: torch.Tensor) -> torch.Tensor:
    """(B, M, K) member logits -> (B, K) logit of the mean sigmoid, computed in log space (no overflow at |z| >> 1).

    log(mean p) - log(1 - mean p) = logsumexp(logsigmoid(z)) - logsumexp(logsigmoid(-z)) (the 1/M cancels).
    """
    z = member_logits.float()
    return torch.logsumexp(F.logsigmoid(z), dim=1) - torch.logsumexp(F.logsigmoid(-z), dim=1)


class EnsembleBackbone(nn.Module):
    """Runs every member backbone; returns their feature maps as a tuple (Grad-CAM explains the last member's)."""

    def __init__(self, backbones: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(backbones)
        self.out_channels = sum(int(b.out_channels) for b in backbones)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(b(x) for b in self.members)

    def last_stage(self) -> list[nn.Module]:
        """Every member's last stage (what `freeze(model, 'partial')` keeps trainable)."""
        return [m for b in self.members for m in b.last_stage()]


class EnsembleHead(nn.Module):
    """Member heads. `pool` maps the feature-map tuple to the concatenated embedding; `forward` combines logits."""

    def __init__(self, heads: list[Head]):
        super().__init__()
        self.members = nn.ModuleList(heads)
        self.sizes = [int(h.num_features) for h in heads]
        self.num_features = sum(self.sizes)

    def pool(self, maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat([h.pool(m) for h, m in zip(self.members, maps)], dim=1)

    def member_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, sum D_m) -> (B, M, K)."""
        parts = feats.split(self.sizes, dim=1)
        return torch.stack([h(p) for h, p in zip(self.members, parts)], dim=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        logits = self.member_logits(feats)
        if self.training:  # each member's own logits, for MemberSumLoss
            return logits.flatten(1)
        return mean_probability_logit(logits).to(logits.dtype)


class EnsembleNet(ICHNet):
    """An ICHNet whose backbone and head are M members'; `members()` gives each member as its own ICHNet view."""

    def __init__(self, backbones: list[nn.Module], heads: list[Head], backbone_name: str, in_channels: int):
        super().__init__(
            EnsembleBackbone(backbones), EnsembleHead(heads), backbone_name=backbone_name, in_channels=in_channels
        )

    @property
    def num_members(self) -> int:
        return len(self.head.members)

    @property
    def num_classes(self) -> int:
        return self.head.members[0].fc.out_features

    def members(self) -> list[ICHNet]:
        """Each member as a stand-alone ICHNet sharing this ensemble's parameters (for checks and Grad-CAM)."""
        return [
            ICHNet(b, h, backbone_name=n, in_channels=self.in_channels)
            for b, h, n in zip(self.backbone.members, self.head.members, member_names(self.backbone_name))
        ]


def build_ensemble(cfg: ModelConfig, in_channels: int = 3, num_classes: int = 6) -> EnsembleNet:
    """One member per name in cfg.backbone (each with its own ImageNet weights when pretrained); cfg.freeze applied."""

    names = member_names(cfg.backbone)
    if len(names) < 2:
        raise UserError(f"model.backbone={cfg.backbone!r}: an ensemble needs at least two members")
    if cfg.pretrained and cfg.weights and Path(cfg.weights).expanduser().is_file() and len(set(names)) > 1:
        raise UserError(
            f"model.weights={cfg.weights} is one file but the ensemble {cfg.backbone} has different "
            f"backbones; give the folder holding each member's ImageNet weights instead"
        )
    members = [
        build_single(dataclasses.replace(cfg, backbone=name, freeze="none"), in_channels, num_classes) for name in names
    ]
    model = EnsembleNet([m.backbone for m in members], [m.head for m in members], cfg.backbone, in_channels)
    freeze(model, cfg.freeze)
    return model


class MemberSumLoss(nn.Module):
    """Sum of `base` over the members' logits (B, M * K); plain `base` on combined (B, K) logits."""

    def __init__(self, base: nn.Module, members: int, num_classes: int = 6):
        super().__init__()
        self.base, self.members, self.num_classes = base, int(members), int(num_classes)

    @property
    def weights(self) -> torch.Tensor:
        return self.base.weights

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == self.num_classes:
            return self.base(logits, targets)
        if logits.shape[1] != self.members * self.num_classes:
            raise ValueError(
                f"expected {self.members} x {self.num_classes} member logits, got shape {tuple(logits.shape)}"
            )
        z = logits.view(len(logits), self.members, self.num_classes)
        return sum(self.base(z[:, m], targets) for m in range(self.members))


__all__ = [
    "EnsembleNet",
    "EnsembleBackbone",
    "EnsembleHead",
    "MemberSumLoss",
    "build_ensemble",
    "is_ensemble",
    "member_names",
    "mean_probability_logit",
]
