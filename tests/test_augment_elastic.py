"""Elastic warps: identity at zero, both paths alike, smooth and of the asked size, overlaid, config checks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dlseg.augment import AugmentConfig, BatchAugment, build_cpu_transform, check_config
from dlseg.augment_elastic import ElasticWarp, apply_elastic, displacement
from dlseg.errors import ConfigError

SIZE = 64
OFF = AugmentConfig(hflip=0, vflip=0, transpose=0, scale=0, rotate90=0, brightness_contrast=0)
ELASTIC = replace(OFF, elastic=1.0, elastic_std=0.04)


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """A block (label 1) on the left, a disc (label 2) on the right; image = 2·mask + a ramp across."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[10:40, 6:24] = 1
    yy, xx = np.mgrid[:SIZE, :SIZE]
    mask[(yy - 40) ** 2 + (xx - 46) ** 2 < 100] = 2
    ramp = np.linspace(0.0, 0.5, SIZE, dtype=np.float32)[None, :]
    return mask.astype(np.float32) * 2 + ramp, mask


def batch_path(img: np.ndarray, mask: np.ndarray, controls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sample through the batch path with these control displacements."""
    channels = img if img.ndim == 3 else img[..., None]
    out_i, out_m = apply_elastic(torch.from_numpy(channels).permute(2, 0, 1)[None], torch.from_numpy(mask)[None].long(),
                                 torch.tensor([True]), torch.from_numpy(controls)[None])
    out = out_i[0].permute(1, 2, 0).numpy()
    return (out if img.ndim == 3 else out[..., 0]), out_m[0].numpy()


def cpu_path(img: np.ndarray, mask: np.ndarray, controls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sample through the per-sample step with these control displacements."""
    step = ElasticWarp(std=0.04, p=1.0)
    return step.apply(img, controls=controls), step.apply_to_mask(mask, controls=controls)


def test_zero_displacement_leaves_the_sample_unchanged_on_both_paths():
    img, mask = phantom()
    zero = np.zeros((2, 3, 3), np.float32)
    for out_img, out_mask in (cpu_path(img, mask, zero), batch_path(img, mask, zero)):
        np.testing.assert_array_equal(out_mask, mask)
        np.testing.assert_allclose(out_img, img, atol=1e-4)   # cv2.remap blends in fixed point


def test_a_uniform_displacement_shifts_the_content_by_that_many_pixels():
    img, mask = phantom()
    controls = np.zeros((2, 3, 3), np.float32)
    controls[0] = 3 / SIZE   # every output pixel reads 3 pixels to its right: the content moves 3 pixels left
    for out_img, out_mask in (cpu_path(img, mask, controls), batch_path(img, mask, controls)):
        np.testing.assert_array_equal(out_mask[:, :-3], mask[:, 3:])
        np.testing.assert_allclose(out_img[:, :-3], img[:, 3:], atol=1e-3)


def test_the_two_paths_warp_alike():
    img, mask = phantom()
    img = np.stack([img, img * 0.5, img + 1], axis=-1)   # a 2.5D sample: every channel gets the same warp
    controls = (np.random.default_rng(3).standard_normal((2, 3, 3)) * 0.04).astype(np.float32)
    ci, cm = cpu_path(img, mask, controls)
    bi, bm = batch_path(img, mask, controls)
    assert not np.array_equal(cm, mask)   # it did warp
    assert (cm == bm).mean() >= 0.995   # nearest-neighbour ties may round apart
    np.testing.assert_allclose(ci, bi, atol=2e-2)   # cv2.remap interpolates in 1/32-pixel steps
    np.testing.assert_allclose(ci[..., 1], ci[..., 0] * 0.5, atol=1e-5)


def test_a_single_channel_axis_is_kept():
    img, mask = phantom()
    controls = np.full((2, 3, 3), 0.01, np.float32)
    out = cpu_path(img[..., None], mask, controls)[0]
    assert out.shape == (SIZE, SIZE, 1)
    np.testing.assert_array_equal(out[..., 0], cpu_path(img, mask, controls)[0])


def test_the_field_is_smooth_and_its_control_points_move_by_their_draws():
    controls = torch.from_numpy((np.random.default_rng(0).standard_normal((1, 2, 3, 3)) * 0.05).astype(np.float32))
    d = displacement(controls, SIZE, SIZE)[0]
    corners = d[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    expected = controls[0][:, [0, 0, -1, -1], [0, -1, 0, -1]] * SIZE
    torch.testing.assert_close(corners, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(d[:, SIZE // 2 - 1:SIZE // 2 + 1, SIZE // 2 - 1:SIZE // 2 + 1].mean((1, 2)),
                               controls[0][:, 1, 1] * SIZE, atol=0.2, rtol=0)   # the centre point, between pixels
    step = d.diff(dim=2).abs().max()   # neighbouring pixels move by far less than a pixel apart
    assert step < 0.5


def test_drawn_displacements_have_the_asked_spread_and_are_clipped():
    transform = build_cpu_transform(replace(ELASTIC, elastic_std=0.02), seed=1)
    step = next(t for t in transform.transforms if isinstance(t, ElasticWarp))
    draws = np.stack([step.get_params()["controls"] for _ in range(400)])
    assert 0.018 < draws.std() < 0.022
    assert np.abs(draws).max() <= 3 * 0.02 + 1e-7
    params = BatchAugment(replace(ELASTIC, elastic_std=0.02)).sample(400, "cpu", torch.Generator().manual_seed(1))
    assert 0.018 < float(params.controls.std()) < 0.022
    assert float(params.controls.abs().max()) <= 3 * 0.02 + 1e-7


def test_image_and_mask_stay_overlaid_and_organs_on_their_side():
    img, mask = phantom()
    transform = build_cpu_transform(ELASTIC, seed=5)
    for _ in range(10):
        out = transform(image=(mask * 10).astype(np.float32), mask=mask)
        agree = np.round(out["image"] / 10) == out["mask"]
        assert agree.mean() > 0.99   # bilinear blends only at organ borders
        for label, side in ((1, "left"), (2, "right")):
            xs = np.nonzero(out["mask"] == label)[1]
            assert xs.size > 0 and (xs.mean() < SIZE / 2 if side == "left" else xs.mean() > SIZE / 2)


def test_the_batch_path_warps_about_its_probability_and_leaves_the_others_bit_identical():
    img, mask = phantom()
    n = 64
    image = torch.from_numpy(img)[None, None].repeat(n, 1, 1, 1)
    masks = torch.from_numpy(mask)[None].long().repeat(n, 1, 1)
    aug = BatchAugment(replace(ELASTIC, elastic=0.5))
    params = aug.sample(n, "cpu", torch.Generator().manual_seed(2))
    out_i, out_m = aug.apply(image, masks, params)
    drawn = params.elastic
    assert 20 <= int(drawn.sum()) <= 44
    assert torch.equal(out_i[~drawn], image[~drawn]) and torch.equal(out_m[~drawn], masks[~drawn])
    changed = (out_m[drawn] != masks[drawn]).flatten(1).any(1)
    assert bool(changed.all())


def test_off_by_default_and_the_article_stream_unchanged():
    assert AugmentConfig().elastic == 0
    img, mask = phantom()
    plain = build_cpu_transform(AugmentConfig(), seed=7)
    with_key = build_cpu_transform(replace(AugmentConfig(), elastic_std=0.05), seed=7)
    assert not any(isinstance(t, ElasticWarp) for t in plain.transforms)
    a, b = plain(image=img, mask=mask), with_key(image=img, mask=mask)
    np.testing.assert_array_equal(a["image"], b["image"])


@pytest.mark.parametrize("key, value", [("elastic", 1.5), ("elastic_std", -0.01), ("elastic_std", 0.07),
                                        ("elastic_grid", 1), ("elastic_grid", 40)])
def test_out_of_range_settings_are_refused_naming_the_key(key, value):
    with pytest.raises((ValueError, ConfigError), match=f"augment.{key}"):
        check_config(replace(ELASTIC, **{key: value}))


def test_a_finer_grid_lowers_the_largest_std_accepted():
    check_config(replace(ELASTIC, elastic_grid=3, elastic_std=0.06))
    with pytest.raises(ConfigError, match="fold"):
        check_config(replace(ELASTIC, elastic_grid=9, elastic_std=0.06))

