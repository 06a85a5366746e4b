"""Model registry: backbones (smp encoders, pretrainedmodels) + a 6-logit head, with offline weight loading."""

from .heads import GeM, Head, ICHNet, Pool
from .registry import (
    FREEZE_MODES,
    Backbone,
    build_backbone,
    build_model,
    freeze,
    input_stats,
    list_backbones,
    load_pretrained,
    register,
)
from .weights import expected_files, find_weights, read_state_dict

__all__ = [
    "FREEZE_MODES", "Backbone", "GeM", "Head", "ICHNet", "Pool", "build_backbone", "build_model", "expected_files",
    "find_weights", "freeze", "input_stats", "list_backbones", "load_pretrained", "read_state_dict", "register",
]
