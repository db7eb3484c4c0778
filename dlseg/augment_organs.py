"""Organ contrast: labelled structures of a training sample moved to their own random intensity levels.

A model that has only seen livers brighter than muscle misses a liver that is darker: iron overload darkens the liver
and the spleen on T2, and fat, fibrosis or a contrast phase change other organs. This augmentation uses the label
map to show the model such organs. For a sample drawn (probability ``augment.organ_contrast``), every label present
(or every one of ``augment.organ_labels`` present, when that list is given: the organs whose signal varies in the
cohort, so the others keep the intensity the model may rely on) gets a level uniform in [``organ_low``,
``organ_high``] (normalized intensity units, like the brightness shift), and its pixels are shifted so that their
mean lies there; the texture inside the organ is kept (a shift, no scaling).
The shift fades out over a Gaussian of ``organ_sigma`` pixels at the organ's border, so no hard edge is painted
where the mask ends (the neighbour slices of a 2.5D input do not follow the centre slice's mask exactly); every
channel gets the same shift.

``organ_labels`` may give label numbers or the store's label names (``liver,spleen``); the trainer resolves names to
numbers against the store's label map (:func:`resolve_organ_labels`) before the transforms are built, so a recipe
does not depend on the order of a dataset's labels.

Both paths (albumentations per sample, torch per batch) compute the same image for the same levels; they do not
share random streams. The batch path draws levels for labels 1..``MAX_LABELS``.
"""

from __future__ import annotations

import math
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from dlseg.errors import ConfigError

MAX_LABELS = 16


def is_label_number(label: str) -> bool:
    """True for an ``organ_labels`` entry that gives a label number rather than a name."""
    return str(label).strip().isdigit()


def organ_label_ids(labels: list[str]) -> tuple[int, ...]:
    """``organ_labels`` as label numbers; ConfigError for a number outside 1..MAX_LABELS or a name not yet resolved."""
    ids = []
    for label in labels:
        if not is_label_number(label):
            raise ConfigError(f"augment.organ_labels: {label!r} is a name; resolve it against the store's label map "
                              "(resolve_organ_labels) or give label numbers")
        ids.append(int(label))
    if any(not 1 <= i <= MAX_LABELS for i in ids):
        raise ConfigError(f"augment.organ_labels: each must be a foreground label within 1..{MAX_LABELS}, "
                          f"got {list(labels)!r}")
    return tuple(ids)


def resolve_organ_labels(labels: list[str], label_names: list[str]) -> list[str]:
    """Names (any case) and numbers of ``organ_labels`` as numbers of a store whose foreground is ``label_names``.

    ConfigError naming the store's labels for a name or number the store does not have.
    """
    known = {name.lower(): i for i, name in enumerate(label_names, start=1)}
    out = []
    for label in labels:
        text = str(label).strip()
        number = int(text) if is_label_number(text) else known.get(text.lower())
        if number is None or not 1 <= number <= len(label_names):
            have = ", ".join(f"{i} {name}" for i, name in enumerate(label_names, start=1))
            raise ConfigError(f"augment.organ_labels: {text!r} is not a label of this store (it has {have})")
        out.append(str(number))
    return out


def shift_organs(img: np.ndarray, mask: np.ndarray, levels: dict[int, float], sigma: float) -> np.ndarray:
    """``img`` (H,W) or (H,W,C) with each label ``c`` of ``levels`` shifted to mean ``levels[c]``, edges faded."""
    out = img.astype(np.float32, copy=True)
    for label, level in levels.items():
        inside = mask == label
        if not inside.any():
            continue
        weight = inside.astype(np.float32)
        if sigma > 0:   # cv2's default border (reflect 101) is torch's "reflect"
            radius = math.ceil(4 * sigma)
            weight = cv2.GaussianBlur(weight, (2 * radius + 1, 2 * radius + 1), sigma)
        shift = np.float32(level - float(img[inside].mean()))
        out += (weight if img.ndim == 2 else weight[..., None]) * shift
    return out.astype(img.dtype, copy=False)


class OrganContrast(A.ImageOnlyTransform):
    """Every label in the sample's mask (or in ``labels``, if given) shifted to its own uniform level in [low, high]."""

    def __init__(self, low: float = -1.5, high: float = 3.0, sigma: float = 2.0, labels: tuple[int, ...] = (),
                 p: float = 0.5):
        super().__init__(p=p)
        self.low, self.high, self.sigma, self.labels = low, high, sigma, tuple(labels)

    @property
    def targets_as_params(self) -> list[str]:
        """The mask decides which labels get a level."""
        return ["mask"]

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """One level per label present, drawn from the step's seeded RNG in label order."""
        labels = [int(v) for v in np.unique(data["mask"]) if v > 0 and (not self.labels or v in self.labels)]
        return {"organ_mask": data["mask"],
                "levels": {c: self.py_random.uniform(self.low, self.high) for c in labels}}

    def apply(self, img: np.ndarray, organ_mask: np.ndarray | None = None, levels: dict[int, float] | None = None,
              **params: Any) -> np.ndarray:
        """The shifted image, in its dtype."""
        return img if organ_mask is None or not levels else shift_organs(img, organ_mask, levels, self.sigma)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Constructor arguments shown in ``repr`` and serialization."""
        return ("low", "high", "sigma", "labels")


def gaussian_kernel(sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normalized 1-D Gaussian of radius ceil(4·sigma), as cv2.getGaussianKernel gives it."""
    radius = math.ceil(4 * sigma)
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-x * x / (2 * sigma * sigma))
    return (k / k.sum()).to(dtype)


def blur(weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N,H,W) separably blurred with reflected borders."""
    k = gaussian_kernel(sigma, weight.device, weight.dtype)
    r = k.numel() // 2
    x = F.pad(weight[:, None], (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))[:, 0]


def apply_organ_contrast(image: torch.Tensor, mask: torch.Tensor, flag: torch.Tensor, levels: torch.Tensor,
                         sigma: float, labels: tuple[int, ...] = ()) -> torch.Tensor:
    """Each flagged sample's labels (all, or those in ``labels``) shifted to ``levels[:, label - 1]`` (N, MAX_LABELS).

    One host sync per batch.
    """
    top = min(int(mask.max()), levels.shape[1])
    source = image.float()   # every organ's mean is taken before any shift
    out = source
    for label in (c for c in (labels or range(1, top + 1)) if c <= top):
        inside = (mask == label).float()
        count = inside.sum((1, 2))
        mean = (source * inside[:, None]).sum((1, 2, 3)) / (count * image.shape[1]).clamp_min(1)
        shift = torch.where(flag & (count > 0), levels[:, label - 1] - mean, torch.zeros_like(mean))
        weight = blur(inside, sigma) if sigma > 0 else inside
        out = out + weight[:, None] * shift.view(-1, 1, 1, 1)
    return out.to(image.dtype)
