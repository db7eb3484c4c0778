"""Small rotations: a random in-plane angle within ±``augment.rotate_limit`` degrees, about the slice's centre.

Patients lie a little turned on the table, and one abdomen is not another's rotated copy by quarter turns: the
quarter turns and flips of the article's set put the liver where the spleen is, so recipes for anatomy whose sides
matter turn them off and are left with no geometric variety but a zoom. A rotation by a few degrees keeps every
organ on its side and is what nnU-Net draws by default. Image bilinear, mask nearest-neighbour, same geometry;
corners that come from outside the slice replicate its edge pixels (``cv2.BORDER_REPLICATE`` on the CPU,
``padding_mode="border"`` on a batch).

A positive angle turns the content counter-clockwise as the slice is displayed (rows down), on both paths, which
compute the same sampling positions (pixel centres, rotation about ``((W - 1) / 2, (H - 1) / 2)``); they do not
share random streams.
"""

from __future__ import annotations

import albumentations as A
import cv2
import torch

from dlseg.resample import warp_samples

MAX_DEGREES = 90.0   # the largest rotate_limit accepted: beyond a right angle it is no longer a small rotation
# how every geometric step of the per-sample path resamples (the zoom too): image bilinear, mask nearest, edges kept
AFFINE_RESAMPLING = {"interpolation": cv2.INTER_LINEAR, "mask_interpolation": cv2.INTER_NEAREST,
                     "border_mode": cv2.BORDER_REPLICATE}


def rotation_step(limit: float, p: float) -> A.Affine:
    """The per-sample step: ``A.Affine`` rotating by an angle uniform in ±``limit`` degrees with probability ``p``."""
    return A.Affine(rotate=(-limit, limit), **AFFINE_RESAMPLING, p=p)


def rotation_positions(angles_deg: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) x and y pixel positions each output pixel reads to turn the content by its angle (see the module)."""
    a = torch.deg2rad(angles_deg.float())
    cos, sin = torch.cos(a), torch.sin(a)
    # output pixel (x, y) about the centre reads the input at R(-angle)·(x, y); rows point down, so the displayed
    # counter-clockwise turn flips the sign of sin in image coordinates
    sx, sy = (width - 1) / 2, (height - 1) / 2
    ys = torch.arange(height, device=a.device, dtype=torch.float32) - sy
    xs = torch.arange(width, device=a.device, dtype=torch.float32) - sx
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    c, s = cos.view(-1, 1, 1), sin.view(-1, 1, 1)
    return c * xx - s * yy + sx, s * xx + c * yy + sy


def apply_rotation(image: torch.Tensor, mask: torch.Tensor, flag: torch.Tensor,
                   angles_deg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each flagged sample of (N,C,H,W) image and (N,H,W) mask turned by its angle; the others unchanged."""
    idx = torch.nonzero(flag).flatten()   # one host sync; rotating only the drawn samples halves the work at p = ½
    if idx.numel() == 0:
        return image, mask
    x, y = rotation_positions(angles_deg[idx], *image.shape[-2:])
    return warp_samples(image, mask, idx, x, y)
