"""Small rotations: direction, both paths alike, angles within the limit, sides kept, config checks."""

from __future__ import annotations

from dataclasses import replace

import albumentations as A
import numpy as np
import pytest
import torch

from dlseg.augment import AugmentConfig, BatchAugment, build_cpu_transform, check_config
from dlseg.augment_rotate import apply_rotation, rotation_step

SIZE = 48
OFF = AugmentConfig(hflip=0, vflip=0, transpose=0, scale=0, rotate90=0, brightness_contrast=0)
ROTATE = replace(OFF, rotate=1.0, rotate_limit=20.0)


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """A mask with a bar (label 1) on the upper left and a block (label 2) on the lower right; image = mask + ramp."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:14, 6:26] = 1
    mask[30:42, 32:40] = 2
    ramp = np.linspace(0.0, 0.5, SIZE, dtype=np.float32)[None, :]
    return mask.astype(np.float32) * 2 + ramp, mask


def fixed_angle(angle: float) -> A.Compose:
    """The per-sample step with its angle pinned."""
    step = rotation_step(0.0, 1.0)
    step.rotate = (angle, angle)
    return A.Compose([step])


def bar_angle(mask: np.ndarray, label: int = 1) -> float:
    """Orientation of a label's principal axis, degrees counter-clockwise as displayed (rows down)."""
    ys, xs = np.nonzero(mask == label)
    cov = np.cov(np.stack([xs - xs.mean(), -(ys - ys.mean())]))
    vx, vy = np.linalg.eigh(cov)[1][:, -1]
    angle = np.degrees(np.arctan2(vy, vx))
    return float((angle + 90) % 180 - 90)


def test_a_right_angle_is_a_counter_clockwise_quarter_turn_on_both_paths():
    img, mask = phantom()
    out = fixed_angle(90.0)(image=img, mask=mask)
    np.testing.assert_array_equal(out["mask"], np.rot90(mask))
    np.testing.assert_allclose(out["image"], np.rot90(img), atol=1e-4)   # cv2 interpolates in fixed point
    bi, bm = apply_rotation(torch.from_numpy(img)[None, None], torch.from_numpy(mask)[None].long(),
                            torch.tensor([True]), torch.tensor([90.0]))
    np.testing.assert_array_equal(bm[0].numpy(), np.rot90(mask))
    np.testing.assert_allclose(bi[0, 0].numpy(), np.rot90(img), atol=1e-4)


@pytest.mark.parametrize("angle", [-17.0, 12.5])
def test_the_two_paths_turn_by_the_same_angle_the_same_way(angle):
    img, mask = phantom()
    out = fixed_angle(angle)(image=img, mask=mask)
    bi, bm = apply_rotation(torch.from_numpy(img)[None, None], torch.from_numpy(mask)[None].long(),
                            torch.tensor([True]), torch.tensor([angle]))
    assert (out["mask"] == bm[0].numpy()).mean() > 0.995
    np.testing.assert_allclose(out["image"], bi[0, 0].numpy(), atol=1e-3)
    assert bar_angle(bm[0].numpy()) == pytest.approx(angle, abs=3.0)


def test_the_cpu_transform_turns_within_its_limit_and_keeps_image_and_mask_together():
    _, mask = phantom()
    channels = np.stack([mask == 1, mask == 2], axis=-1).astype(np.float32)   # each organ as its own channel
    t = build_cpu_transform(ROTATE, seed=3)
    angles = []
    ys, xs = np.indices(mask.shape)
    for _ in range(12):
        out = t(image=channels, mask=mask)
        angles.append(bar_angle(out["mask"]))
        for label in (1, 2):                                  # image and mask still overlay: same centroids
            weights = out["image"][..., label - 1]
            my, mx = np.nonzero(out["mask"] == label)
            assert np.average(ys, weights=weights) == pytest.approx(my.mean(), abs=0.5)
            assert np.average(xs, weights=weights) == pytest.approx(mx.mean(), abs=0.5)
        assert set(np.unique(out["mask"])) == {0, 1, 2}                       # nearest: no new label values
    assert max(abs(a) for a in angles) <= 20.0 + 3.0
    assert np.std(angles) > 4.0                                               # drawn anew each time


def test_a_small_rotation_keeps_each_organ_on_its_side():
    img, mask = phantom()
    t = build_cpu_transform(replace(ROTATE, rotate_limit=15.0), seed=0)
    for _ in range(10):
        out = t(image=img, mask=mask)["mask"]
        left_cols = np.nonzero(out == 1)[1].mean()
        right_cols = np.nonzero(out == 2)[1].mean()
        assert left_cols < SIZE / 2 < right_cols


def test_the_batch_path_turns_about_its_probability_of_samples_and_leaves_the_others():
    torch.manual_seed(0)
    img, mask = phantom()
    n = 200
    images = torch.from_numpy(img)[None, None].repeat(n, 2, 1, 1)
    masks = torch.from_numpy(mask)[None].long().repeat(n, 1, 1)
    aug = BatchAugment(replace(ROTATE, rotate=0.5))
    params = aug.sample(n, "cpu", torch.Generator().manual_seed(1))
    out_img, out_mask = aug.apply(images.clone(), masks.clone(), params)
    changed = (out_mask != masks).flatten(1).any(1)
    turned = params.rotate & (params.angle.abs() > 2.0)    # below ~2° a 48-pixel bar may not move a pixel
    assert torch.equal(changed[~params.rotate], torch.zeros_like(changed[~params.rotate]))
    assert bool(changed[turned].all())
    assert 0.4 < float(params.rotate.float().mean()) < 0.6
    assert float(params.angle.abs().max()) <= 20.0
    assert torch.equal(out_img[~params.rotate], images[~params.rotate])
    assert torch.equal(out_img[:, 0], out_img[:, 1])                    # every channel under the same geometry


def test_off_by_default_and_the_article_streams_unchanged():
    assert AugmentConfig().rotate == 0.0
    img, mask = phantom()
    a = build_cpu_transform(AugmentConfig(), seed=5)
    b = build_cpu_transform(replace(AugmentConfig(), rotate_limit=40.0), seed=5)
    for _ in range(4):
        oa, ob = a(image=img, mask=mask), b(image=img, mask=mask)
        np.testing.assert_array_equal(oa["mask"], ob["mask"])
        np.testing.assert_array_equal(oa["image"], ob["image"])


@pytest.mark.parametrize("key,value", [("rotate", 1.5), ("rotate", -0.1), ("rotate_limit", 120.0),
                                       ("rotate_limit", -5.0)])
def test_out_of_range_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"augment.{key}"):
        check_config(replace(ROTATE, **{key: value}))
