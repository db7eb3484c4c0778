"""Intensity remap: the sample's intensities through a random, non-monotone curve (``augment.remap``, off by default).

Not in the article. The sample's intensity range [min, max] (all its channels together) is mapped through a
random piecewise-linear curve through ``remap_points`` equally spaced knots whose values are uniform in the same
range: not monotone, so tissues may swap their order of brightness. It makes a model lean on shape and position
rather than on one scanner's contrast (in the spirit of the random intensity networks of Ouyang et al.,
"Causality-inspired single-source domain generalization", 2021), for example when an organ's signal is abnormal
(iron overload darkens liver and spleen on T2).

Both paths (albumentations per sample, torch per batch) draw the same distribution; they do not share random
streams.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
import torch


class IntensityRemap(A.ImageOnlyTransform):
    """The image's [min, max] through a random piecewise-linear curve (knot values uniform in that range)."""

    def __init__(self, points: int = 5, p: float = 0.5):
        super().__init__(p=p)
        self.points = points

    def get_params(self) -> dict[str, list[float]]:
        """Draw the knot values, as fractions of the range, from the step's seeded RNG."""
        return {"knots": [self.py_random.random() for _ in range(self.points)]}

    def apply(self, img: np.ndarray, knots: tuple[float, ...] = (0.0, 1.0), **params: Any) -> np.ndarray:
        """Every channel through the same curve, in the image's dtype."""
        lo, hi = float(img.min()), float(img.max())
        if hi <= lo:
            return img
        grid = np.linspace(lo, hi, len(knots))
        return np.interp(img, grid, lo + np.asarray(knots) * (hi - lo)).astype(img.dtype, copy=False)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Constructor arguments shown in ``repr`` and serialization."""
        return ("points",)


def apply_remap(image: torch.Tensor, flag: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """Each flagged sample's [min, max] (over its channels) through its piecewise-linear curve ``knots`` (N, K)."""
    n, k = knots.shape
    flat = image.reshape(n, -1).float()
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    t = (flat - lo) / (hi - lo).clamp_min(1e-12) * (k - 1)          # position on the knot grid, 0..K-1
    left = t.floor().clamp(0, k - 2)
    frac = t - left
    left = left.long()
    y = torch.gather(knots, 1, left) * (1 - frac) + torch.gather(knots, 1, left + 1) * frac
    out = torch.where(flag.view(-1, 1) & (hi > lo), lo + y * (hi - lo), flat)
    return out.to(image.dtype).view_as(image)
