"""Bias field: a smooth gain about the sample's minimum; both paths, probabilities, exact values."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dlseg.augment import AugmentConfig, BatchAugment, build_cpu_transform, check_config
from dlseg.augment_field import FIELD_TERMS, BiasField, apply_bias_field, apply_field_numpy, field_numpy

SIZE = 40
OFF = AugmentConfig(hflip=0, vflip=0, transpose=0, scale=0, rotate90=0, brightness_contrast=0)
FIELD = replace(OFF, bias_field=1.0, bias_field_limit=0.3)


def image(channels: int = 0, seed: int = 0) -> np.ndarray:
    """Normalized-looking values: a dark background (the minimum) and brighter tissue; (H,W) or (H,W,C)."""
    shape = (SIZE, SIZE) if channels == 0 else (SIZE, SIZE, channels)
    img = np.random.default_rng(seed).uniform(0.0, 2.0, size=shape).astype(np.float32)
    img[:4] = -1.2                                    # air: the value raw zero became
    return img


def only(term: tuple[int, int], value: float) -> np.ndarray:
    """Coefficients with one monomial set."""
    c = np.zeros(len(FIELD_TERMS), np.float32)
    c[FIELD_TERMS.index(term)] = value
    return c


def test_a_linear_field_scales_intensity_above_the_minimum_from_left_to_right():
    img = image()
    out = apply_field_numpy(img, only((1, 0), 0.4))        # f = 0.4·x, x from -1 (left) to 1 (right)
    lo = img.min()
    gain = (out - lo)[4:] / (img - lo)[4:]
    np.testing.assert_allclose(gain[:, 0], np.exp(-0.4), rtol=1e-5)
    np.testing.assert_allclose(gain[:, -1], np.exp(0.4), rtol=1e-5)
    np.testing.assert_allclose(gain, np.broadcast_to(gain[:1], gain.shape), rtol=1e-5)   # same down each column
    np.testing.assert_array_equal(out[:4], img[:4])       # the minimum (air) stays where it was


def test_zero_coefficients_are_the_identity_and_every_channel_shares_the_field():
    img = image(channels=3)
    np.testing.assert_array_equal(apply_field_numpy(img, np.zeros(len(FIELD_TERMS), np.float32)), img)
    c = np.random.default_rng(1).uniform(-0.3, 0.3, len(FIELD_TERMS)).astype(np.float32)
    out, lo = apply_field_numpy(img, c), img.min()
    expected = np.exp(field_numpy(c, SIZE, SIZE))
    for ch in range(3):
        np.testing.assert_allclose(lo + (img[..., ch] - lo) * expected, out[..., ch], rtol=1e-5, atol=1e-6)


def test_the_two_paths_give_the_same_image_for_the_same_coefficients():
    imgs = np.stack([image(channels=3, seed=s) for s in range(4)])               # (N,H,W,C)
    coeffs = np.random.default_rng(2).uniform(-0.3, 0.3, (4, len(FIELD_TERMS))).astype(np.float32)
    flag = torch.tensor([True, False, True, True])
    batch = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    out = apply_bias_field(batch, flag, torch.from_numpy(coeffs)).permute(0, 2, 3, 1).numpy()
    for i in range(4):
        want = apply_field_numpy(imgs[i], coeffs[i]) if flag[i] else imgs[i]
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-5)


def test_the_cpu_transform_draws_a_field_within_its_limit_and_leaves_the_mask():
    t = build_cpu_transform(FIELD, seed=0)
    assert [type(s) for s in t.transforms] == [type(s) for s in build_cpu_transform(OFF).transforms] + [BiasField]
    img, mask = image(), (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 3).astype(np.uint8)
    logs = []
    for seed in range(20):
        t.set_random_seed(seed)
        out = t(image=img, mask=mask)
        np.testing.assert_array_equal(out["mask"], mask)
        logs.append(np.log((out["image"] - img.min())[4:] / (img - img.min())[4:]))
    spread = [float(g.max() - g.min()) for g in logs]
    assert min(spread) > 0.01                             # every sample got a field (p = 1) that varies in space
    assert max(np.abs(g).max() for g in logs) <= 0.3 * len(FIELD_TERMS) + 1e-4
    assert len({round(s, 4) for s in spread}) == 20       # a new field per seed
    assert not any(isinstance(s, BiasField) for s in build_cpu_transform(OFF).transforms)   # off: no step


def test_the_batch_path_applies_the_field_to_about_its_probability_of_samples():
    n = 400
    aug = BatchAugment(replace(FIELD, bias_field=0.5))
    img = torch.from_numpy(np.stack([image(channels=1, seed=s % 7) for s in range(n)])).permute(0, 3, 1, 2)
    mask = torch.zeros((n, SIZE, SIZE), dtype=torch.uint8)
    out, out_mask = aug(img.clone(), mask, generator=torch.Generator().manual_seed(0))
    changed = (out != img).flatten(1).any(1)
    assert 160 <= int(changed.sum()) <= 240
    assert torch.equal(out_mask, mask)
    params = aug.sample(n, "cpu", torch.Generator().manual_seed(1))
    c = params.field_coefficients
    assert c.shape == (n, len(FIELD_TERMS)) and float(c.abs().max()) <= 0.3
    assert float(c.min()) < -0.25 and float(c.max()) > 0.25          # the whole range is drawn


@pytest.mark.parametrize("key, value", [("bias_field", 1.5), ("bias_field_limit", 1.0), ("bias_field_limit", -0.1)])
def test_out_of_range_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"augment.{key}"):
        check_config(replace(FIELD, **{key: value}))
