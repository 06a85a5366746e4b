"""Checkpoints: one dict per file with at least `model` (state_dict) and `config` (Config.to_dict()).

Loading rebuilds the network from the stored config with pretrained=False, so predicting (and the Kaggle kernel)
never needs the ImageNet weights file, only the checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..core.config import Config, from_dict
from ..core.errors import UserError, fix
from ..core.io import atomic_path

PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel and torch.compile


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP/compile wrapper prefixes (possibly nested, e.g. `_orig_mod.module.`) from every key."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """torch.save atomically: an interrupted save never leaves a truncated checkpoint behind."""
    if "model" not in payload or "config" not in payload:
        raise ValueError("a checkpoint needs 'model' and 'config'")
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as e:  # disk full shows up as torch's "unexpected pos" RuntimeError
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(
            f"cannot write the checkpoint {path} ({reason}); free disk space or make "
            f"{Path(path).parent} writable, then rerun the same command to resume"
        ) from None
    return Path(path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict; a missing or truncated file is a UserError naming it."""
    path = Path(path)
    if not path.exists():
        retrain = fix("python -m ich_kaggle train --fold <k>", "make train fold=<k>")
        raise UserError(f"checkpoint {path} not found; train that fold first ({retrain})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise UserError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"delete it and retrain that fold with {fix('--force', 'FORCE=1')}"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"checkpoint {path} has no 'model'/'config' entries; it was not written by ich_kaggle train")
    return ckpt


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config]:
    """(model in eval mode with the stored weights, the Config it was trained with)."""
    from . import build_model

    ckpt = read_checkpoint(path, map_location)
    cfg = from_dict(ckpt["config"], source=str(path))
    build_cfg = dataclasses.replace(cfg.model, pretrained=False, weights=None)
    model = build_model(build_cfg, in_channels=cfg.data.in_channels, num_classes=int(ckpt.get("num_classes", 6)))
    try:
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    except RuntimeError as e:
        raise UserError(
            f"checkpoint {path} does not match model {cfg.model.backbone} "
            f"({str(e).splitlines()[0]}); it may come from another version of the code"
        ) from None
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    model.eval()
    return model, cfg
