"""Train stage: one fold (or all) of a config, with the recipe's per-batch loss handed to the engine.

The engine (`engine.loop`) knows no recipe; this stage looks the config's `recipe.kind` up in the registry and passes
its factory down, so recipes stay plugins that nothing below them imports.
"""

from __future__ import annotations

from pathlib import Path

from ..core.config import Config
from ..core.layout import Layout
from ..core.registry import RECIPES
from ..engine import loop
from ..engine.lrfind import lr_find

STOP_ENV = loop.STOP_ENV


def train_fold(
    cfg: Config,
    layout: Layout,
    fold: int,
    runs: str | Path = "runs",
    force: bool = False,
    stop_after_epochs: int | None = None,
) -> Path:
    """Train (or resume, or skip if finished) one fold; returns runs/<cfg.name>/fold<k>/."""
    return loop.train_fold(
        cfg,
        layout,
        fold,
        runs=runs,
        force=force,
        stop_after_epochs=stop_after_epochs,
        batch_loss=RECIPES.get(cfg.recipe.kind, "recipe.kind"),
    )


__all__ = ["train_fold", "lr_find", "STOP_ENV"]
