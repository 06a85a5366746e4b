"""Weight averaging during training: an exponential moving average of the weights (timm's ModelEmaV3), as a hook.

Checkpoint averaging at the cost of one extra copy of the weights: the average is what is validated, kept as best.pt
and predicted with, while the optimizer steps the raw weights (saved in last.pt beside it, so a resumed run goes on
with both). timm's warm-up keeps the decay small for the first steps, `1 - (1 + step) ** -2/3` capped at
`train.ema`, so a short run is never stuck near its initial weights.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3

from ..core.config import Config
from .hooks import Hook


class WeightAverage(Hook):
    """The EMA of `net`'s weights and buffers (BatchNorm statistics too), updated after every optimizer step."""

    key = "ema"

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.net = net
        self.average = ModelEmaV3(net, decay=decay, use_warmup=True)
        self.steps = 0

    @property
    def module(self) -> torch.nn.Module:
        return self.average.module

    def after_step(self) -> None:
        self.steps += 1
        self.average.update(self.net, step=self.steps)

    def weights(self, net: torch.nn.Module) -> torch.nn.Module:
        return self.module

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.steps = int(state["steps"])


def build(cfg: Config, net: torch.nn.Module) -> WeightAverage | None:
    """`train.ema` > 0: the average of `net` (already on its device); 0: none, the raw weights are used."""
    return WeightAverage(net, cfg.train.ema) if cfg.train.ema > 0 else None
