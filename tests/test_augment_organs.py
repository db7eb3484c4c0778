"""Organ contrast: labelled organs moved to their own random levels; both paths, probabilities, exact values."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation, binary_erosion

from dlseg.augment import AugmentConfig, BatchAugment, build_cpu_transform, for_store_labels
from dlseg.augment_organs import MAX_LABELS, apply_organ_contrast, resolve_organ_labels, shift_organs
from dlseg.config import parse_args
from dlseg.errors import ConfigError
from dlseg.train_config import TrainConfig

SIZE, SIGMA = 48, 1.0
RADIUS = math.ceil(4 * SIGMA)          # the blur's reach: beyond it an organ's shift is exactly 0 or exactly 1
SQUARE = np.ones((3, 3), bool)         # the blur's kernel is a square: grow and shrink by whole squares
OFF = AugmentConfig(hflip=0, vflip=0, transpose=0, scale=0, rotate90=0, brightness_contrast=0)
ORGANS = replace(OFF, organ_contrast=1.0, organ_low=-1.5, organ_high=3.0, organ_sigma=SIGMA)


def textured_image(channels: int = 0) -> np.ndarray:
    """Noise (the texture the shift must keep); (H,W) or (H,W,C)."""
    shape = (SIZE, SIZE) if channels == 0 else (SIZE, SIZE, channels)
    return np.random.default_rng(3).normal(size=shape).astype(np.float32)


def two_organs() -> np.ndarray:
    """Label 1: a large rectangle; label 3: a smaller one (label 2 absent), far apart."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[4:26, 4:40] = 1
    m[32:44, 20:44] = 3
    return m


def regions(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per label, its interior out of the blur's reach; and the background out of every organ's reach."""
    out = {c: binary_erosion(mask == c, SQUARE, iterations=RADIUS + 1) for c in (1, 3)}
    out["far"] = ~binary_dilation(mask > 0, SQUARE, iterations=RADIUS + 1)
    return out


def levels_of(img: np.ndarray, out: np.ndarray, mask: np.ndarray) -> dict[int, float]:
    """Each organ's level, read back from its interior: the shift there is uniform and equals level − mean."""
    reg = regions(mask)
    result = {}
    for c in (1, 3):
        shift = (out - img)[reg[c]]
        np.testing.assert_allclose(shift, shift.mean(), atol=1e-4)          # one shift: texture kept
        result[c] = float(shift.mean() + img[mask == c].mean())
    np.testing.assert_array_equal(out[reg["far"]], img[reg["far"]])          # far from organs: untouched
    return result


def test_interior_moves_to_the_level_and_the_border_fades():
    img, mask = textured_image(), two_organs()
    out = shift_organs(img, mask, {1: 2.5, 3: -1.0}, SIGMA)
    assert levels_of(img, out, mask) == pytest.approx({1: 2.5, 3: -1.0}, abs=1e-5)
    # just outside organ 1 (one pixel) the shift is part of the interior's, neither 0 nor all of it
    ring = binary_dilation(mask == 1) & (mask == 0) & ~binary_dilation(mask == 3, SQUARE, iterations=RADIUS + 1)
    fraction = (out - img)[ring] / (2.5 - img[mask == 1].mean())
    assert 0.05 < fraction.min() and fraction.max() < 0.95


@pytest.mark.parametrize("channels", [0, 3])
def test_both_paths_compute_the_same_image_for_the_same_levels(channels):
    img, mask = textured_image(channels), two_organs()
    cpu = shift_organs(img, mask, {1: 2.0, 3: -0.5}, SIGMA)
    levels = torch.zeros(1, MAX_LABELS)
    levels[0, 0], levels[0, 1], levels[0, 2] = 2.0, 9.0, -0.5          # label 2 is absent: its level is unused
    timg = torch.from_numpy(img if channels else img[..., None]).permute(2, 0, 1)[None].contiguous()
    batch = apply_organ_contrast(timg, torch.from_numpy(mask)[None].long(), torch.tensor([True]), levels, SIGMA)
    batch = batch[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(batch if channels else batch[..., 0], cpu, atol=1e-5)
    if channels:                                                        # every channel gets the same shift
        np.testing.assert_allclose(np.ptp(cpu - img, axis=2), 0, atol=1e-5)


@pytest.mark.parametrize("path", ["cpu", "batch"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_probability_and_uniform_levels(path, p):
    n, img, mask = 300, textured_image(), two_organs()
    cfg = replace(ORGANS, organ_contrast=p)
    if path == "cpu":
        t = build_cpu_transform(cfg, seed=0)
        outs = [t(image=img, mask=mask) for _ in range(n)]
        assert all(np.array_equal(o["mask"], mask) for o in outs)
        outs = [o["image"] for o in outs]
    else:
        timg = torch.from_numpy(img).expand(n, 1, SIZE, SIZE).contiguous()
        tmask = torch.from_numpy(mask).expand(n, SIZE, SIZE).contiguous()
        out, out_mask = BatchAugment(cfg)(timg, tmask, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out_mask, tmask)
        outs = list(out[:, 0].numpy())
    changed = [o for o in outs if not np.array_equal(o, img)]
    assert abs(len(changed) / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9
    if p:
        drawn = np.array([[lv[1], lv[3]] for lv in (levels_of(img, o, mask) for o in changed)])
        assert drawn.min() >= -1.5 - 1e-4 and drawn.max() <= 3.0 + 1e-4
        assert np.abs(drawn.mean(axis=0) - 0.75).max() < 0.3                 # uniform on [-1.5, 3]: mean 0.75
        assert abs(np.corrcoef(drawn.T)[0, 1]) < 0.3                           # each organ its own level


def test_unlabelled_sample_and_flag_off_are_identity():
    img = torch.from_numpy(textured_image())[None, None]
    empty = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    levels = torch.full((1, MAX_LABELS), 2.0)
    assert torch.equal(apply_organ_contrast(img, empty, torch.tensor([True]), levels, SIGMA), img)
    organs = torch.from_numpy(two_organs())[None].long()
    assert torch.equal(apply_organ_contrast(img, organs, torch.tensor([False]), levels, SIGMA), img)


def test_off_by_default_and_validated():
    assert AugmentConfig().organ_contrast == 0.0
    for bad in ({"organ_low": 1.0, "organ_high": 1.0}, {"organ_sigma": -1.0}, {"organ_contrast": 1.5}):
        with pytest.raises(ValueError, match="augment.organ"):
            BatchAugment(replace(ORGANS, **bad))


@pytest.mark.parametrize("path", ["cpu", "batch"])
def test_organ_labels_moves_only_the_listed_labels(path):
    n, img, mask = 40, textured_image(), two_organs()
    cfg = replace(ORGANS, organ_labels=["3"])
    if path == "cpu":
        t = build_cpu_transform(cfg, seed=0)
        outs = [t(image=img, mask=mask)["image"] for _ in range(n)]
    else:
        timg = torch.from_numpy(img).expand(n, 1, SIZE, SIZE).contiguous()
        tmask = torch.from_numpy(mask).expand(n, SIZE, SIZE).contiguous()
        out, _ = BatchAugment(cfg)(timg, tmask, generator=torch.Generator().manual_seed(0))
        outs = list(out[:, 0].numpy())
    reach_3 = binary_dilation(mask == 3, SQUARE, iterations=RADIUS + 1)
    inside_3 = regions(mask)[3]
    for o in outs:
        np.testing.assert_array_equal(o[~reach_3], img[~reach_3])         # label 1 and the background untouched
        level = (o - img)[inside_3].mean() + img[mask == 3].mean()
        assert -1.5 - 1e-4 <= level <= 3.0 + 1e-4
    assert np.std([(o - img)[inside_3].mean() for o in outs]) > 0.5        # label 3 drawn anew each time


def test_organ_labels_from_the_command_line_and_validated():
    cfg = parse_args(TrainConfig, ["--augment.organ_labels", "liver,4"], prog="train", description="")
    assert cfg.augment.organ_labels == ["liver", "4"]
    assert AugmentConfig().organ_labels == []
    for bad in (["0"], [str(MAX_LABELS + 1)]):
        with pytest.raises(ValueError, match="augment.organ_labels"):
            BatchAugment(replace(ORGANS, organ_labels=bad))
    with pytest.raises(ValueError, match="'liver' is a name"):           # a library caller must resolve names
        BatchAugment(replace(ORGANS, organ_labels=["liver"]))


STORE_LABELS = ["liver", "right kidney", "left kidney", "spleen"]


def test_names_resolve_to_this_stores_numbers():
    assert resolve_organ_labels(["Liver", "spleen", "3"], STORE_LABELS) == ["1", "4", "3"]
    assert resolve_organ_labels(["spleen"], ["spleen", "liver"]) == ["1"]          # another dataset's order
    cfg = for_store_labels(replace(ORGANS, organ_labels=["right kidney"]), STORE_LABELS)
    assert cfg.organ_labels == ["2"] and BatchAugment(cfg).organ_labels == (2,)
    for bad in (["pancreas"], ["5"]):
        with pytest.raises(ConfigError, match=r"not a label of this store \(it has 1 liver, 2 right kidney"):
            resolve_organ_labels(bad, STORE_LABELS)
    with pytest.raises(ConfigError, match="'spleen' is not a label"):            # a liver-only store
        resolve_organ_labels(["liver", "spleen"], ["liver"])
