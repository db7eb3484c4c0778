"""Focal loss: torchvision's formula, reductions to BCE / cross-entropy, fp16/bf16 stability, multi-class, Dice."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlseg.config import ConfigError
from dlseg.losses import FocalLoss, LossConfig, build_loss, soft_dice_loss


def torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss (reduction='mean'), written out independently (torchvision is absent)."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss.mean()


def test_binary_hand_computed_case():
    # x=0,t=1: p=1/2, CE=ln 2, (1-p_t)^2=1/4, alpha_t=0.25 -> ln2/16 = 0.0433217
    # x=2,t=0: p=sigmoid(2), CE=ln(1+e^2), (1-p_t)^2=p^2, alpha_t=0.75 -> 1.2375586
    p = 1 / (1 + math.exp(-2))
    by_hand = [math.log(2) / 16, 0.75 * p * p * math.log(1 + math.exp(2))]
    assert by_hand == pytest.approx([0.0433217, 1.2375586], abs=1e-7)      # the closed forms give the figures above
    loss = build_loss(LossConfig(alpha=0.25, gamma=2.0), num_classes=1)
    value = loss(torch.tensor([[[[0.0, 2.0]]]]), torch.tensor([[[[1.0, 0.0]]]]))
    assert value.item() == pytest.approx(sum(by_hand) / 2, abs=1e-6)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 1.0), (0.9, 3.5), (-1.0, 2.0)])
def test_binary_equals_torchvision_formula(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 9, 7, generator=g) * 4
    target = (torch.rand(3, 1, 9, 7, generator=g) > 0.7).float()
    loss = FocalLoss(1, alpha=None if alpha < 0 else alpha, gamma=gamma)
    expected = torchvision_sigmoid_focal_loss(logits, target, alpha, gamma)
    torch.testing.assert_close(loss(logits, target), expected, rtol=1e-5, atol=1e-7)
    # (N,H,W) logits and integer masks give the same value
    torch.testing.assert_close(loss(logits[:, 0], target[:, 0].to(torch.uint8)), expected, rtol=1e-5, atol=1e-7)


def test_gamma_zero_without_alpha_is_bce_and_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 8, 8, generator=g) * 3
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    cfg = LossConfig(alpha=None, gamma=0.0)
    torch.testing.assert_close(build_loss(cfg, 1)(logits, target), F.binary_cross_entropy_with_logits(logits, target))
    logits = torch.randn(2, 4, 8, 8, generator=g) * 3
    labels = torch.randint(0, 4, (2, 8, 8), generator=g)
    torch.testing.assert_close(build_loss(cfg, 4)(logits, labels), F.cross_entropy(logits, labels))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_saturated_low_precision_logits_give_finite_loss_and_grads(dtype, num_classes):
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, max(num_classes, 2), (2, 6, 6), generator=g)
    channels = num_classes
    sign = torch.where(torch.rand(2, channels, 6, 6, generator=g) > 0.5, 1.0, -1.0)
    logits = (sign * 1e4).to(dtype).requires_grad_(True)
    loss_fn = build_loss(LossConfig(alpha=0.25 if num_classes == 1 else None, gamma=2.0, dice_weight=0.5), num_classes)
    target = labels.float().unsqueeze(1) if num_classes == 1 else labels
    value = loss_fn(logits, target)
    value.backward()
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    assert torch.isfinite(logits.grad.float()).all()


def test_saturated_binary_values_are_exact():
    # Right with logit 1e4 -> 0; wrong -> alpha_t * 1e4 (the CE), modulating factor 1.
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4], dtype=torch.float16)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0])
    per_pixel = [0.0, 0.0, 0.75 * 1e4, 0.25 * 1e4]
    value = FocalLoss(1, alpha=0.25, gamma=2.0)(logits.view(1, 1, 2, 2), target.view(1, 1, 2, 2))
    assert value.item() == pytest.approx(sum(per_pixel) / 4, rel=1e-3)


def test_gamma_below_one_at_a_perfect_prediction_has_finite_grads():
    logits = torch.tensor([[[[30.0]], [[-30.0]]]], requires_grad=True)
    build_loss(LossConfig(alpha=None, gamma=0.5), 2)(logits, torch.zeros(1, 1, 1, dtype=torch.long)).backward()
    assert torch.isfinite(logits.grad).all()


def test_two_class_softmax_equals_binary_with_the_logit_difference():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 1, 5, 5, generator=g) * 3
    labels = (torch.rand(2, 5, 5, generator=g) > 0.6).long()
    two = torch.cat([torch.zeros_like(z), z], dim=1)  # softmax([0, z])[1] == sigmoid(z)
    for alpha in (0.25, None):
        cfg = LossConfig(alpha=alpha, gamma=2.0)
        torch.testing.assert_close(build_loss(cfg, 2)(two, labels), build_loss(cfg, 1)(z, labels.float().unsqueeze(1)))


def test_multiclass_per_class_alpha_and_focusing():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    labels = torch.randint(0, 3, (2, 6, 6), generator=g)
    ce = F.cross_entropy(logits, labels, reduction="none")
    pt = torch.exp(-ce)
    weights = torch.tensor([0.2, 1.0, 3.0])
    expected = (weights[labels] * (1 - pt) ** 2 * ce).mean()
    torch.testing.assert_close(build_loss(LossConfig(alpha=[0.2, 1.0, 3.0]), 3)(logits, labels), expected)
    focal = build_loss(LossConfig(alpha=None, gamma=2.0), 3)(logits, labels)
    assert 0 < focal < ce.mean()
    # a confident, correct prediction costs almost nothing
    perfect = F.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 20
    assert build_loss(LossConfig(alpha=None), 3)(perfect, labels) < 1e-12


def test_soft_dice_values():
    onehot = torch.zeros(1, 1, 4, 4)
    onehot[..., :2, :2] = 1
    assert soft_dice_loss(onehot, onehot).item() == pytest.approx(0.0)
    assert soft_dice_loss(torch.zeros_like(onehot), onehot).item() == pytest.approx(1 - 1 / 5)
    assert soft_dice_loss(torch.full_like(onehot, 0.5), onehot).item() == pytest.approx(1 - 5 / 13)


def test_dice_term_is_added_with_its_weight():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    focal = build_loss(LossConfig(), 1)(logits, target)
    both = build_loss(LossConfig(dice_weight=2.0), 1)(logits, target)
    dice = soft_dice_loss(torch.sigmoid(logits), target)
    torch.testing.assert_close(both, focal + 2.0 * dice)
    # multi-class: Dice over the foreground classes only
    logits = torch.randn(2, 3, 8, 8, generator=g)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    focal = build_loss(LossConfig(alpha=None), 3)(logits, labels)
    both = build_loss(LossConfig(alpha=None, dice_weight=1.0), 3)(logits, labels)
    onehot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(both, focal + soft_dice_loss(torch.softmax(logits, 1)[:, 1:], onehot[:, 1:]))


@pytest.mark.parametrize("cfg, num_classes, key", [
    (LossConfig(name="dice"), 1, "loss.name"),
    (LossConfig(gamma=-1.0), 1, "loss.gamma"),
    (LossConfig(alpha=1.5), 1, "loss.alpha"),
    (LossConfig(alpha=[0.5, 0.5]), 1, "loss.alpha"),
    (LossConfig(alpha=[0.5, 0.5]), 3, "loss.alpha"),
    (LossConfig(dice_weight=-0.1), 2, "loss.dice_weight"),
])
def test_bad_loss_config_names_the_key(cfg, num_classes, key):
    with pytest.raises(ConfigError, match=key):
        build_loss(cfg, num_classes)


def test_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="differ in shape"):
        build_loss(LossConfig(), 1)(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="one logit channel"):
        build_loss(LossConfig(), 1)(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4))

