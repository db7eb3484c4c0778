"""Focal loss (Lin et al. 2017) from logits, binary and multi-class, plus an optional soft Dice term.

Everything is computed in float32 from log-sigmoid / log-softmax (no ``log(0)``), so the loss and its gradients stay
finite under fp16/bf16 autocast even for saturated logits.

Binary (``num_classes == 1``): logits (N,1,H,W) or (N,H,W), target 0/1 of the same spatial shape. Same formula as
``torchvision.ops.sigmoid_focal_loss``: ``alpha_t * (1 - p_t)**gamma * BCE``, ``alpha`` weighting positives and
``1 - alpha`` negatives; ``alpha=None`` disables the weighting. Mean over pixels.

Multi-class (``num_classes = K > 1``): logits (N,K,H,W), target (N,H,W) integer labels; ``(1 - p_t)**gamma * CE``
with softmax. ``alpha``: None (no weighting), a list of K per-class weights, or one number a, read like the binary
case: background weighted ``1 - a``, every foreground class ``a`` (with K = 2 this equals the binary loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlseg.config import ConfigError, option

DICE_SMOOTH = 1.0


@dataclass
class LossConfig:
    """The loss section of the training config."""

    name: str = option("loss (focal)", "focal")
    alpha: float | list[float] | None = option(
        "binary: weight of positives; multi-class: per-class list or scalar; unset = no weighting", 0.25)
    gamma: float = option("focusing exponent: (1 - p_t)**gamma", 2.0)
    dice_weight: float = option("total = focal + dice_weight * (1 - soft Dice over foreground)", 0.0)


def binary_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float | None = 0.25,
                      gamma: float = 2.0) -> torch.Tensor:
    """Mean sigmoid focal loss; ``target`` is 0/1 with the logits' shape."""
    x = logits.float()
    t = target.to(x.dtype)
    log_p, log_not_p = F.logsigmoid(x), F.logsigmoid(-x)
    ce = -(t * log_p + (1 - t) * log_not_p)
    log_not_pt = t * log_not_p + (1 - t) * log_p          # log(1 - p_t), exact for 0/1 targets
    loss = torch.exp(gamma * log_not_pt) * ce
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.mean()


def multiclass_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor | None = None,
                          gamma: float = 2.0) -> torch.Tensor:
    """Mean softmax focal loss; ``target`` holds class indices, ``alpha`` is None or a (K,) weight tensor."""
    log_p = F.log_softmax(logits.float(), dim=1)
    log_pt = log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)
    # (1 - p_t) clamped away from 0 so that d/dp of (1-p_t)**gamma stays finite for gamma < 1 at p_t == 1.
    not_pt = (-torch.expm1(log_pt)).clamp_min(1e-12)
    loss = not_pt.pow(gamma) * -log_pt
    if alpha is not None:
        loss = alpha.to(loss.device)[target.long()] * loss
    return loss.mean()


def soft_dice_loss(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """1 - mean over channels of the batch-wide soft Dice of (N,C,H,W) probabilities vs one-hot targets."""
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)).mean()


class FocalLoss(nn.Module):
    """Focal loss (+ ``dice_weight`` × soft Dice over the foreground classes) for ``num_classes`` outputs."""

    def __init__(self, num_classes: int, alpha: float | Sequence[float] | None = 0.25, gamma: float = 2.0,
                 dice_weight: float = 0.0):
        super().__init__()
        self.num_classes, self.gamma, self.dice_weight = num_classes, float(gamma), float(dice_weight)
        self.alpha = alpha if num_classes == 1 else None
        class_alpha = None if num_classes == 1 else _class_weights(alpha, num_classes)
        self.register_buffer("class_alpha", class_alpha, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 1:
            return self._binary(logits, target)
        return self._multiclass(logits, target)

    def _binary(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Binary focal (+ Dice) with (N,1,H,W) or (N,H,W) logits."""
        if logits.dim() == 4:
            if logits.shape[1] != 1:
                raise ValueError(f"binary focal loss expects one logit channel, got {logits.shape[1]}")
            logits = logits.squeeze(1)
        if target.dim() == 4:
            target = target.squeeze(1)
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
        loss = binary_focal_loss(logits, target, self.alpha, self.gamma)
        if self.dice_weight:
            probs = torch.sigmoid(logits.float()).unsqueeze(1)
            loss = loss + self.dice_weight * soft_dice_loss(probs, target.float().unsqueeze(1))
        return loss

    def _multiclass(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Softmax focal (+ Dice over classes 1..K-1) with (N,K,H,W) logits and (N,H,W) labels."""
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits (N,{self.num_classes},H,W), got {tuple(logits.shape)}")
        if target.dim() == 4:
            target = target.squeeze(1)
        if target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
        loss = multiclass_focal_loss(logits, target, self.class_alpha, self.gamma)
        if self.dice_weight:
            probs = torch.softmax(logits.float(), dim=1)
            onehot = F.one_hot(target.long(), self.num_classes).permute(0, 3, 1, 2).to(probs.dtype)
            loss = loss + self.dice_weight * soft_dice_loss(probs[:, 1:], onehot[:, 1:])
        return loss


def _class_weights(alpha: float | Sequence[float] | None, num_classes: int) -> torch.Tensor | None:
    """Per-class weights for the multi-class loss: None, K numbers, or a scalar a → (1-a, a, a, ...)."""
    if alpha is None:
        return None
    if isinstance(alpha, (int, float)):
        return torch.tensor([1.0 - alpha] + [float(alpha)] * (num_classes - 1))
    return torch.tensor([float(a) for a in alpha])


def build_loss(cfg: LossConfig, num_classes: int) -> nn.Module:
    """The configured loss for a model with ``num_classes`` outputs; ConfigError naming the key for bad values."""
    if num_classes < 1:
        raise ConfigError(f"loss: num_classes must be >= 1, got {num_classes}")
    if cfg.name != "focal":
        raise ConfigError(f"loss.name: unknown loss {cfg.name!r} (known: 'focal')")
    if not cfg.gamma >= 0:
        raise ConfigError(f"loss.gamma: must be >= 0, got {cfg.gamma!r}")
    if not cfg.dice_weight >= 0:
        raise ConfigError(f"loss.dice_weight: must be >= 0, got {cfg.dice_weight!r}")
    alpha = cfg.alpha
    if isinstance(alpha, (list, tuple)):
        if num_classes == 1:
            raise ConfigError(f"loss.alpha: binary focal loss takes one number or null, got a list {list(alpha)}")
        if len(alpha) != num_classes:
            raise ConfigError(f"loss.alpha: expected {num_classes} per-class weights, got {len(alpha)}")
        if any(not a >= 0 for a in alpha):
            raise ConfigError(f"loss.alpha: weights must be >= 0, got {list(alpha)}")
    elif alpha is not None and not 0 <= alpha <= 1:
        raise ConfigError(f"loss.alpha: must be within [0, 1] or null, got {alpha!r}")
    return FocalLoss(num_classes, alpha=alpha, gamma=cfg.gamma, dice_weight=cfg.dice_weight)
