"""Optimizer and per-step learning-rate schedules (warm-up + cosine, one-cycle, constant)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from ..core.config import Config, TrainConfig
from ..core.errors import UserError
from ..core.registry import OPTIMIZERS, SCHEDULERS


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm parameters (decaying BatchNorm scales only hurts)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], t: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=t.lr)


@OPTIMIZERS.register("adam")
def _adam(groups: list[dict], t: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=t.lr)


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], t: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0)


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    if not any(g["params"] for g in groups):
        raise UserError(f"config '{cfg.name}': model.freeze={cfg.model.freeze!r} leaves no trainable parameters")
    return OPTIMIZERS.get(t.optimizer, "train.optimizer")(groups, t)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.01) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup` steps, then cosine down to `floor`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@SCHEDULERS.register("onecycle")
def _onecycle(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> LRScheduler:
    pct = min(0.9, max(0.05, warmup / total if warmup else 0.3))
    return OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=total,
        pct_start=pct,
        anneal_strategy="cos",
        div_factor=25.0,
        final_div_factor=1e3,
    )


@SCHEDULERS.register("cosine")
def _cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> LRScheduler:
    return LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))


@SCHEDULERS.register("constant")
def _constant(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> LRScheduler:
    return LambdaLR(optimizer, lambda s: (s + 1) / warmup if warmup and s < warmup else 1.0)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LRScheduler:
    """Stepped once per optimizer step; `warmup_epochs` may be fractional."""
    t = cfg.train
    total = max(1, steps_per_epoch * t.epochs)
    warmup = min(total - 1, int(round(t.warmup_epochs * steps_per_epoch)))
    return SCHEDULERS.get(t.scheduler, "train.scheduler")(optimizer, total, warmup)
