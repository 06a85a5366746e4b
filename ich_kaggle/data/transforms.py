"""Augmentations (albumentations 2), split where Hounsfield units end: geometry on HU slices, then windows.

`SliceDataset` hands a `SliceTransform` the head-cropped HU slices of one sample (one, or 2n+1 for 2.5D; square
crops by default, `data.crop_square`, so the resize keeps the head's aspect ratio) and gets the model's input back,
(slices x windows, size, size) float32 in [0, 1]:

1. geometry (resize to `size`, random resized crop, flips, transpose, affine) runs once per HU slice, at the size the
   model sees, with one draw shared by all slices; the affine's empty border is filled with a HU value below every
   window, so it windows to black as the old fill of 0 did;
2. windows (data/windows.py) are computed at that size, with the brightness/contrast change folded into the window's
   linear map (exactly equal to applying it to the windowed values and clipping);
3. blur, the one step that needs windowed values, runs last on the channels.

The parameters are drawn by the albumentations transforms themselves (`should_apply`, `get_params...`), from the
generator the dataset seeds per (seed, epoch, index), in the order of the single pipeline on windowed images that
this replaced (Compose: Resize, RandomResizedCrop, HorizontalFlip, Transpose, Affine, RandomBrightnessContrast,
GaussianBlur): a sample gets the same draw as before. Each step is applied with its own `apply`, per slice, not
through `A.Compose`: measured on this machine (one thread, 480 px, 3 slices), Compose with the slices as additional
targets cost ~1.5x the bare steps, and Affine on one 3-channel float image ~3x three 1-channel ones.
Each augmentation has its own probability in `AugmentConfig`; 0 leaves it out. Eval transforms only resize, so
OOF/test predictions see the same geometry as training.
"""

from __future__ import annotations

import random
from typing import Any

import albumentations as A
import cv2
import numpy as np

from ..core.config import Config
from .windows import named, window_planes


def _size(cfg: Config, size: int | None) -> int:
    return int(size or cfg.data.image_size)


def fill_hu(cfg: Config) -> float:
    """A HU value below the low end of every window of `data.windows`, also after window jitter (each of center and
    width moves by at most window_jitter_hu, so the low end by at most 1.5 times that)."""
    lows = [c - w / 2.0 for c, w in named(cfg.data.windows)]
    return float(min(lows) - 1.5 * cfg.augment.window_jitter_hu - 1.0)


def _rescale(w: float, h: float, out_w: float, out_h: float) -> np.ndarray:
    """cv2.resize's map from a w x h image to out_w x out_h: x' = (x + 0.5) * out_w / w - 0.5."""
    sx, sy = out_w / w, out_h / h
    return np.array([[sx, 0.0, 0.5 * (sx - 1)], [0.0, sy, 0.5 * (sy - 1)], [0.0, 0.0, 1.0]])


class SliceTransform:
    """Geometry on HU slices -> windows (with brightness/contrast folded in) -> blur; see the module docstring."""

    def __init__(
        self,
        size: int,
        geometry: list[A.BasicTransform],
        contrast: A.RandomBrightnessContrast | None = None,
        blur: A.GaussianBlur | None = None,
    ) -> None:
        if not geometry or not isinstance(geometry[0], A.Resize):
            raise ValueError("the geometry must start with Resize (every later step then sees a size x size image)")
        self.size, self.geometry, self.contrast, self.blur = size, geometry, contrast, blur
        self.fill = next((float(t.fill) for t in geometry if isinstance(t, A.Affine)), 0.0)
        self.py_random: random.Random | None = None

    @property
    def transforms(self) -> list[A.BasicTransform]:
        """Every step in the order its parameters are drawn."""
        return [*self.geometry, *(t for t in (self.contrast, self.blur) if t is not None)]

    def set_random_state(self, rng: np.random.Generator, py_random: random.Random) -> None:
        """Draw from these generators (the dataset's per-sample ones) from now on."""
        self.py_random = py_random
        for t in self.transforms:
            t.set_random_state(rng, py_random)

    @staticmethod
    def _draw(t: A.BasicTransform, shape: tuple[int, ...]) -> dict[str, Any] | None:
        """`t`'s parameters for an image of `shape`, drawn as `t(image=...)` draws them; None if it is skipped."""
        if not t.should_apply():
            return None
        data = {"image": np.broadcast_to(np.float32(0), shape)}  # the draws read only the shape and dtype
        params = t.update_transform_params(t.get_params(), data)
        params.update(t.get_params_dependent_on_data(params, data))
        return params

    def _matrix(self, steps: list[tuple[A.BasicTransform, dict[str, Any]]], shape: tuple[int, ...]) -> np.ndarray:
        """The 2 x 3 map from the input's pixel coordinates to the output's that the applied `steps` make together
        (pixel centres at integer coordinates, as OpenCV's resize, flip and warpAffine use them)."""
        s = self.size
        m = np.eye(3)
        for t, params in steps:
            if isinstance(t, A.Resize):
                step = _rescale(shape[1], shape[0], s, s)
            elif isinstance(t, A.RandomResizedCrop):
                x1, y1, x2, y2 = params["crop_coords"]
                step = _rescale(x2 - x1, y2 - y1, s, s) @ np.array([[1.0, 0, -x1], [0, 1, -y1], [0, 0, 1]])
            elif isinstance(t, A.HorizontalFlip):
                step = np.array([[-1.0, 0, s - 1], [0, 1, 0], [0, 0, 1]])
            elif isinstance(t, A.Transpose):
                step = np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])
            elif isinstance(t, A.Affine):
                step = np.asarray(params["matrix"], dtype=np.float64)
            else:
                raise TypeError(f"no pixel map for {type(t).__name__}")
            m = step @ m
        return m[:2]

    def __call__(self, planes: list[np.ndarray], windows: list[tuple[float, float]]) -> np.ndarray:
        """HU planes of one sample (same shape) -> (len(planes) * len(windows), size, size) float32 in [0, 1]."""
        if self.py_random is not None:
            self.py_random.random()  # the draw A.Compose makes for its own probability: keeps the stream as it was
        square = (self.size, self.size)
        steps = [(t, self._draw(t, planes[0].shape if i == 0 else square)) for i, t in enumerate(self.geometry)]
        contrast = None if self.contrast is None else self._draw(self.contrast, square)
        blur = None if self.blur is None else self._draw(self.blur, square)
        steps = [(t, params) for t, params in steps if params is not None]
        warp = self._matrix(steps, planes[0].shape) if any(isinstance(t, A.Affine) for t, _ in steps) else None
        out = []
        for plane in planes:
            plane = plane if plane.dtype == np.float32 else plane.astype(np.float32)
            if warp is not None:  # the affine resamples anyway: one warp does every step, from the cropped slice
                plane = cv2.warpAffine(
                    plane,
                    warp,
                    square[::-1],
                    flags=cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT,
                    borderValue=self.fill,
                )
            else:  # resize, crop, flips: cheaper than a warp, applied by the library
                for t, params in steps:
                    plane = t.apply(plane, **params)
            out.append(np.ascontiguousarray(plane))
        gain, bias = (1.0, 0.0) if contrast is None else (float(contrast["alpha"]), float(contrast["beta"]))
        img = window_planes(out, windows, gain, bias)
        if blur is not None:
            for ch in img:
                ch[...] = self.blur.apply(ch, **blur)
            np.clip(img, 0.0, 1.0, out=img)
        return img


def build_train_transforms(cfg: Config, size: int | None = None) -> SliceTransform:
    """Resize to `size` (default data.image_size), then the AugmentConfig transforms whose probability is > 0."""
    s = _size(cfg, size)
    aug = cfg.augment
    steps: list[A.BasicTransform] = [A.Resize(s, s, interpolation=cv2.INTER_LINEAR)]
    if aug.random_resized_crop > 0:
        steps.append(
            A.RandomResizedCrop(size=(s, s), scale=tuple(aug.crop_scale), ratio=(0.9, 1.1), p=aug.random_resized_crop)
        )
    if aug.hflip > 0:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.transpose > 0:
        steps.append(A.Transpose(p=aug.transpose))
    if aug.shift_scale_rotate > 0:
        steps.append(
            A.Affine(
                translate_percent=(-aug.shift_limit, aug.shift_limit),
                scale=(1 - aug.scale_limit, 1 + aug.scale_limit),
                rotate=(-aug.rotate_limit, aug.rotate_limit),
                border_mode=cv2.BORDER_CONSTANT,
                fill=fill_hu(cfg),
                p=aug.shift_scale_rotate,
            )
        )
    contrast = (
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=aug.brightness_contrast)
        if aug.brightness_contrast > 0
        else None
    )
    blur = A.GaussianBlur(blur_limit=(3, 5), p=aug.blur) if aug.blur > 0 else None
    return SliceTransform(s, steps, contrast, blur)


def build_eval_transforms(cfg: Config, size: int | None = None) -> SliceTransform:
    """Resize only."""
    s = _size(cfg, size)
    return SliceTransform(s, [A.Resize(s, s, interpolation=cv2.INTER_LINEAR)])
