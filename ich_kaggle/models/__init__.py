"""Models: backbones (smp encoders, pretrainedmodels) + a 6-logit head, with offline weight loading."""

from .heads import GeM, Head, ICHNet, build_pool
from .backbones import (
    FREEZE_MODES,
    Backbone,
    build_backbone,
    freeze,
    input_stats,
    list_backbones,
    load_pretrained,
    register,
)
from .build import build_model
from .weights import expected_files, find_weights, read_state_dict

__all__ = [
    "FREEZE_MODES",
    "Backbone",
    "GeM",
    "Head",
    "ICHNet",
    "build_pool",
    "build_backbone",
    "build_model",
    "expected_files",
    "find_weights",
    "freeze",
    "input_stats",
    "list_backbones",
    "load_pretrained",
    "read_state_dict",
    "register",
]
