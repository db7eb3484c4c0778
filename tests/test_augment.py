"""Augmentation: each transform with its probability, exact image/mask alignment, CPU and batched paths."""

from __future__ import annotations

import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlseg.augment import (AugmentConfig, AugmentParams, BatchAugment, SampleTransform, build_cpu_transform,
                           seed_transform)
from dlseg.data import SeededTransform

OFF = AugmentConfig(hflip=0, vflip=0, transpose=0, scale=0, rotate90=0, brightness_contrast=0)
SIZE = 24


def only(**probs: float) -> AugmentConfig:
    """Every transform off except the given ones."""
    return replace(OFF, **probs)


def coded_image(size: int = SIZE) -> np.ndarray:
    """Asymmetric image with all-distinct values, so every symmetry of the square is recognisable."""
    return np.arange(size * size, dtype=np.float32).reshape(size, size) / (size * size)


def label_mask(size: int = SIZE) -> np.ndarray:
    """Asymmetric labels 0..2: an off-centre rectangle of 1s and a disc of 2s."""
    m = np.zeros((size, size), np.uint8)
    m[size // 6: size // 2, size // 8: size * 3 // 4] = 1
    yy, xx = np.mgrid[:size, :size]
    m[(yy - size * 0.7) ** 2 + (xx - size * 0.3) ** 2 < (size * 0.18) ** 2] = 2
    return m


def dihedral_images(img: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square: rot90^k, and rot90^k of the transpose."""
    return [np.rot90(img, k) for k in range(4)] + [np.rot90(img.T, k) for k in range(4)]


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """``count`` successes out of ``n`` is consistent with probability ``p``."""
    return abs(count / n - p) <= sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9


def cpu_outcomes(cfg: AugmentConfig, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` augmented copies of the coded image through the albumentations path."""
    t = build_cpu_transform(cfg, seed=seed)
    img, mask = coded_image(), label_mask()
    return [t(image=img, mask=mask)["image"] for _ in range(n)]


def batch_outcomes(cfg: AugmentConfig, n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """``n`` augmented copies of the coded image through the batched path, (N, H, W) float32."""
    img = torch.from_numpy(coded_image()).to(dtype).expand(n, 1, SIZE, SIZE).contiguous()
    mask = torch.from_numpy(label_mask()).expand(n, SIZE, SIZE).contiguous()
    g = torch.Generator().manual_seed(seed)
    out, _ = BatchAugment(cfg)(img, mask, generator=g)
    return out[:, 0].float()


# ---------------------------------------------------------------- probabilities, both paths

FLIPS = {
    "hflip": lambda x: x[:, ::-1],
    "vflip": lambda x: x[::-1, :],
    "transpose": lambda x: x.T,
}


def classify(out: np.ndarray, candidates: list[np.ndarray]) -> int:
    """Index of the candidate ``out`` equals exactly (-1 when none)."""
    for i, c in enumerate(candidates):
        if np.array_equal(out, c):
            return i
    return -1


@pytest.mark.parametrize("path", ["cpu", "batch"])
@pytest.mark.parametrize("name", list(FLIPS))
@pytest.mark.parametrize("p", [0.0, 1.0, 0.5, 0.8])
def test_flip_and_transpose_probability(path, name, p):
    n = 1500
    img = coded_image()
    outs = cpu_outcomes(only(**{name: p}), n) if path == "cpu" else list(batch_outcomes(only(**{name: p}), n).numpy())
    kinds = [classify(o, [img, FLIPS[name](img)]) for o in outs]
    assert -1 not in kinds
    assert within(sum(kinds), n, p)


@pytest.mark.parametrize("path", ["cpu", "batch"])
@pytest.mark.parametrize("p", [0.0, 1.0, 0.5])
def test_rotate90_probability_and_uniform_quarter_turns(path, p):
    n = 2000
    cfg = only(rotate90=p)
    outs = cpu_outcomes(cfg, n) if path == "cpu" else list(batch_outcomes(cfg, n).numpy())
    kinds = np.array([classify(o, [np.rot90(coded_image(), k) for k in range(4)]) for o in outs])
    assert (kinds >= 0).all()
    # applied with p, then k uniform in 0..3 (k = 0 looks unchanged, as in albumentations' RandomRotate90)
    for k in (1, 2, 3):
        assert within(int((kinds == k).sum()), n, p / 4)
    assert within(int((kinds == 0).sum()), n, 1 - p + p / 4)


@pytest.mark.parametrize("path", ["cpu", "batch"])
@pytest.mark.parametrize("p", [0.0, 1.0, 0.5])
def test_scale_probability(path, p):
    n = 1000
    cfg = only(scale=p)
    outs = cpu_outcomes(cfg, n) if path == "cpu" else list(batch_outcomes(cfg, n).numpy())
    changed = sum(not np.array_equal(o, coded_image()) for o in outs)
    assert within(changed, n, p)


@pytest.mark.parametrize("path", ["cpu", "batch"])
@pytest.mark.parametrize("p", [0.0, 1.0, 0.5])
def test_brightness_contrast_probability_and_range(path, p):
    n = 1000
    cfg = only(brightness_contrast=p)
    outs = cpu_outcomes(cfg, n) if path == "cpu" else list(batch_outcomes(cfg, n).numpy())
    img = coded_image()
    changed = 0
    for o in outs:
        # every output is a * img + b exactly (no clipping), with a in [0.8, 1.2] and b in [-0.2, 0.2]
        a = (o.flat[-1] - o.flat[0]) / (img.flat[-1] - img.flat[0])
        b = o.flat[0] - a * img.flat[0]
        np.testing.assert_allclose(o, a * img + b, atol=1e-5)
        assert 0.8 - 1e-5 <= a <= 1.2 + 1e-5 and -0.2 - 1e-5 <= b <= 0.2 + 1e-5
        changed += not (abs(a - 1) < 1e-7 and abs(b) < 1e-7)
    assert within(changed, n, p)


@pytest.mark.parametrize("path", ["cpu", "batch"])
def test_transforms_are_decided_independently(path):
    # albumentations' Compose(seed=...) alone would make hflip and vflip (same p) always agree.
    n = 2000
    cfg = only(hflip=0.5, vflip=0.5)
    outs = cpu_outcomes(cfg, n, seed=7) if path == "cpu" else list(batch_outcomes(cfg, n, seed=7).numpy())
    img = coded_image()
    kinds = np.array([classify(o, [img, img[:, ::-1], img[::-1, :], img[::-1, ::-1]]) for o in outs])
    assert (kinds >= 0).all()
    for k in range(4):
        assert within(int((kinds == k).sum()), n, 0.25)


def test_batch_draws_match_configured_probabilities():
    cfg = AugmentConfig(hflip=0.1, vflip=0.3, transpose=0.5, scale=0.7, rotate90=0.9, brightness_contrast=0.2)
    n = 20000
    params = BatchAugment(cfg).sample(n, "cpu", torch.Generator().manual_seed(0))
    for key in ("hflip", "vflip", "transpose", "scale", "rotate90", "brightness_contrast"):
        assert within(int(getattr(params, key).sum()), n, getattr(cfg, key)), key
    assert within(int((params.quarter_turns == 3).sum()), n, 0.25)
    for key, lo, hi in (("zoom", 0.9, 1.1), ("contrast", 0.8, 1.2), ("brightness", -0.2, 0.2)):
        v = getattr(params, key)
        assert lo <= v.min() and v.max() <= hi and abs(v.mean().item() - (lo + hi) / 2) < 0.01, key


def test_batch_dihedral_composition_equals_sequential_ops():
    x = torch.from_numpy(coded_image(6)).view(1, 1, 6, 6)
    symmetries = BatchAugment(only(hflip=0.5, vflip=0.5, transpose=0.5, rotate90=0.5))
    for bits in range(64):
        h, v, tr, rot, k = bits & 1, bits >> 1 & 1, bits >> 2 & 1, bits >> 3 & 1, bits >> 4
        ref = x
        ref = ref.flip(-1) if h else ref
        ref = ref.flip(-2) if v else ref
        ref = ref.transpose(-1, -2) if tr else ref
        ref = torch.rot90(ref, k, (-2, -1)) if rot else ref
        one = lambda b: torch.tensor([bool(b)])  # noqa: E731
        p = AugmentParams(one(h), one(v), one(tr), one(0), torch.ones(1), one(rot), torch.tensor([k]), one(0),
                          torch.ones(1), torch.zeros(1))
        out, _ = symmetries.apply(x, x[:, 0].long(), p)
        assert torch.equal(out, ref), (h, v, tr, rot, k)


# ---------------------------------------------------------------- alignment

def encoded(mask: np.ndarray) -> np.ndarray:
    """Image that carries its mask: 10 × label + a position code in [0, 1)."""
    return (mask.astype(np.float32) * 10 + coded_image(mask.shape[0])).astype(np.float32)


def decoded_label(image: np.ndarray) -> np.ndarray:
    """The label an encoded image carries (exact where the pixel is not a blend across a label edge)."""
    return np.round((image - 0.5) / 10)


def interior(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)² neighbourhood in ``mask`` has one label (no bilinear blend can reach them)."""
    padded = np.pad(mask, radius, mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1))
    return win.min(axis=(-2, -1)) == win.max(axis=(-2, -1))


@pytest.mark.parametrize("path", ["cpu", "batch"])
def test_symmetries_keep_image_and_mask_exactly_aligned(path):
    cfg = only(hflip=0.5, vflip=0.5, transpose=0.5, rotate90=0.8)
    mask = label_mask()
    img = encoded(mask)
    n = 200
    if path == "cpu":
        t = build_cpu_transform(cfg, seed=1)
        pairs = [(o["image"], o["mask"]) for o in (t(image=img, mask=mask) for _ in range(n))]
    else:
        out, out_mask = BatchAugment(cfg)(torch.from_numpy(img).expand(n, 1, SIZE, SIZE).contiguous(),
                                          torch.from_numpy(mask).expand(n, SIZE, SIZE).contiguous(),
                                          generator=torch.Generator().manual_seed(1))
        pairs = list(zip(out[:, 0].numpy(), out_mask.numpy()))
    seen = set()
    for o_img, o_mask in pairs:
        kind = classify(o_mask, dihedral_images(mask))
        assert kind >= 0
        assert np.array_equal(o_img, dihedral_images(img)[kind])
        seen.add(kind)
    assert len(seen) == 8  # every symmetry of the square occurs


def check_zoom_alignment(img: np.ndarray, mask: np.ndarray, base_mask: np.ndarray) -> None:
    """Away from label edges the image carries exactly the mask's label; nearly all pixels agree; area ≤ ±21 %."""
    label, inside = decoded_label(img), interior(mask)
    assert np.array_equal(label[inside], mask[inside].astype(label.dtype))
    assert inside.mean() > 0.6
    assert (label == mask).mean() > 0.95
    area, base = (mask > 0).sum(), (base_mask > 0).sum()
    edge = 4 * mask.shape[0]
    assert 0.8 * base - edge <= area <= 1.22 * base + edge


@pytest.mark.parametrize("path", ["cpu", "batch"])
def test_zoom_keeps_image_and_mask_aligned(path):
    cfg = only(scale=1.0)
    size, n = 64, 100
    mask = label_mask(size)
    img = encoded(mask)
    if path == "cpu":
        t = build_cpu_transform(cfg, seed=2)
        pairs = [(o["image"], o["mask"]) for o in (t(image=img, mask=mask) for _ in range(n))]
    else:
        out, out_mask = BatchAugment(cfg)(torch.from_numpy(img).expand(n, 1, size, size).contiguous(),
                                          torch.from_numpy(mask).expand(n, size, size).contiguous(),
                                          generator=torch.Generator().manual_seed(2))
        pairs = list(zip(out[:, 0].numpy(), out_mask.numpy()))
    for o_img, o_mask in pairs:
        assert o_img.shape == img.shape and o_mask.dtype == mask.dtype
        check_zoom_alignment(o_img, o_mask, mask)


def test_batch_zoom_direction_enlarges_content():
    mask = np.zeros((32, 32), np.uint8)
    mask[12:20, 12:20] = 1
    image = torch.from_numpy(encoded(mask)).view(1, 1, 32, 32).expand(2, 1, 32, 32)
    aug = BatchAugment(only(scale=1.0))
    params = aug.sample(2, "cpu")
    params.zoom = torch.tensor([1.25, 0.75])
    _, out_mask = aug.apply(image, torch.from_numpy(mask).expand(2, 32, 32), params)
    assert out_mask[0].sum() == 100 and out_mask[1].sum() == 36  # 8 px side → 10 px, 6 px


@pytest.mark.parametrize("path", ["cpu", "batch"])
def test_full_default_set_keeps_labels_aligned(path):
    mask = label_mask()
    img = encoded(mask)
    n = 200
    if path == "cpu":
        t = build_cpu_transform(AugmentConfig(), seed=3)
        pairs = [(o["image"], o["mask"]) for o in (t(image=img, mask=mask) for _ in range(n))]
    else:
        out, out_mask = BatchAugment(AugmentConfig())(torch.from_numpy(img).expand(n, 1, SIZE, SIZE).contiguous(),
                                                      torch.from_numpy(mask).expand(n, SIZE, SIZE).contiguous(),
                                                      generator=torch.Generator().manual_seed(3))
        pairs = list(zip(out[:, 0].numpy(), out_mask.numpy()))
    for o_img, o_mask in pairs:
        # brightness ±0.2 and contrast ×[0.8, 1.2] keep labels 0/1/2 (values 0..1, 10..11, 20..21) apart at 5 and 15
        label = np.digitize(o_img, [5.0, 15.0])
        assert (label == o_mask).mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batch_low_precision_matches_float32(dtype):
    mask = torch.from_numpy(label_mask()).expand(64, SIZE, SIZE).contiguous()
    img = torch.from_numpy(encoded(label_mask())).expand(64, 2, SIZE, SIZE).contiguous()
    aug = BatchAugment(AugmentConfig())
    params = aug.sample(64, "cpu", torch.Generator().manual_seed(4))
    ref_img, ref_mask = aug.apply(img, mask, params)
    out_img, out_mask = aug.apply(img.to(dtype), mask, params)
    assert out_img.dtype == dtype and out_mask.dtype == mask.dtype
    assert torch.equal(out_mask, ref_mask)
    tol = 2 * torch.finfo(dtype).eps * 25
    torch.testing.assert_close(out_img.float(), ref_img, rtol=0, atol=tol)


def test_batch_keeps_channels_together():
    mask = torch.from_numpy(label_mask()).expand(32, SIZE, SIZE).contiguous()
    one = torch.from_numpy(encoded(label_mask())).expand(32, 1, SIZE, SIZE)
    img = torch.cat([one, one * 2, one * 3], dim=1)  # 2.5D: the same slice geometry in every channel
    out, _ = BatchAugment(only(hflip=0.5, transpose=0.5, rotate90=0.5, scale=0.5))(
        img, mask, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out[:, 1], 2 * out[:, 0])
    torch.testing.assert_close(out[:, 2], 3 * out[:, 0])


def test_cpu_multichannel_image_keeps_channels_together():
    mask = label_mask()
    one = encoded(mask)
    img = np.stack([one, one * 2, one * 3], axis=-1)
    t = build_cpu_transform(only(hflip=0.5, transpose=0.5, rotate90=0.5, scale=0.5), seed=5)
    for _ in range(20):
        o = t(image=img, mask=mask)["image"]
        assert o.shape == img.shape
        np.testing.assert_allclose(o[..., 1], 2 * o[..., 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(o[..., 2], 3 * o[..., 0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- determinism, config, errors

def test_cpu_transform_is_deterministic_given_a_seed():
    a = cpu_outcomes(AugmentConfig(), 30, seed=11)
    b = cpu_outcomes(AugmentConfig(), 30, seed=11)
    c = cpu_outcomes(AugmentConfig(), 30, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_seed_transform_reseeds_a_built_transform():
    img, mask = coded_image(), label_mask()
    t = build_cpu_transform(AugmentConfig(), seed=0)
    seed_transform(t, 21)
    first = [t(image=img, mask=mask)["image"] for _ in range(10)]
    fresh = build_cpu_transform(AugmentConfig(), seed=21)
    assert all(np.array_equal(x, fresh(image=img, mask=mask)["image"]) for x in first)


def test_batch_is_deterministic_given_a_generator():
    a = batch_outcomes(AugmentConfig(), 16, seed=3)
    b = batch_outcomes(AugmentConfig(), 16, seed=3)
    c = batch_outcomes(AugmentConfig(), 16, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_disabled_is_identity():
    cfg = replace(AugmentConfig(), enabled=False)
    img, mask = encoded(label_mask()), label_mask()
    out = build_cpu_transform(cfg, seed=0)(image=img, mask=mask)
    assert np.array_equal(out["image"], img) and np.array_equal(out["mask"], mask)
    timg, tmask = torch.from_numpy(img)[None, None], torch.from_numpy(mask)[None]
    bimg, bmask = BatchAugment(cfg)(timg, tmask)
    assert torch.equal(bimg, timg) and torch.equal(bmask, tmask)


def test_batch_rejects_non_square_only_when_it_must():
    img, mask = torch.zeros(2, 1, 16, 24), torch.zeros(2, 16, 24, dtype=torch.uint8)
    with pytest.raises(ValueError, match="square"):
        BatchAugment(AugmentConfig())(img, mask)
    out, out_mask = BatchAugment(only(hflip=1.0, vflip=1.0, scale=1.0, brightness_contrast=1.0))(img, mask)
    assert out.shape == img.shape and out_mask.shape == mask.shape


@pytest.mark.parametrize("image, mask, message", [
    (torch.zeros(2, 16, 16), torch.zeros(2, 16, 16, dtype=torch.uint8), "image batch"),
    (torch.zeros(2, 1, 16, 16, dtype=torch.int16), torch.zeros(2, 16, 16, dtype=torch.uint8), "image batch"),
    (torch.zeros(2, 1, 16, 16), torch.zeros(2, 16, 16), "mask batch"),
    (torch.zeros(2, 1, 16, 16), torch.zeros(3, 16, 16, dtype=torch.long), "mask batch"),
])
def test_batch_rejects_bad_shapes_and_dtypes(image, mask, message):
    with pytest.raises(ValueError, match=message):
        BatchAugment(AugmentConfig())(image, mask)


@pytest.mark.parametrize("change, key", [({"hflip": 1.5}, "augment.hflip"), ({"scale": -0.1}, "augment.scale"),
                                         ({"scale_limit": 1.0}, "augment.scale_limit")])
def test_bad_config_names_the_key(change, key):
    cfg = replace(AugmentConfig(), **change)
    with pytest.raises(ValueError, match=key):
        build_cpu_transform(cfg)
    with pytest.raises(ValueError, match=key):
        BatchAugment(cfg)


def test_defaults_are_the_articles():
    cfg = AugmentConfig()
    assert (cfg.hflip, cfg.vflip, cfg.transpose, cfg.scale, cfg.rotate90, cfg.brightness_contrast) == (
        0.8, 0.8, 0.8, 0.5, 0.8, 0.8)
    assert (cfg.scale_limit, cfg.brightness_limit, cfg.contrast_limit) == (0.1, 0.2, 0.2)
    names = [type(s).__name__ for s in build_cpu_transform(cfg).transforms]
    assert names == ["HorizontalFlip", "VerticalFlip", "Transpose", "Affine", "RandomRotate90",
                     "NormalizedBrightnessContrast"]


def test_cpu_transform_survives_pickling_for_worker_processes():
    img, mask = coded_image(), label_mask()
    t = build_cpu_transform(AugmentConfig(), seed=9)
    copy = pickle.loads(pickle.dumps(t))
    assert all(np.array_equal(t(image=img, mask=mask)["image"], copy(image=img, mask=mask)["image"])
               for _ in range(10))


def test_sample_transform_is_the_datasets_seeded_interface():
    img, mask = coded_image(), label_mask()
    t = SampleTransform(AugmentConfig(), seed=0)
    assert isinstance(t, SeededTransform)
    t.set_random_seed(7)
    image, out_mask = t(img, mask)
    ref = build_cpu_transform(AugmentConfig(), seed=7)(image=img, mask=mask)
    assert np.array_equal(image, ref["image"]) and np.array_equal(out_mask, ref["mask"])
    copy = pickle.loads(pickle.dumps(t))
    t.set_random_seed(8)
    copy.set_random_seed(8)
    assert all(np.array_equal(a, b) for a, b in zip(t(img, mask), copy(img, mask)))


# ---------------------------------------------------------------- batched path vs torch reference ops

def reference_batch(image: torch.Tensor, mask: torch.Tensor, params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
    """hflip → vflip → transpose → rot90 per sample with torch ops, then affine_grid/grid_sample zoom (no intensity)."""
    imgs, masks = [], []
    for i in range(image.shape[0]):
        x, m = image[i:i + 1], mask[i:i + 1].unsqueeze(1).float()
        ops = [(params.hflip, lambda y: y.flip(-1)), (params.vflip, lambda y: y.flip(-2)),
               (params.transpose, lambda y: y.transpose(-1, -2)),
               (params.rotate90, lambda y, k=int(params.quarter_turns[i]): torch.rot90(y, k, (-2, -1)))]
        for flag, op in ops:
            if flag[i]:
                x, m = op(x), op(m)
        if params.scale[i]:
            theta = torch.tensor([[[1 / params.zoom[i].item(), 0, 0], [0, 1 / params.zoom[i].item(), 0]]])
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
            m = F.grid_sample(m, grid, mode="nearest", padding_mode="border", align_corners=False)
        imgs.append(x)
        masks.append(m[:, 0].to(mask.dtype))
    return torch.cat(imgs), torch.cat(masks)


@pytest.mark.parametrize("size", [32, 64])
def test_batch_matches_per_sample_torch_reference(size):
    # symmetries exact; zoom at grid_sample's positions: image to float tolerance, mask exactly (no half-pixel ties
    # at these random zooms)
    g = torch.Generator().manual_seed(size)
    n = 48
    image = torch.randn(n, 2, size, size, generator=g)
    mask = torch.randint(0, 5, (n, size, size), generator=g)
    aug = BatchAugment(replace(AugmentConfig(), brightness_contrast=0.0))
    params = aug.sample(n, "cpu", torch.Generator().manual_seed(1))
    out, out_mask = aug.apply(image, mask, params)
    ref, ref_mask = reference_batch(image, mask, params)
    assert 0 < int(params.scale.sum()) < n
    assert torch.equal(out_mask, ref_mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    unzoomed = ~params.scale
    assert torch.equal(out[unzoomed], ref[unzoomed])


def test_batch_outputs_do_not_share_memory_between_calls():
    # intermediates are reused between batches; returned tensors must not be
    aug = BatchAugment(AugmentConfig())
    g = torch.Generator().manual_seed(6)
    image = torch.from_numpy(encoded(label_mask())).expand(16, 1, SIZE, SIZE).contiguous()
    mask = torch.from_numpy(label_mask()).expand(16, SIZE, SIZE).contiguous()
    first, first_mask = aug(image, mask, generator=g)
    kept, kept_mask = first.clone(), first_mask.clone()
    second, second_mask = aug(image * 2, mask, generator=g)
    assert torch.equal(first, kept) and torch.equal(first_mask, kept_mask)
    assert not torch.equal(second_mask, first_mask)
    assert torch.equal(image, torch.from_numpy(encoded(label_mask())).expand(16, 1, SIZE, SIZE))


# ---------------------------------------------------------------- intensity remap (off by default)

def remap_knots(img: np.ndarray, out: np.ndarray, k: int) -> np.ndarray:
    """The curve's knot values (as fractions of the range) when ``out`` is ``img`` through a piecewise-linear curve
    with ``k`` equally spaced knots over [min, max]; AssertionError when it is not such a curve."""
    lo, hi = float(img.min()), float(img.max())
    pos = (img.ravel().astype(np.float64) - lo) / (hi - lo) * (k - 1)
    y = (out.ravel().astype(np.float64) - lo) / (hi - lo)
    knots = np.empty(k)
    for j in range(k - 1):                      # one line per segment, fitted by least squares
        sel = (pos >= j) & (pos <= j + 1)
        a, b = np.polyfit(pos[sel] - j, y[sel], 1)
        np.testing.assert_allclose(y[sel], a * (pos[sel] - j) + b, atol=1e-4)
        knots[j], knots[j + 1] = b, a + b
    return knots


@pytest.mark.parametrize("path", ["cpu", "batch"])
@pytest.mark.parametrize("p", [0.0, 1.0, 0.5])
def test_remap_probability_and_curve(path, p):
    n, k = 400, 4
    cfg = only(remap=p, remap_points=k)
    outs = cpu_outcomes(cfg, n) if path == "cpu" else list(batch_outcomes(cfg, n).numpy())
    img = coded_image()
    knots = np.array([remap_knots(img, o, k) for o in outs])
    changed = ~np.all(np.abs(knots - np.linspace(0, 1, k)) < 1e-6, axis=1)
    assert within(int(changed.sum()), n, p)
    if p > 0:
        drawn = knots[changed]
        assert drawn.min() >= -1e-6 and drawn.max() <= 1 + 1e-6        # inside the sample's own range
        assert abs(drawn.mean() - 0.5) < 0.05                             # knots uniform over the range
        descending = (np.diff(drawn, axis=1) < 0).any(axis=1).mean()
        assert 0.8 < descending < 1.0                                     # usually not monotone: order changes


@pytest.mark.parametrize("path", ["cpu", "batch"])
def test_remap_uses_one_curve_for_all_channels_and_keeps_the_mask(path):
    mask = label_mask()
    img = np.stack([coded_image(), coded_image() * 0.5 + 0.25], axis=-1)   # 2.5D: channels in one range
    cfg = only(remap=1.0, remap_points=3)
    if path == "cpu":
        out = build_cpu_transform(cfg, seed=2)(image=img, mask=mask)
        o, out_mask = out["image"], out["mask"]
    else:
        timg = torch.from_numpy(img.transpose(2, 0, 1).copy())[None]
        bo, bm = BatchAugment(cfg)(timg, torch.from_numpy(mask)[None], generator=torch.Generator().manual_seed(2))
        o, out_mask = bo[0].numpy().transpose(1, 2, 0), bm[0].numpy()
    assert np.array_equal(out_mask, mask)
    lo, hi = img.min(), img.max()
    knots = remap_knots(img, o, 3)              # both channels lie on the same curve over the joint range
    np.testing.assert_allclose(o, np.interp(img, np.linspace(lo, hi, 3), lo + knots * (hi - lo)), atol=1e-5)


def test_remap_is_off_by_default_and_validated():
    assert AugmentConfig().remap == 0.0
    with pytest.raises(ValueError, match="augment.remap_points"):
        build_cpu_transform(only(remap=0.5, remap_points=1))
    with pytest.raises(ValueError, match="augment.remap"):
        BatchAugment(only(remap=1.5))
