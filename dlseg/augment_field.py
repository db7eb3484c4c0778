"""Bias field: a smooth, random intensity gain across a training sample, as MR coils and field inhomogeneity make.

On MR the same tissue is brighter near a surface coil than far from it: a liver can be bright at the front and
dark at the back of one slice, and its lower slices darker than its upper ones (the volume is normalized as a
whole), which a brightness/contrast change about the mean never shows the model. For a sample drawn (probability
``augment.bias_field``), the image is multiplied by ``exp(f(x, y))``, where ``f`` is a polynomial of degree
:data:`ORDER` in the slice's coordinates (scaled to [-1, 1]), its constant term (the slice's overall gain)
included, each coefficient uniform in ±``augment.bias_field_limit``.

The gain multiplies the *raw* intensity, and samples arrive normalized (``(raw − m) / s``): the image's minimum
stands in for raw zero (the air around the body), so the field is applied as ``lo + (x − lo)·exp(f)`` with ``lo``
the sample's minimum over its channels. Every channel of a 2.5D sample gets the same field (neighbour slices lie
under the same coil).

Both paths (albumentations per sample, torch per batch) compute the same image for the same coefficients; they do
not share random streams.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import albumentations as A
import numpy as np
import torch

ORDER = 3
FIELD_TERMS = [(i, j) for i in range(ORDER + 1) for j in range(ORDER + 1 - i)]   # x^i·y^j, the constant first


@lru_cache(maxsize=8)
def monomial_table(height: int, width: int) -> np.ndarray:
    """(len(FIELD_TERMS), H, W) float32, read-only: every ``x^i·y^j`` of the field on the slice's grid (both paths)."""
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    table = np.stack([(x ** i) * (y ** j) for i, j in FIELD_TERMS])
    table.flags.writeable = False
    return table


def field_numpy(coefficients: np.ndarray, height: int, width: int) -> np.ndarray:
    """``f`` on an (H, W) grid for one sample's coefficients (len(FIELD_TERMS),), float32."""
    return np.tensordot(np.asarray(coefficients, dtype=np.float32), monomial_table(height, width), axes=1)


def apply_field_numpy(img: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """``img`` (H,W) or (H,W,C) under the gain ``exp(f)`` about its minimum, in its dtype."""
    excess = np.expm1(field_numpy(coefficients, img.shape[0], img.shape[1]))    # gain − 1: exactly 0 where f is
    if img.ndim == 3:
        excess = excess[..., None]
    x = img.astype(np.float32)
    return (x + (x - np.float32(img.min())) * excess).astype(img.dtype, copy=False)


class BiasField(A.ImageOnlyTransform):
    """A smooth multiplicative gain ``exp(f(x, y))`` about the image's minimum (see the module)."""

    def __init__(self, limit: float = 0.3, p: float = 0.5):
        super().__init__(p=p)
        self.limit = limit

    def get_params(self) -> dict[str, list[float]]:
        """Draw the polynomial's coefficients from the step's seeded RNG."""
        return {"coefficients": [self.py_random.uniform(-self.limit, self.limit) for _ in FIELD_TERMS]}

    def apply(self, img: np.ndarray, coefficients: tuple[float, ...] = (), **params: Any) -> np.ndarray:
        """The image under the drawn field."""
        return img if not coefficients else apply_field_numpy(img, np.asarray(coefficients, dtype=np.float32))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Constructor arguments shown in ``repr`` and serialization."""
        return ("limit",)


def apply_bias_field(image: torch.Tensor, flag: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Each flagged sample of (N,C,H,W) under its field (``coefficients`` (N, len(FIELD_TERMS))); others unchanged."""
    n, _, h, w = image.shape
    table = torch.tensor(monomial_table(h, w), device=image.device)   # a copy: the cached table stays read-only
    field = torch.einsum("nt,thw->nhw", coefficients.float(), table)
    excess = torch.where(flag.view(-1, 1, 1), field.expm1(), torch.zeros_like(field))[:, None]   # gain − 1
    source = image.float()
    lo = source.reshape(n, -1).amin(1).view(-1, 1, 1, 1)
    return (source + (source - lo) * excess).to(image.dtype)
