"""The article's augmentation set, per sample with albumentations (CPU, in loader workers) or per batch with torch.

Transforms, in the article's order, each applied independently with its own probability (``AugmentConfig``):
horizontal flip, vertical flip, transpose, random scale ±``scale_limit``, random rotation by k·90°
(k uniform in 0..3, as albumentations' RandomRotate90), random brightness/contrast; then, off unless asked for, a
small rotation (``dlseg.augment_rotate``) and an elastic warp (``dlseg.augment_elastic``), both applied before
brightness/contrast, a random intensity remap
(``dlseg.augment_remap``), organ contrast (``dlseg.augment_organs``) and a bias field (``dlseg.augment_field``).

Two deliberate departures from the article's albumentations 0.x code:

* **Scale keeps the canvas.** ``RandomScale`` changes the image size, so samples no longer batch. We use an
  isotropic zoom about the centre on the same canvas (``A.Affine(scale=(1-l, 1+l), keep_ratio=True)`` on the CPU,
  on a batch the same sampling positions as ``affine_grid``/``grid_sample``, computed separably); zooming out
  replicates the edge pixels (cv2.BORDER_REPLICATE / ``padding_mode="border"``). Image bilinear, mask
  nearest-neighbour, same geometry.
* **Brightness/contrast act on normalized values.** Inputs are z-scored MR or windowed CT in about [-1, 1], not
  [0, 1] images; albumentations' RandomBrightnessContrast clips float images to [0, 1], which would destroy them.
  Here ``x -> x * (1 + c) + b`` with ``c ~ U(±contrast_limit)``, ``b ~ U(±brightness_limit)`` in normalized units and
  no clipping: "brightness ±0.2" shifts intensities by up to 0.2 standard deviations (MR) or a tenth of the CT
  window's half-width; contrast scales about 0 (the body mean for MR, the window centre for CT). This is
  albumentations' formula for a [0, 1] image (brightness_by_max) without the clip.

Both paths draw the same distributions; they do not reproduce each other's random streams.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import albumentations as A
import numpy as np
import torch

from dlseg.augment_elastic import ElasticWarp, apply_elastic, check_smooth, draw_controls
from dlseg.augment_field import FIELD_TERMS, BiasField, apply_bias_field
from dlseg.augment_organs import (
    MAX_LABELS, OrganContrast, apply_organ_contrast, is_label_number, organ_label_ids, resolve_organ_labels,
)
from dlseg.augment_remap import IntensityRemap, apply_remap
from dlseg.augment_rotate import AFFINE_RESAMPLING, MAX_DEGREES, apply_rotation, rotation_step
from dlseg.config import option
from dlseg.resample import Workspace, compose_dihedral, resample


@dataclass
class AugmentConfig:
    """Training augmentation: each transform's probability (the article's values) and magnitudes."""

    enabled: bool = option("augment training samples", True)
    hflip: float = option("probability of a horizontal flip", 0.8)
    vflip: float = option("probability of a vertical flip", 0.8)
    transpose: float = option("probability of a transpose", 0.8)
    scale: float = option("probability of a zoom about the centre", 0.5)
    scale_limit: float = option("zoom factor drawn from [1 - l, 1 + l]", 0.1)
    rotate90: float = option("probability of a rotation by k·90°", 0.8)
    rotate: float = option("probability of a rotation by a small random angle, organs kept on their side (0: never)",
                           0.0)
    rotate_limit: float = option("rotation angle drawn from ±l degrees", 15.0)
    elastic: float = option("probability of a smooth random warp, the U-Net paper's elastic deformation (0: never)", 0.0)
    elastic_std: float = option("std of the warp's control displacements, as a fraction of the slice side", 0.02)
    elastic_grid: int = option("control points per side of the warp's coarse grid (corners included)", 3)
    brightness_contrast: float = option("probability of a brightness/contrast change", 0.8)
    brightness_limit: float = option("additive shift within ±l, in normalized intensity units", 0.2)
    contrast_limit: float = option("multiplicative factor within [1 - l, 1 + l]", 0.2)
    remap: float = option("probability of a random, non-monotone intensity curve (0: never)", 0.0)
    remap_points: int = option("knots of the intensity curve (2: a random linear map, maybe inverted)", 5)
    organ_contrast: float = option("probability of moving labelled organs to their own random levels (0: never)", 0.0)
    organ_labels: list[str] = option("labels organ contrast moves, by name or number, e.g. liver,spleen (empty: all)",
                                     default_factory=list)
    organ_low: float = option("lowest organ level, in normalized intensity units", -1.5)
    organ_high: float = option("highest organ level, in normalized intensity units", 3.0)
    organ_sigma: float = option("pixels over which an organ's shift fades out at its border", 2.0)
    bias_field: float = option("probability of a smooth random gain across the slice, as MR coils make (0: never)", 0.0)
    bias_field_limit: float = option("each coefficient of the gain's log-polynomial within ±l", 0.3)


PROBABILITY_KEYS = ("hflip", "vflip", "transpose", "scale", "rotate90", "rotate", "elastic", "brightness_contrast",
                    "remap", "organ_contrast", "bias_field")


def check_config(cfg: AugmentConfig) -> None:
    """ValueError naming the key for a probability outside [0, 1] or a limit outside [0, 1)."""
    for key in PROBABILITY_KEYS:
        value = getattr(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"augment.{key}: probability must be within [0, 1], got {value!r}")
    for key in ("scale_limit", "brightness_limit", "contrast_limit", "bias_field_limit"):
        value = getattr(cfg, key)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"augment.{key}: must be within [0, 1), got {value!r}")
    if not 0.0 <= cfg.rotate_limit <= MAX_DEGREES:
        raise ValueError(f"augment.rotate_limit: degrees within [0, {MAX_DEGREES:g}], got {cfg.rotate_limit!r}")
    check_smooth(cfg.elastic_std, cfg.elastic_grid)
    if cfg.remap_points < 2:
        raise ValueError(f"augment.remap_points: need at least 2 knots, got {cfg.remap_points!r}")
    if not cfg.organ_low < cfg.organ_high or cfg.organ_sigma < 0:
        raise ValueError(f"augment.organ_low/organ_high/organ_sigma: need low < high and sigma >= 0, got "
                         f"{cfg.organ_low!r}, {cfg.organ_high!r}, {cfg.organ_sigma!r}")
    organ_label_ids([c for c in cfg.organ_labels if is_label_number(c)])   # names: resolved against a store later


def for_store_labels(cfg: AugmentConfig, label_names: list[str]) -> AugmentConfig:
    """``cfg`` with the names in ``organ_labels`` as the numbers of a store whose labels are ``label_names``."""
    return replace(cfg, organ_labels=resolve_organ_labels(cfg.organ_labels, label_names))


GEOMETRIC_KEYS = ("hflip", "vflip", "transpose", "rotate90", "rotate", "scale")
LIMIT_KEYS = {"rotate": "rotate_limit", "scale": "scale_limit"}   # small transforms: drawn within a limit


def invariances(cfg: AugmentConfig) -> list[str]:
    """The geometric transforms training drew (probability > 0): what test-time augmentation may average over."""
    return [key for key in GEOMETRIC_KEYS
            if cfg.enabled and getattr(cfg, key) > 0 and getattr(cfg, LIMIT_KEYS.get(key, key)) > 0]


def invariance_limits(cfg: AugmentConfig) -> dict[str, float]:
    """The limits the small transforms among :func:`invariances` were drawn within (degrees; zoom fraction)."""
    return {key: float(getattr(cfg, LIMIT_KEYS[key])) for key in invariances(cfg) if key in LIMIT_KEYS}


# --------------------------------------------------------------------------------------------------------------
# Per sample: albumentations


class NormalizedBrightnessContrast(A.ImageOnlyTransform):
    """``x * (1 + c) + b`` on normalized float images, no clipping (c, b uniform within ±limits)."""

    def __init__(self, brightness_limit: float = 0.2, contrast_limit: float = 0.2, p: float = 0.5):
        super().__init__(p=p)
        self.brightness_limit = brightness_limit
        self.contrast_limit = contrast_limit

    def get_params(self) -> dict[str, float]:
        """Draw the contrast factor ``alpha`` and the brightness offset ``beta`` from the step's seeded RNG."""
        return {"alpha": 1.0 + self.py_random.uniform(-self.contrast_limit, self.contrast_limit),
                "beta": self.py_random.uniform(-self.brightness_limit, self.brightness_limit)}

    def apply(self, img: np.ndarray, alpha: float = 1.0, beta: float = 0.0, **params: Any) -> np.ndarray:
        """``img * alpha + beta`` in the image's dtype."""
        return (img * np.float32(alpha) + np.float32(beta)).astype(img.dtype, copy=False)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Constructor arguments shown in ``repr`` and serialization."""
        return ("brightness_limit", "contrast_limit")


def build_cpu_transform(cfg: AugmentConfig, seed: int | None = None) -> A.Compose:
    """One-sample transform: ``t(image=float32 (H,W) or (H,W,C), mask=uint8 (H,W))``; square slices expected.

    Deterministic for a given ``seed``. Loader workers receive copies of the same RNG state, so each worker (or each
    sample, for order-independent results) must reseed with :func:`seed_transform`.
    Disabled config → an empty Compose (identity).
    """
    check_config(cfg)
    steps: list[A.BasicTransform] = []
    if cfg.enabled:
        lim = cfg.scale_limit
        steps = [
            A.HorizontalFlip(p=cfg.hflip),
            A.VerticalFlip(p=cfg.vflip),
            A.Transpose(p=cfg.transpose),
            # RandomScale would change the size (no batching): zoom on the same canvas instead.
            A.Affine(scale=(1 - lim, 1 + lim), keep_ratio=True, **AFFINE_RESAMPLING, p=cfg.scale),
            A.RandomRotate90(p=cfg.rotate90),
        ]
        if cfg.rotate > 0:   # only when asked for, like every step not in the article
            steps.append(rotation_step(cfg.rotate_limit, cfg.rotate))
        if cfg.elastic > 0:
            steps.append(ElasticWarp(cfg.elastic_std, cfg.elastic_grid, p=cfg.elastic))
        steps.append(NormalizedBrightnessContrast(cfg.brightness_limit, cfg.contrast_limit, p=cfg.brightness_contrast))
        if cfg.remap > 0:   # only when asked for: the article's random streams stay as they were
            steps.append(IntensityRemap(cfg.remap_points, p=cfg.remap))
        if cfg.organ_contrast > 0:
            labels = organ_label_ids(cfg.organ_labels)
            steps.append(OrganContrast(cfg.organ_low, cfg.organ_high, cfg.organ_sigma, labels, p=cfg.organ_contrast))
        if cfg.bias_field > 0:
            steps.append(BiasField(cfg.bias_field_limit, p=cfg.bias_field))
    transform = A.Compose(steps)
    seed_transform(transform, seed)
    return transform


class SampleTransform:
    """The per-sample training transform as ``dlseg.data`` calls it: ``t(image, mask) -> (image, mask)``.

    Wraps :func:`build_cpu_transform` (albumentations takes named arguments and returns a dict) and has the
    ``set_random_seed(seed)`` the dataset calls before each sample (``dlseg.data.SeededTransform``), which reseeds
    through :func:`seed_transform`. Picklable, for loader worker processes.
    """

    def __init__(self, cfg: AugmentConfig, seed: int | None = None):
        self.compose = build_cpu_transform(cfg, seed=seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Augmented (image, mask): float32 (H,W) or (H,W,C) and uint8 (H,W), same size."""
        out = self.compose(image=image, mask=mask)
        return out["image"], out["mask"]

    def set_random_seed(self, seed: int | None) -> None:
        """Reseed every step from one generator pair (see :func:`seed_transform`)."""
        seed_transform(self.compose, seed)


def seed_transform(transform: A.Compose, seed: int | None) -> None:
    """Seed every step from ONE shared generator pair.

    albumentations 2.0.8's ``Compose(seed=s)`` / ``set_random_seed(s)`` give every step its own generator seeded
    with the same ``s``, so steps with equal probabilities make identical decisions (hflip ⇔ vflip ⇔ transpose).
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


# --------------------------------------------------------------------------------------------------------------
# Per batch: torch, on the batch's device


@dataclass
class AugmentParams:
    """Per-sample draws for one batch (all tensors of length N on the batch's device)."""

    hflip: torch.Tensor        # bool
    vflip: torch.Tensor        # bool
    transpose: torch.Tensor    # bool
    scale: torch.Tensor        # bool: zoom applied
    zoom: torch.Tensor         # float32 zoom factor (>1 enlarges the content)
    rotate90: torch.Tensor     # bool
    quarter_turns: torch.Tensor  # int64 in 0..3 (counter-clockwise, like np.rot90)
    brightness_contrast: torch.Tensor  # bool
    contrast: torch.Tensor     # float32 factor 1 + c
    brightness: torch.Tensor   # float32 offset b
    rotate: torch.Tensor | None = None   # bool: small rotation applied
    angle: torch.Tensor | None = None    # float32 degrees, counter-clockwise as displayed
    elastic: torch.Tensor | None = None  # bool: elastic warp applied
    controls: torch.Tensor | None = None  # float32 (N, 2, g, g): control displacements, fractions of the side
    remap: torch.Tensor | None = None   # bool: intensity curve applied
    knots: torch.Tensor | None = None   # float32 (N, remap_points): curve values as fractions of the range
    organ_contrast: torch.Tensor | None = None   # bool: organ levels applied
    organ_levels: torch.Tensor | None = None     # float32 (N, MAX_LABELS): level of label c in column c - 1
    bias_field: torch.Tensor | None = None       # bool: gain field applied
    field_coefficients: torch.Tensor | None = None   # float32 (N, len(FIELD_TERMS)): the field's polynomial


class BatchAugment:
    """The same transform set on whole batches: ``image`` (N,C,H,W) float, ``mask`` (N,H,W) integer, any device.

    Each transform is decided per sample with its probability. Flips, transpose and rotations are composed per
    sample into one element of the square's symmetry group (a transpose and/or flips); the zoom (about the centre)
    and the intensity change commute with them, so applying them afterwards gives the same distribution as the
    article's order. Symmetry and zoom become one source-pixel index per output pixel and sample: the mask (and
    every unzoomed image) is one gather; zoomed images blend four gathers bilinearly at the same positions the mask
    samples (nearest). One host sync per batch (which samples are zoomed); no Python loop over samples. A small
    rotation and an elastic warp, when asked for, each resample their drawn samples once more (``grid_sample``; one
    more host sync each).
    """

    def __init__(self, cfg: AugmentConfig):
        check_config(cfg)
        self.cfg = cfg
        self.organ_labels = organ_label_ids(cfg.organ_labels) if cfg.organ_contrast > 0 else ()
        self.workspace = Workspace()   # intermediates reused between batches (see resample)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented (image, mask); ``generator`` (on the batch's device) makes it reproducible."""
        if not self.cfg.enabled:
            return image, mask
        return self.apply(image, mask, self.sample(image.shape[0], image.device, generator))

    def sample(self, n: int, device: torch.device | str, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw every sample's decisions and magnitudes (a fixed number of draws, whatever the config).

        Columns of one (n, 9) uniform draw: six decisions against their probabilities, then zoom, contrast and
        brightness as ``offset + (2u - 1) * limit``; a handful of tensor ops for the whole batch.
        """
        u = torch.rand((n, 9), generator=generator, device=device)
        k = torch.randint(0, 4, (n,), generator=generator, device=device)
        probs, limits, offsets = self._constants(u.device)
        decide = u[:, :6] < probs
        hflip, vflip, transpose, scale, rotate90, bc = decide.unbind(1)
        zoom, contrast, brightness = ((2 * u[:, 6:] - 1) * limits + offsets).unbind(1)
        params = AugmentParams(hflip=hflip, vflip=vflip, transpose=transpose, scale=scale, zoom=zoom,
                               rotate90=rotate90, quarter_turns=k, brightness_contrast=bc, contrast=contrast,
                               brightness=brightness)
        if self.cfg.rotate > 0:
            r = torch.rand((n, 2), generator=generator, device=device)
            params.rotate, params.angle = r[:, 0] < self.cfg.rotate, (2 * r[:, 1] - 1) * self.cfg.rotate_limit
        if self.cfg.elastic > 0:
            g = self.cfg.elastic_grid
            params.elastic = torch.rand((n,), generator=generator, device=device) < self.cfg.elastic
            params.controls = draw_controls(torch.randn((n, 2, g, g), generator=generator, device=device),
                                            self.cfg.elastic_std)
        if self.cfg.remap > 0:
            r = torch.rand((n, 1 + self.cfg.remap_points), generator=generator, device=device)
            params.remap, params.knots = r[:, 0] < self.cfg.remap, r[:, 1:]
        if self.cfg.organ_contrast > 0:
            r = torch.rand((n, 1 + MAX_LABELS), generator=generator, device=device)
            span = self.cfg.organ_high - self.cfg.organ_low
            params.organ_contrast = r[:, 0] < self.cfg.organ_contrast
            params.organ_levels = self.cfg.organ_low + r[:, 1:] * span
        if self.cfg.bias_field > 0:
            r = torch.rand((n, 1 + len(FIELD_TERMS)), generator=generator, device=device)
            params.bias_field = r[:, 0] < self.cfg.bias_field
            params.field_coefficients = (2 * r[:, 1:] - 1) * self.cfg.bias_field_limit
        return params

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities, limits, offsets) as float32 tensors on ``device``, made once per device."""
        key = f"constants:{device}"
        if key not in self.workspace.buffers:
            cfg = self.cfg
            rows = [[cfg.hflip, cfg.vflip, cfg.transpose, cfg.scale, cfg.rotate90, cfg.brightness_contrast],
                    [cfg.scale_limit, cfg.contrast_limit, cfg.brightness_limit], [1.0, 1.0, 0.0]]
            self.workspace.buffers[key] = tuple(torch.tensor(r, dtype=torch.float32, device=device) for r in rows)
        return self.workspace.buffers[key]

    def apply(self, image: torch.Tensor, mask: torch.Tensor, params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply drawn parameters to a batch."""
        check_batch(image, mask, square=self.cfg.transpose > 0 or self.cfg.rotate90 > 0)
        cfg = self.cfg
        symmetric = cfg.hflip > 0 or cfg.vflip > 0 or cfg.transpose > 0 or cfg.rotate90 > 0
        if symmetric or cfg.scale > 0:
            t, r, c = compose_dihedral(params.hflip, params.vflip, params.transpose, params.rotate90,
                                       params.quarter_turns)
            if not (cfg.transpose > 0 or cfg.rotate90 > 0):
                t = torch.zeros_like(t)
            flag = params.scale if cfg.scale > 0 else torch.zeros_like(params.scale)
            image, mask = resample(image, mask, t, r, c, flag, params.zoom, self.workspace)
        if cfg.rotate > 0 and params.rotate is not None:
            image, mask = apply_rotation(image, mask, params.rotate, params.angle)
        if cfg.elastic > 0 and params.elastic is not None:
            image, mask = apply_elastic(image, mask, params.elastic, params.controls)
        if cfg.brightness_contrast > 0:
            image = apply_intensity(image, params.brightness_contrast, params.contrast, params.brightness,
                                    in_place=symmetric or cfg.scale > 0)   # resample's output is ours
        if cfg.remap > 0 and params.remap is not None:
            image = apply_remap(image, params.remap, params.knots)
        if cfg.organ_contrast > 0 and params.organ_contrast is not None:
            image = apply_organ_contrast(image, mask, params.organ_contrast, params.organ_levels, cfg.organ_sigma,
                                         self.organ_labels)
        if cfg.bias_field > 0 and params.bias_field is not None:
            image = apply_bias_field(image, params.bias_field, params.field_coefficients)
        return image, mask


def check_batch(image: torch.Tensor, mask: torch.Tensor, square: bool) -> None:
    """ValueError unless image is (N,C,H,W) float, mask (N,H,W) integer, and H == W when ``square``."""
    if image.dim() != 4 or not image.is_floating_point():
        raise ValueError(f"batch augmentation expects a float image batch (N,C,H,W), got {image.dtype} "
                         f"{tuple(image.shape)}")
    if mask.shape != image.shape[:1] + image.shape[2:] or mask.is_floating_point():
        raise ValueError(f"batch augmentation expects an integer mask batch (N,H,W) matching the image "
                         f"{tuple(image.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if square and image.shape[-2] != image.shape[-1]:
        raise ValueError(f"transpose/rotate90 need square slices, got {image.shape[-2]}x{image.shape[-1]} "
                         f"(set augment.transpose and augment.rotate90 to 0 for non-square inputs)")


def apply_intensity(image: torch.Tensor, flag: torch.Tensor, contrast: torch.Tensor,
                    brightness: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """``x * (1 + c) + b`` per sample where ``flag`` (identity elsewhere), in the image's dtype."""
    a = torch.where(flag, contrast, torch.ones_like(contrast)).to(image.dtype).view(-1, 1, 1, 1)
    b = torch.where(flag, brightness, torch.zeros_like(brightness)).to(image.dtype).view(-1, 1, 1, 1)
    # in place when the batch is already a fresh tensor; cheaper on a CPU than addcmul with a broadcast offset
    return (image.mul_(a) if in_place else image * a).add_(b)
