"""The published ICH methods as experiment recipes: configs in `ich_kaggle/configs/` plus the few mechanisms the
generic engine does not have, registered by name in `core.registry.RECIPES` (nothing below imports this package).

Config (paper): mechanism.
- mil_resnet18 (Kodandarama et al., set-based MIL): `mil.py`: CE(Y, max_i p_i) over a scan's slices + smoothness
  constraint
- tricks_resnet18 (Vasani et al., bag of tricks): engine knobs only (brain-fraction filter, progressive sizes, freeze)
- small_cnn, resnet50_partial (Foo, small CNN vs ResNet-50): `class_weights: balanced` (engine/losses.py),
  `freeze: partial`
- resnext50_seresnet50 (Huang & Chen, ensemble): `models/ensemble.py`; `cv.split: random` (data/folds.py) shows the
  leak
- seresnext50_tta (Danilov, Kotik et al.): a two-member SE-ResNeXt-50 ensemble, TTA

A recipe's entry is the factory of its per-batch loss, `factory(cfg, train_ds=, meta=, loss_fn=, net=, info=)`, which
the train stage hands to the engine (`engine.loop.train_fold(batch_loss=...)`); `standard` has none.
"""

from __future__ import annotations

from ..core.registry import RECIPES
from .mil import MILBatchLoss

RECIPES.register("standard", None)
RECIPES.register("mil", MILBatchLoss)
