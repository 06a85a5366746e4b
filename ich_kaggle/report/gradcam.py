"""Grad-CAM (Selvaraju et al. 2017) on the backbone's last feature map, with forward and gradient hooks.

Where did the network look when it called a slice positive? The class score's gradient, averaged over the
feature map's positions, weighs each channel; the ReLU of the weighted sum is the heat map, upsampled to the input.
Works with any model whose `backbone` (or a given layer) outputs a 4-D map, or a list/tuple/dict of them (the
last one is used, as smp/timm encoders return one map per stage).
"""

from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _last_map(output: Any) -> torch.Tensor | None:
    """The deepest 4-D tensor in a module's output."""
    if isinstance(output, torch.Tensor):
        return output if output.dim() == 4 else None
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in reversed(output):
            found = _last_map(item)
            if found is not None:
                return found
    return None


class GradCAM:
    """Use as a context manager so the hooks are removed: `with GradCAM(model) as cam: maps, probs = cam(x, idx)`."""

    def __init__(self, model: nn.Module, target_layer: nn.Module | None = None) -> None:
        self.model = model
        layer = target_layer if target_layer is not None else getattr(model, "backbone", None)
        if layer is None:
            raise ValueError("model has no `backbone`; pass target_layer= the module whose output map to explain")
        self.activations: torch.Tensor | None = None
        self.gradients: torch.Tensor | None = None
        self._handle = layer.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        fmap = _last_map(output)
        if fmap is None:
            raise ValueError(f"{type(module).__name__} returned no 4-D feature map; pass a convolutional target_layer")
        self.activations = fmap
        if fmap.requires_grad:
            fmap.register_hook(self._gradient_hook)

    def _gradient_hook(self, grad: torch.Tensor) -> None:
        self.gradients = grad

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "GradCAM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __call__(self, x: torch.Tensor, class_idx: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Heat maps (B, H, W) in [0, 1] for `class_idx` (one per image or one for all) and sigmoid probs (B, K)."""
        was_training = self.model.training
        self.model.eval()
        x = x.detach().float().clone().requires_grad_(True)  # grads flow even through a frozen backbone
        self.activations = self.gradients = None
        try:
            with torch.enable_grad():
                logits = self.model(x)
                idx = torch.as_tensor([class_idx] * len(x) if isinstance(class_idx, int) else list(class_idx))
                self.model.zero_grad(set_to_none=True)
                logits.gather(1, idx.view(-1, 1).to(logits.device)).sum().backward()
        finally:
            self.model.train(was_training)
        if self.activations is None or self.gradients is None:
            raise RuntimeError("Grad-CAM hooks saw no feature map or gradient; is target_layer part of forward()?")
        acts, grads = self.activations.detach().float(), self.gradients.detach().float()
        weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): importance of each channel
        cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        flat = cam.flatten(1)
        lo, hi = flat.min(1).values.view(-1, 1, 1), flat.max(1).values.view(-1, 1, 1)
        cam = torch.where(hi > lo, (cam - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(cam))
        return cam.cpu().numpy().astype(np.float32), torch.sigmoid(logits.detach()).cpu().numpy()


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8: the grey image (H, W) in [0, 1] under a JET-coloured heat map (H, W) in [0, 1]."""
    grey = np.clip(np.nan_to_num(image.astype(np.float32)), 0, 1)
    if cam.shape != grey.shape:
        cam = cv2.resize(cam.astype(np.float32), (grey.shape[1], grey.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.uint8(np.clip(cam, 0, 1) * 255), cv2.COLORMAP_JET)[..., ::-1].astype(np.float32) / 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    return np.uint8(np.clip((1 - alpha) * rgb + alpha * heat, 0, 1) * 255)
