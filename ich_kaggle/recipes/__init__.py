"""The published ICH methods as experiment recipes: configs in `ich_kaggle/configs/` plus the few mechanisms the
generic engine does not have.

| config | paper | mechanism here |
|---|---|---|
| mil_resnet18 | Kodandarama et al., set-based MIL | `mil.py`: CE(Y, max_i p_i) over a scan's slices + smoothness constraint |
| tricks_resnet18 | Vasani et al., bag of tricks | engine knobs only (brain-fraction filter, progressive sizes, freeze) |
| small_cnn, resnet50_partial | Foo, small CNN vs ResNet-50 | `class_weights: balanced` (losses.py), `freeze: partial` |
| resnext50_seresnet50 | Huang & Chen, ensemble | `ensemble.py`; `cv.split: random` leak demo in `split.py` |
| seresnext50_tta | Danilov, Kotik et al. | a two-member SE-ResNeXt-50 ensemble, TTA |

A recipe that needs its own per-batch loss sets `recipe.kind` (only `mil` so far); the engine asks
`batch_loss_for(...)` for it once per fold.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..errors import UserError

KINDS = ("standard", "mil")


def kind(cfg: Config) -> str:
    value = str(cfg.recipe.get("kind", "standard"))
    if value not in KINDS:
        raise UserError(f"config '{cfg.name}': recipe.kind={value!r} is not one of {', '.join(KINDS)}")
    return value


def validate(cfg: Config) -> None:
    """recipe.kind and that kind's knobs (called by `config.validate`, so mistakes fail at load time)."""
    if kind(cfg) == "mil":
        from .settings import MILSettings

        MILSettings.from_config(cfg)


def batch_loss_for(cfg: Config, **context: Any):
    """The recipe's per-batch loss (see `mil.MILBatchLoss`) or None for the engine's standard one.

    context: train_ds, meta, loss_fn, net, info (what `engine.loop._train_fold` has at hand).
    """
    if kind(cfg) == "mil":
        from .mil import MILBatchLoss

        return MILBatchLoss(cfg, **context)
    return None


__all__ = ["KINDS", "kind", "validate", "batch_loss_for"]
