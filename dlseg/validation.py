"""Validation on the training grid: per-case confusion counts, their sum over processes, Dice per case.

Dice per case comes from true/false positive and false negative counts summed over the case's slices on the
*training grid* (size × size): the training metric that picks the best model. Dice in the original geometry is
what ``dlseg.evaluate`` reports on predictions.

    counts = ValidationCounts(n_cases, num_classes, device)
    evaluate(model, loader, counts, loss_fn)
    counts.reduce_from_all_processes(accelerator)
    scores = counts.compute()          # scores.dice (per case), scores.class_dice (per class), scores.loss

A case's Dice is the mean over foreground classes (a class absent from both truth and prediction counts 1.0);
the mean over cases of that, which equals the mean over classes of each class's mean over cases, picks the best
model.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, NamedTuple

import numpy as np
import torch


def confusion_counts(logits: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-slice (N, F, 3) TP/FP/FN for each foreground class (F = 1 for binary) from logits."""
    if num_classes == 1:
        pred = (logits[:, 0] > 0).unsqueeze(1)           # sigmoid(x) > 0.5
        truth = (mask > 0).unsqueeze(1)
    else:
        labels = logits.argmax(1)
        classes = torch.arange(1, num_classes, device=logits.device).view(1, -1, 1, 1)
        pred, truth = labels.unsqueeze(1) == classes, mask.unsqueeze(1) == classes
    dims = (2, 3)
    tp = (pred & truth).sum(dims)
    fp = (pred & ~truth).sum(dims)
    fn = (~pred & truth).sum(dims)
    return torch.stack([tp, fp, fn], dim=-1).long()


def dice_per_class(confusion: torch.Tensor) -> list[list[float]]:
    """Dice per case and foreground class from (cases, F, 3) TP/FP/FN; 1.0 for a class absent in both."""
    c = confusion.double().cpu()
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.ones_like(denom)).tolist()


def dice_per_case(confusion: torch.Tensor) -> list[float]:
    """Dice per case from (cases, F, 3) TP/FP/FN: mean over foreground classes, 1.0 for a class absent in both."""
    return [sum(row) / len(row) for row in dice_per_class(confusion)]


class Scores(NamedTuple):
    """What one validation pass gives."""

    dice: list[float]   # per case, in the loader's case order (mean over foreground classes)
    loss: float         # mean loss per slice
    class_dice: list[list[float]]   # per case, per foreground class

    def mean_dice(self) -> float:
        """The mean over cases (what picks the best model); 0.0 without cases."""
        return float(np.mean(self.dice)) if self.dice else 0.0

    def class_means(self) -> list[float]:
        """Each foreground class's Dice, mean over cases (empty without cases)."""
        if not self.class_dice:
            return []
        return [sum(col) / len(col) for col in zip(*self.class_dice)]


class ValidationCounts:
    """Sums over validation slices, per case, that Dice and the mean loss are computed from.

    Shaped like torchvision's ``ConfusionMatrix``: ``update`` per batch, ``reduce_from_all_processes`` once
    (every slice is seen by exactly one process), ``compute`` at the end.
    """

    def __init__(self, n_cases: int, num_classes: int, device: torch.device | str = "cpu"):
        n_fg = 1 if num_classes == 1 else num_classes - 1
        self.num_classes = num_classes
        self.slices = torch.zeros(n_cases, dtype=torch.long, device=device)             # slices seen per case
        self.confusion = torch.zeros(n_cases, n_fg, 3, dtype=torch.long, device=device)  # TP, FP, FN per class
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)     # sum of batch loss × batch slices
        self.loss_slices = torch.zeros((), dtype=torch.float64, device=device)  # slices the loss was taken on

    def update(self, case: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, loss: float | None = None) -> None:
        """Add one batch: ``case`` (N,) case index of each slice, its logits and mask, the batch's mean loss."""
        case = case.to(self.slices.device).long()
        self.slices.index_add_(0, case, torch.ones_like(case))
        self.confusion.index_add_(0, case, confusion_counts(logits.float(), mask, self.num_classes))
        if loss is not None:
            self.loss_sum += loss * case.shape[0]
        self.loss_slices += case.shape[0]

    def reduce_from_all_processes(self, accelerator: Any) -> None:
        """Sum every count over all processes (``accelerator.reduce``); each process then holds the totals."""
        for name in ("slices", "confusion", "loss_sum", "loss_slices"):
            setattr(self, name, accelerator.reduce(getattr(self, name), reduction="sum"))

    def check_complete(self, depths: Any) -> None:
        """RuntimeError unless every case was counted with exactly its number of slices (no slice twice)."""
        expected = torch.as_tensor(depths, device=self.slices.device)
        if not torch.equal(self.slices, expected):
            raise RuntimeError(f"validation saw {self.slices.tolist()} slices per case, expected {expected.tolist()}")

    def compute(self) -> Scores:
        """Dice per case (and per class) and the mean loss per slice."""
        return Scores(dice_per_case(self.confusion), float(self.loss_sum / self.loss_slices.clamp_min(1)),
                      dice_per_class(self.confusion))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, counts: ValidationCounts, loss_fn: Callable | None = None,
             channels_last: bool = False, autocast: Callable[[], ContextManager] | None = None) -> ValidationCounts:
    """Add this process's share of ``loader`` to ``counts`` (a plain or an Accelerate-prepared loader)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for batch in loader:
        image = batch["image"].to(device)
        mask = batch["mask"].to(device)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            logits = model(image)
            loss = float(loss_fn(logits, mask)) if loss_fn is not None else None
        counts.update(batch["case"], logits, mask, loss)
    model.train(was_training)
    return counts
