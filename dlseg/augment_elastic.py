"""Elastic deformation: a smooth random warp of a training sample, the U-Net paper's augmentation.

With a handful of training patients, organs differ between patients in ways no rotation or zoom shows: the lower
tip of one liver is long and thin, another's is short. For a sample drawn (probability ``augment.elastic``), random
displacement vectors on a coarse ``elastic_grid`` × ``elastic_grid`` grid of control points spanning the slice
(corners included) are drawn from a Gaussian of ``elastic_std`` (a fraction of the slice's side, clipped at
:data:`CLIP` standard deviations) and interpolated bicubically to every pixel, as Ronneberger et al. (2015) describe
("random displacement vectors on a coarse 3 by 3 grid ... per-pixel displacements are then computed using bicubic
interpolation"). :func:`check_smooth` refuses settings whose warp could fold the slice over itself. Image bilinear,
mask nearest-neighbour, edges replicated, as for the rotation (``dlseg.augment_rotate``).

Both paths compute the same sampling positions from the same control displacements (torch's bicubic interpolation
with ``align_corners=True``; the per-sample path then calls ``cv2.remap``, the batch path ``grid_sample``); they do
not share random streams.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from dlseg.errors import ConfigError
from dlseg.resample import warp_samples

CLIP = 3.0           # control displacements are clipped at this many standard deviations
OVERSHOOT = 1.25     # bicubic interpolation can exceed the largest control difference by up to this factor


def check_smooth(std: float, grid: int) -> None:
    """ConfigError unless the warp keeps the pixels' order: neighbouring control points, 1 / (grid − 1) of the side
    apart, never move towards each other by as much as that distance."""
    if not 2 <= grid <= 32:
        raise ConfigError(f"augment.elastic_grid: control points per side within [2, 32], got {grid!r}")
    if std < 0 or 2 * CLIP * OVERSHOOT * std * (grid - 1) >= 1:
        raise ConfigError(f"augment.elastic_std: must be >= 0 and below {1 / (2 * CLIP * OVERSHOOT * (grid - 1)):.4f} "
                          f"for a {grid}×{grid} grid (a larger one could fold the slice), got {std!r}")


def draw_controls(normal: np.ndarray | torch.Tensor, std: float) -> np.ndarray | torch.Tensor:
    """Control displacements (fractions of the side) from standard normal draws: scaled and clipped."""
    return normal.clip(-CLIP, CLIP) * std


def displacement(controls: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 2, H, W) per-pixel displacement in pixels (x then y) from (N, 2, g, g) control displacements."""
    field = F.interpolate(controls.float(), size=(height, width), mode="bicubic", align_corners=True)
    side = torch.tensor([width, height], dtype=field.dtype, device=field.device).view(1, 2, 1, 1)
    return field * side


def source_positions(controls: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) x and y pixel positions each output pixel reads (pixel centres at integers)."""
    d = displacement(controls, height, width)
    ys = torch.arange(height, device=d.device, dtype=d.dtype).view(1, -1, 1)
    xs = torch.arange(width, device=d.device, dtype=d.dtype).view(1, 1, -1)
    return xs + d[:, 0], ys + d[:, 1]


class ElasticWarp(A.DualTransform):
    """The per-sample step: a smooth warp from Gaussian control displacements (see the module)."""

    def __init__(self, std: float = 0.02, grid: int = 3, p: float = 0.5):
        super().__init__(p=p)
        check_smooth(std, grid)
        self.std, self.grid = std, grid

    def get_params(self) -> dict[str, np.ndarray]:
        """Draw the control displacements from the step's seeded generator."""
        normal = self.random_generator.standard_normal((2, self.grid, self.grid))
        return {"controls": draw_controls(normal, self.std).astype(np.float32)}

    def _remap(self, img: np.ndarray, controls: np.ndarray | None, interpolation: int) -> np.ndarray:
        if controls is None:
            return img
        x, y = source_positions(torch.from_numpy(controls)[None], img.shape[0], img.shape[1])
        out = cv2.remap(img, x[0].numpy(), y[0].numpy(), interpolation, borderMode=cv2.BORDER_REPLICATE)
        return out.reshape(img.shape)   # cv2 drops a single channel's axis

    def apply(self, img: np.ndarray, controls: np.ndarray | None = None, **params: Any) -> np.ndarray:
        """The warped image, bilinear."""
        return self._remap(img, controls, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, controls: np.ndarray | None = None, **params: Any) -> np.ndarray:
        """The warped mask, nearest-neighbour."""
        return self._remap(mask, controls, cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Constructor arguments shown in ``repr`` and serialization."""
        return ("std", "grid")


def apply_elastic(image: torch.Tensor, mask: torch.Tensor, flag: torch.Tensor,
                  controls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each flagged sample of (N,C,H,W) image and (N,H,W) mask warped by its (2, g, g) controls; others unchanged."""
    idx = torch.nonzero(flag).flatten()   # one host sync; only the drawn samples are resampled
    if idx.numel() == 0:
        return image, mask
    x, y = source_positions(controls[idx].to(image.device), *image.shape[-2:])
    return warp_samples(image, mask, idx, x, y)
