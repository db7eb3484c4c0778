"""Optimizer and learning-rate schedule of a training run, built from their config sections (timm style)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch

from dlseg.config import option


@dataclass
class OptimConfig:
    """The ``optim`` section: which optimizer, its learning rate and weight decay."""

    name: Literal["adam", "adamw"] = option("optimizer: adam or adamw (decoupled weight decay)", "adam")
    lr: float = option("base learning rate", 1e-4)
    weight_decay: float = option("weight decay (L2 for adam, decoupled for adamw)", 0.0)


@dataclass
class SchedConfig:
    """The ``sched`` section: learning-rate schedule, stepped once per epoch."""

    name: Literal["step", "cosine", "poly"] = option("schedule: step, cosine or poly", "step")
    step_size: int = option("step: multiply the learning rate by gamma every step_size epochs", 4)
    gamma: float = option("step: factor applied every step_size epochs", 0.1)
    warmup_epochs: int = option("linear warm-up epochs (from lr/(warmup+1)) before the schedule proper", 0)
    power: float = option("poly: the learning rate follows (1 - t)**power", 0.9)
    min_lr_ratio: float = option("cosine/poly: floor as a fraction of optim.lr", 0.0)


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam or AdamW over ``params``."""
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: SchedConfig, epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based)."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    e = epoch - cfg.warmup_epochs
    if cfg.name == "step":
        return cfg.gamma ** (e // cfg.step_size)
    t = min(e / max(epochs - cfg.warmup_epochs, 1), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.name == "cosine" else (1 - t) ** cfg.power
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(cfg: SchedConfig, optimizer: torch.optim.Optimizer,
                    epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """StepLR (the article's), or a LambdaLR of :func:`lr_factor` for warm-up / cosine / poly."""
    if cfg.name == "step" and cfg.warmup_epochs == 0:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg, e, epochs))
