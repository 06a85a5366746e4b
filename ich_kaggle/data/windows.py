"""HU -> display windows as image channels.

Windows are applied at load time (the cache keeps raw HU), so window sets and window jitter are free to change
between experiments without re-preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.registry import WINDOWS

# (center, width) in Hounsfield units; `data.windows` names them.
WINDOWS.register("brain", (40.0, 80.0))
WINDOWS.register("subdural", (80.0, 200.0))
WINDOWS.register("soft_tissue", (40.0, 380.0))
WINDOWS.register("bone", (600.0, 2800.0))


def named(names: Sequence[str]) -> list[tuple[float, float]]:
    """(center, width) pairs for window names (one line naming `data.windows` for an unknown one)."""
    return [WINDOWS.get(n, "data.windows") for n in names]


def apply_windows(hu: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """(H, W) HU -> (H, W, C) float32 in [0, 1], one channel per (center, width) window."""
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"apply_windows expects a 2-D HU image, got shape {hu.shape}")
    if not windows:
        raise ValueError("apply_windows needs at least one (center, width) window")
    src = hu if hu.dtype == np.float32 else hu.astype(np.float32)
    out = np.empty(hu.shape + (len(windows),), dtype=np.float32)
    for c, (center, width) in enumerate(windows):
        width = float(width)
        if width <= 0:
            raise ValueError(f"window width must be positive, got {width}")
        low = float(center) - width / 2.0
        ch = out[..., c]
        np.subtract(src, np.float32(low), out=ch)
        ch *= np.float32(1.0 / width)
        np.clip(ch, 0.0, 1.0, out=ch)
    return out


def jitter(windows: Sequence[tuple[float, float]], rng: np.random.Generator, hu: float) -> list[tuple[float, float]]:
    """Shift each window's center and width by up to +-hu (uniform); widths stay >= 1 HU (augmentation)."""
    out = []
    for center, width in windows:
        dc, dw = rng.uniform(-hu, hu, size=2)
        out.append((float(center + dc), float(max(1.0, width + dw))))
    return out
