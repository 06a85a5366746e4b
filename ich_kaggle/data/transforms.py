"""Augmentations (albumentations 2) for windowed slices: float32 (H, W, C) in [0, 1] -> same at image_size.

Windowing, window jitter and black-border cropping happen before, in `dataset.py`, because they need Hounsfield
units. Each augmentation has its own probability in `AugmentConfig`; 0 leaves it out of the pipeline.
Eval transforms only resize, so OOF/test predictions see the same geometry as training.
"""

from __future__ import annotations

import albumentations as A
import cv2

from ..core.config import Config


def _size(cfg: Config, size: int | None) -> int:
    return int(size or cfg.data.image_size)


def build_train_transforms(cfg: Config, size: int | None = None) -> A.Compose:
    """Resize to `size` (default data.image_size), then the AugmentConfig transforms whose probability is > 0."""
    s = _size(cfg, size)
    aug = cfg.augment
    steps: list[A.BasicTransform] = [A.Resize(s, s, interpolation=cv2.INTER_LINEAR)]
    if aug.random_resized_crop > 0:
        steps.append(A.RandomResizedCrop(size=(s, s), scale=tuple(aug.crop_scale), ratio=(0.9, 1.1),
                                         p=aug.random_resized_crop))
    if aug.hflip > 0:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.transpose > 0:
        steps.append(A.Transpose(p=aug.transpose))
    if aug.shift_scale_rotate > 0:
        steps.append(A.Affine(
            translate_percent=(-aug.shift_limit, aug.shift_limit),
            scale=(1 - aug.scale_limit, 1 + aug.scale_limit),
            rotate=(-aug.rotate_limit, aug.rotate_limit),
            border_mode=cv2.BORDER_CONSTANT, fill=0, p=aug.shift_scale_rotate,
        ))
    if aug.brightness_contrast > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=aug.brightness_contrast))
    if aug.blur > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), p=aug.blur))
    return A.Compose(steps)


def build_eval_transforms(cfg: Config, size: int | None = None) -> A.Compose:
    """Resize only."""
    s = _size(cfg, size)
    return A.Compose([A.Resize(s, s, interpolation=cv2.INTER_LINEAR)])
