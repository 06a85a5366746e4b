"""Training losses that optimise what the competition scores: per-label BCE weighted like the metric (any=2).

The reduction mirrors `metrics.weighted_log_loss`: each sample's loss is the weighted mean over the six labels,
then the mean over the batch. So with the default weights the training loss *is* the competition metric.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.labels import LABEL_WEIGHTS, LABELS
from ..core.config import Config
from ..core.errors import UserError
from ..core.registry import LOSSES
from ..models.ensemble import MemberSumLoss, is_ensemble, member_names


def label_weights(kind: str = "metric", labels: np.ndarray | None = None) -> torch.Tensor:
    """Per-label weights: the metric's (any=2, subtypes 1) or those scaled by 1/sqrt(positive frequency).

    `frequency` keeps the metric's total weight (so the learning rate means the same) but moves it towards rare
    subtypes (epidural is ~0.4% of slices): w_c ∝ metric_c / sqrt(freq_c), normalised to sum(metric weights).
    """
    metric = torch.tensor(LABEL_WEIGHTS, dtype=torch.float32)
    if kind == "metric":
        return metric
    if kind != "frequency":
        raise UserError(f"train.class_weights={kind!r} is not one of metric, frequency")
    if labels is None or len(labels) == 0:
        raise UserError(
            "train.class_weights=frequency needs labelled training images; the fold's training set is empty"
        )
    freq = np.asarray(labels, dtype=np.float64).mean(axis=0)
    freq = np.clip(freq, 1.0 / (len(labels) + 1.0), 1.0)  # a label never seen counts as one positive
    w = metric.numpy().astype(np.float64) / np.sqrt(freq)
    w = w / w.sum() * float(metric.sum())
    return torch.tensor(w, dtype=torch.float32)


@LOSSES.register("bce")
class WeightedBCE(nn.Module):
    """BCE-with-logits per label, weighted mean over labels, mean over samples."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights.float().clone())

    def per_label(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.per_label(logits, targets)
        return (loss * self.weights).sum(dim=1).mean() / self.weights.sum()


@LOSSES.register("focal")
class FocalLoss(WeightedBCE):
    """Focal BCE (Lin et al.): down-weights easy negatives, which dominate ICH slices (~86% have no bleed)."""

    def __init__(self, weights: torch.Tensor, gamma: float = 2.0) -> None:
        super().__init__(weights)
        self.gamma = float(gamma)

    def per_label(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        return (1 - p_t).pow(self.gamma) * bce


def balanced_weights(labels: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label (positive, negative) weights N / (2 #pos), N / (2 #neg) of the training fold's labels.

    Foo's weighted BCE (w1 = 1/#pos, w0 = 1/#neg) scaled so a label with as many positives as negatives gets 1 and 1:
    each label's positives and negatives then weigh the same in total. A class never seen counts as one sample.
    """
    if labels is None or len(labels) == 0:
        raise UserError("train.class_weights=balanced needs labelled training images; the fold's training set is empty")
    y = np.asarray(labels, dtype=np.float64) > 0.5
    n = float(len(y))
    pos = np.maximum(y.sum(axis=0), 1.0)
    neg = np.maximum(n - y.sum(axis=0), 1.0)
    return torch.tensor(n / (2 * pos), dtype=torch.float32), torch.tensor(n / (2 * neg), dtype=torch.float32)


class BalancedBCE(WeightedBCE):
    """-(w1 y log p + w0 (1 - y) log(1 - p)) per label (optionally focal), labels mixed with the metric's weights."""

    def __init__(
        self, weights: torch.Tensor, pos_weight: torch.Tensor, neg_weight: torch.Tensor, gamma: float = 0.0
    ) -> None:
        super().__init__(weights)
        self.register_buffer("pos_weight", pos_weight.float().clone())
        self.register_buffer("neg_weight", neg_weight.float().clone())
        self.gamma = float(gamma)

    def per_label(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        loss = -(
            self.pos_weight * targets * F.logsigmoid(logits) + self.neg_weight * (1 - targets) * F.logsigmoid(-logits)
        )
        if self.gamma > 0:
            p = torch.sigmoid(logits)
            loss = (1 - (p * targets + (1 - p) * (1 - targets))).pow(self.gamma) * loss
        return loss


def build_loss(cfg: Config, train_labels: np.ndarray | None = None) -> WeightedBCE:
    """The loss for `cfg.train` (loss: bce|focal, class_weights: metric|frequency|balanced).

    For an ensemble backbone (`a+b`) the sum of the members' losses (recipes/ensemble.py).
    """
    if is_ensemble(cfg.model.backbone):
        names = member_names(cfg.model.backbone)
        single = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=names[0]))
        return MemberSumLoss(build_loss(single, train_labels), len(names), len(LABELS))
    make = LOSSES.get(cfg.train.loss, "train.loss")
    if cfg.train.class_weights == "balanced":
        pos, neg = balanced_weights(train_labels)
        return BalancedBCE(label_weights("metric"), pos, neg, cfg.train.focal_gamma if make is FocalLoss else 0.0)
    weights = label_weights(cfg.train.class_weights, train_labels)
    return make(weights) if make is WeightedBCE else make(weights, cfg.train.focal_gamma)


__all__ = ["WeightedBCE", "FocalLoss", "BalancedBCE", "label_weights", "balanced_weights", "build_loss"]
