"""Test-time augmentation over the transforms the model was trained with, and no others.

The exported model records in ``invariances`` the geometric transforms its training drew (``augment.invariances``:
the square's symmetries ``hflip``, ``vflip``, ``transpose``, ``rotate90``, and the small ``rotate`` and ``scale``
whose limits ``invariance_limits`` holds). The symmetry views are the group those generate among the 8 symmetries
of the square (hflip alone: identity and hflip; hflip + vflip: the 4 flips; with a transpose or rotation: all 8).
Each small transform adds two views, halfway to its training limit each way (±7.5° for ``rotate_limit`` 15, zooms
×0.925 and ×1.075 for ``scale_limit`` 0.15), taken of the unflipped image. A model trained without any gets no
TTA: on an abdominal slice a flipped liver lies where the spleen is, and a model never shown that image averages
in a wrong answer.

Every view maps its probabilities back by the inverse before averaging; where a turned or zoomed view did not see
a pixel (it lay outside the view's canvas), that view is left out of the pixel's mean.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dlseg.errors import ModelError

SYMMETRIES = ("hflip", "vflip", "transpose", "rotate90")
SMALL = ("rotate", "scale")              # drawn within a limit: views at half of it, each way
KNOWN = SYMMETRIES + SMALL
VIEW_FRACTION = 0.5                      # small views sit this far towards the training limit


class View(NamedTuple):
    """One symmetry of the square: transpose the last two axes (or not), then flip ``dims``."""

    transpose: bool
    dims: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The view of a (…, H, W) batch (H == W when transposing)."""
        y = x.transpose(-2, -1) if self.transpose else x
        return torch.flip(y, self.dims) if self.dims else y

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Back from the view: flips first, then the transpose."""
        y = torch.flip(y, self.dims) if self.dims else y
        return y.transpose(-2, -1) if self.transpose else y

    def coverage(self, y: torch.Tensor) -> torch.Tensor | None:
        """Every pixel is seen by a symmetry (None: weight 1 everywhere)."""
        return None


class AffineView(NamedTuple):
    """A turn by ``degrees`` (counter-clockwise as displayed) and a zoom by ``zoom`` (> 1 enlarges), about the centre.

    Images bilinear with edge pixels replicated, as the training augmentation resamples; square (…, S, S) batches.
    """

    degrees: float
    zoom: float

    def _theta(self, inverse: bool) -> torch.Tensor:
        """2×3 ``affine_grid`` matrix: output position → source position, in normalized coordinates."""
        a = math.radians(self.degrees)
        c, s = math.cos(a), math.sin(a)
        # rows point down, so a displayed counter-clockwise turn reads the source at R(-a) in image coordinates
        m = torch.tensor([[c, -s], [s, c]], dtype=torch.float64) / self.zoom
        if inverse:
            m = torch.linalg.inv(m)
        return torch.cat([m, torch.zeros(2, 1, dtype=torch.float64)], dim=1)

    def _sample(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        theta = self._theta(inverse).to(device=x.device, dtype=torch.float32).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The turned and zoomed view of an (N, C, S, S) batch."""
        return self._sample(x, inverse=False)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Back from the view (pixels the view never saw read its edge; :meth:`coverage` leaves them out)."""
        return self._sample(y, inverse=True)

    def coverage(self, y: torch.Tensor) -> torch.Tensor:
        """(1, 1, S, S) float: 1 where the pixel lay inside the view's canvas, 0 where the view did not see it."""
        theta = self._theta(inverse=True).to(device=y.device, dtype=torch.float32)[None]
        grid = F.affine_grid(theta, [1, 1, *y.shape[-2:]], align_corners=False)
        inside = (grid.abs() <= 1.0).all(dim=-1)
        return inside.to(y.dtype)[:, None]


IDENTITY = View(False, ())
ALL_VIEWS = [View(t, d) for t, d in itertools.product((False, True), ((), (-1,), (-2,), (-2, -1)))]
_GENERATORS = {"hflip": lambda a: a[:, ::-1], "vflip": lambda a: a[::-1, :], "transpose": lambda a: a.T,
               "rotate90": lambda a: np.rot90(a)}


def _as_view(a: np.ndarray, ref: np.ndarray) -> View:
    """The canonical view that maps ``ref`` to ``a``."""
    for v in ALL_VIEWS:
        if np.array_equal(v.forward(torch.from_numpy(ref)).numpy(), a):
            return v
    raise AssertionError("not a symmetry of the square")


def symmetry_views(invariances: list[str]) -> list[View]:
    """The group the named symmetries generate, identity first, in a fixed order (other names ignored)."""
    names = [n for n in invariances if n in SYMMETRIES]
    ref = np.arange(16).reshape(4, 4)
    seen = {ref.tobytes(): ref}
    frontier = [ref]
    while frontier:
        nxt = []
        for a in frontier:
            for name in names:
                b = np.ascontiguousarray(_GENERATORS[name](a))
                if b.tobytes() not in seen:
                    seen[b.tobytes()] = b
                    nxt.append(b)
        frontier = nxt
    found = {_as_view(a, ref) for a in seen.values()}
    return [v for v in ALL_VIEWS if v in found]


def small_views(invariances: list[str], limits: dict[str, float]) -> list[AffineView]:
    """Two views per small transform trained with: ``±VIEW_FRACTION·limit`` degrees, zoom ``1 ± VIEW_FRACTION·limit``."""
    views = []
    if "rotate" in invariances:
        d = VIEW_FRACTION * float(limits["rotate"])
        views += [AffineView(d, 1.0), AffineView(-d, 1.0)]
    if "scale" in invariances:
        z = VIEW_FRACTION * float(limits["scale"])
        views += [AffineView(0.0, 1.0 - z), AffineView(0.0, 1.0 + z)]
    return views


def views_for(invariances: list[str], limits: dict[str, float] | None = None) -> list[View | AffineView]:
    """Every view ``--tta`` averages: the symmetry group (identity first), then the small views."""
    return [*symmetry_views(invariances), *small_views(invariances, limits or {})]


def _checked_limits(meta: dict[str, Any], inv: list[str], where: str) -> dict[str, float]:
    """``invariance_limits`` for the small transforms in ``inv``; ModelError when one is missing or out of range."""
    limits = meta.get("invariance_limits", {})
    for name in (n for n in inv if n in SMALL):
        value = limits.get(name) if isinstance(limits, dict) else None
        bound = 90.0 if name == "rotate" else 0.9
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= bound:
            raise ModelError(f"{where}: invariance_limits[{name!r}] = {value!r}: expected a number in (0, {bound}]")
    return {n: float(limits[n]) for n in inv if n in SMALL}


def tta_views(meta: dict[str, Any], where: str = "model.json") -> list[View | AffineView]:
    """The views ``--tta`` averages for a model; ModelError (one line, exit 2) when it may not use any."""
    if "invariances" not in meta:
        raise ModelError(f"{where}: --tta refused: this model does not record which flips/rotations it was trained "
                         "with (exported by an older dlseg); predict without --tta, or retrain to record them")
    inv = meta["invariances"]
    if not isinstance(inv, list) or any(name not in KNOWN for name in inv):
        raise ModelError(f"{where}: invariances {inv!r}: expected a list of {', '.join(KNOWN)}")
    if not inv:
        raise ModelError(f"{where}: --tta refused: the model was trained without flips, transposes, rotations or "
                         "zooms, so every augmented view would mislead it; predict without --tta")
    return views_for(inv, _checked_limits(meta, inv, where))


def tta_text(meta: dict[str, Any], where: str = "model.json") -> str:
    """The line ``--tta`` prints for a model, from its ``model.json`` alone (ModelError when TTA is refused)."""
    return describe(meta["invariances"], tta_views(meta, where), meta.get("invariance_limits"))


def describe(invariances: list[str], views: list[View | AffineView], limits: dict[str, float] | None = None) -> str:
    """``TTA: hflip, vflip (4 views, …)``; small transforms with their views, e.g. ``rotate ±7.5°``."""
    limits = limits or {}
    names = []
    for name in invariances:
        if name == "rotate" and "rotate" in limits:
            names.append(f"rotate ±{VIEW_FRACTION * limits['rotate']:g}°")
        elif name == "scale" and "scale" in limits:
            z = VIEW_FRACTION * limits["scale"]
            names.append(f"zoom ×{1 - z:g}/×{1 + z:g}")
        else:
            names.append(name)
    return f"TTA: {', '.join(names)} ({len(views)} views, the transforms the model was trained with)"
