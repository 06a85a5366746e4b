"""Recipe knobs that are checked when a config is loaded (torch-free, so `config.load` stays light)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import Config
from ..errors import UserError


@dataclass
class MILSettings:
    kind: str = "mil"
    bag_size: int = 0
    mil_weight: float = 1.0
    smooth_weight: float = 0.1
    margin: float = 0.0
    scan_only_fraction: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config) -> "MILSettings":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(cfg.recipe) - set(known))
        if unknown:
            raise UserError(f"config '{cfg.name}': unknown recipe key(s) {unknown} for recipe.kind=mil; "
                            f"known: {', '.join(known)}")
        out = cls()
        for key, value in cfg.recipe.items():
            tp = type(getattr(out, key))
            try:
                setattr(out, key, tp(value))
            except (TypeError, ValueError):
                raise UserError(f"config '{cfg.name}': recipe.{key}={value!r} must be a {tp.__name__}") from None
        if out.bag_size < 0 or out.bag_size in (1, 2):
            raise UserError(f"config '{cfg.name}': recipe.bag_size must be 0 (whole series) or at least 3")
        if not 0.0 <= out.scan_only_fraction < 1.0:
            raise UserError(f"config '{cfg.name}': recipe.scan_only_fraction must be in [0, 1)")
        return out
