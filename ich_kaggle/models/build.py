"""`build_model`: a config's network, one backbone or an `a+b` ensemble averaging its members' probabilities."""

from __future__ import annotations

from ..core.config import ModelConfig
from .backbones import build_single
from .ensemble import build_ensemble, is_ensemble
from .heads import ICHNet


def build_model(cfg: ModelConfig, in_channels: int = 3, num_classes: int = 6) -> ICHNet:
    """Backbone(s) + offline ImageNet weights when cfg.pretrained + head; cfg.freeze applied."""
    if is_ensemble(cfg.backbone):
        return build_ensemble(cfg, in_channels, num_classes)
    return build_single(cfg, in_channels, num_classes)
