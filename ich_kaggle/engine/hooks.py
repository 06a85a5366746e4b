"""Training hooks: behaviour the loop calls at fixed points (as Lightning's callbacks), each owning its own state.

The loop calls every hook at the same points, whatever it does: `after_step()` after every optimizer step; it
validates, keeps as best.pt and predicts with the module `weights(net)` gives; it saves `state_dict()` in last.pt and
hands it back to `load_state_dict` on resume. A hook's state sits in last.pt under the hook's `key`, a top-level key:
the weight average's has always been "ema", so checkpoints written before hooks existed resume unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..core.errors import UserError, fix


class Hook:
    """One piece of training behaviour; the base class does nothing."""

    key = ""  # the key of this hook's state in last.pt

    def after_step(self) -> None:
        """Called after every optimizer step."""

    def weights(self, net: torch.nn.Module) -> torch.nn.Module:
        """The module validated, kept as best.pt and predicted with, given the trained `net`."""
        return net

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` gave (resuming from last.pt)."""


class Hooks:
    """The hooks of one fold's training, called in order."""

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        self.hooks = list(hooks)
        keys = [h.key for h in self.hooks]
        if len(set(keys)) != len(keys) or not all(keys):
            raise ValueError(f"hooks need distinct, non-empty keys: {keys}")

    def __iter__(self) -> Iterator[Hook]:
        return iter(self.hooks)

    def after_step(self) -> None:
        for hook in self.hooks:
            hook.after_step()

    def weights(self, net: torch.nn.Module) -> torch.nn.Module:
        for hook in self.hooks:
            net = hook.weights(net)
        return net

    def state_dict(self) -> dict[str, dict]:
        """{hook key: its state}: merged into last.pt's top level."""
        return {hook.key: hook.state_dict() for hook in self.hooks}

    def load_state_dict(self, checkpoint: dict, path: Path) -> None:
        """Each hook's state from the checkpoint `path` (its top-level key)."""
        for hook in self.hooks:
            if hook.key not in checkpoint:
                raise UserError(
                    f"{path} holds no '{hook.key}' state to resume from; "
                    f"retrain the fold with {fix('--force', 'FORCE=1')}"
                )
            hook.load_state_dict(checkpoint[hook.key])
