"""One patient's anatomy evaluated on one series' grid: tissue classes and organ labels per voxel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dlseg.synthetic.anatomy import (
    ORGAN_LIVER, ORGAN_LK, ORGAN_NONE, ORGAN_RK, ORGAN_SPLEEN, Anatomy, Ellipsoid, Grid, T,
)


@dataclass
class Phantom:
    """Tissue classes and organ labels of one patient on one grid."""

    tissue: np.ndarray      # (Z, H, W) uint8 of T
    organ: np.ndarray       # (Z, H, W) uint8: 0 none, 1 liver, 2 right kidney, 3 left kidney, 4 spleen


def _union(shapes: Sequence[Ellipsoid], t: np.ndarray, q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Pointwise maximum of the ellipsoid fields (a union of shapes)."""
    out = shapes[0].field(t, q, p)
    for s in shapes[1:]:
        np.maximum(out, s.field(t, q, p), out=out)
    return out


def _winner(fields: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Index of the largest field per voxel (uint8) and that largest value, without stacking the fields."""
    best = np.zeros(fields[0].shape, np.uint8)
    top = fields[0].copy()
    for k, f in enumerate(fields[1:], start=1):
        won = f > top
        best[won] = k
        np.maximum(top, f, out=top)
    return best, top


def _fat_thickness(an: Anatomy, sin_theta: np.ndarray | float) -> np.ndarray:
    """Subcutaneous fat (mm) by direction: thicker in front, thinner at the back (sin > 0 is posterior)."""
    anterior, posterior = np.clip(-sin_theta, 0, None), np.clip(sin_theta, 0, None)
    return an.fat_mm * (1.0 + an.fat_anterior * anterior ** 2 - 0.4 * posterior ** 2)


def _body_levels(an: Anatomy, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Body level r (H,W) (1 on the skin), per-slice scale s (Z,), fat and muscle thickness in r units (H,W)."""
    xm, ym = grid.x - an.cx, grid.y - an.cy
    p, q = xm[None, :] / an.a, ym[:, None] / np.where(ym[:, None] > 0, an.b * 0.92, an.b)
    r = (np.abs(p) ** an.exponent + np.abs(q) ** an.exponent) ** (1.0 / an.exponent)
    theta = np.arctan2(ym[:, None] / an.b, xm[None, :] / an.a)
    rho = an.a * an.b / np.sqrt((an.b * np.cos(theta)) ** 2 + (an.a * np.sin(theta)) ** 2)  # mm per r unit
    posterior = np.clip(np.sin(theta), 0, None)
    fat = _fat_thickness(an, np.sin(theta)) / rho
    muscle = (9.0 + an.paraspinal_mm * posterior ** 3) / rho
    s = 1.0 + an.taper * (grid.t - 0.5)
    return r.astype(np.float32), s.astype(np.float32), fat.astype(np.float32), muscle.astype(np.float32)


def _disc(grid: Grid, x0: float, y0: float, rx: float, ry: float | None = None) -> np.ndarray:
    """(H, W) boolean ellipse in image mm."""
    ry = rx if ry is None else ry
    return ((grid.x[None, :] - x0) / rx) ** 2 + ((grid.y[:, None] - y0) / ry) ** 2 <= 1.0


def build_phantom(an: Anatomy, grid: Grid) -> Phantom:
    """Evaluate the patient's anatomy on a grid: tissue classes and organ labels."""
    t = grid.t.astype(np.float32)
    p = ((grid.x - an.cx) / an.a).astype(np.float32)
    q = ((grid.y - an.cy) / an.b).astype(np.float32)
    r, s, fat, muscle = _body_levels(an, grid)
    s3 = s[:, None, None]
    body = r[None] < s3
    wall = r[None] < s3 - fat[None]
    inner = r[None] < s3 - fat[None] - muscle[None]

    tissue = np.zeros((len(t), grid.rows, grid.cols), np.uint8)
    tissue[body] = T.FAT
    tissue[wall] = T.MUSCLE
    fields = _organ_fields(an, t, q, p)
    best, top = _winner(fields)
    inside = (top > 0) & inner
    _fill_cavity(an, tissue, inner, t, q, p)
    organ = _paint_organs(an, tissue, inside, best, fields, t, q, p)
    _add_retroperitoneum(an, grid, tissue, organ, inner, body)
    return Phantom(tissue, organ)


def _organ_fields(an: Anatomy, t: np.ndarray, q: np.ndarray, p: np.ndarray) -> list[np.ndarray]:
    """Liver, right kidney, left kidney, spleen, stomach, heart (and gallbladder) fields, positive inside.

    The largest field wins where organs touch.
    """
    liver = _union(an.liver, t, q, p) + 0.22 * an.liver_field.sample(t, q, p)
    liver = np.minimum(liver, np.minimum((t - an.liver_top) * 8.0, (an.liver_bottom - t) * 8.0)[:, None, None])
    spleen = _union(an.spleen, t, q, p) + 0.15 * an.spleen_field.sample(t, q, p)
    spleen = np.minimum(spleen, ((t - an.liver_top - 0.02) * 8.0)[:, None, None])   # under the left diaphragm
    fields = [liver, an.kidney_right.field(t, q, p), an.kidney_left.field(t, q, p), spleen,
              an.stomach.field(t, q, p), an.heart.field(t, q, p)]
    if an.gallbladder is not None:
        fields.append(1.5 * an.gallbladder.field(t, q, p))
    return fields


def _fill_cavity(an: Anatomy, tissue: np.ndarray, inner: np.ndarray, t: np.ndarray, q: np.ndarray,
                 p: np.ndarray) -> None:
    """Cavity filler: lungs above the diaphragm, bowel loops (more towards the feet), visceral fat."""
    diaphragm = an.liver_top + 0.04 + 0.1 * np.clip(q, 0, 1)[:, None] ** 2 + 0.05 * np.abs(p)[None, :]
    lung = inner & (t[:, None, None] < diaphragm[None])
    tissue[inner] = T.FAT
    bowel_level = an.bowel_field.sample(t, q, p)
    bowel = inner & ~lung & (bowel_level > (0.9 - 1.3 * t)[:, None, None])
    tissue[bowel] = T.BOWEL
    tissue[bowel & (an.gas_field.sample(t, q, p) > 1.1)] = T.GAS
    tissue[lung] = T.LUNG


def _paint_organs(an: Anatomy, tissue: np.ndarray, inside: np.ndarray, best: np.ndarray,
                  fields: Sequence[np.ndarray], t: np.ndarray, q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Organ tissues where each field won; returns the organ labels (kidney hila are not kidney)."""
    organ = np.zeros(tissue.shape, np.uint8)
    for k, code in enumerate((ORGAN_LIVER, ORGAN_RK, ORGAN_LK, ORGAN_SPLEEN)):
        organ[inside & (best == k)] = code
    tissue[organ == ORGAN_LIVER] = T.LIVER
    tissue[organ == ORGAN_SPLEEN] = T.SPLEEN
    vessels = (np.abs(an.vessel_field.sample(t, q, p)) < 0.09) & (an.vessel_gate.sample(t, q, p) > -0.3)
    tissue[(organ == ORGAN_LIVER) & vessels & (fields[0] > 0.12)] = T.LIVER_VESSEL
    _paint_kidneys(an, tissue, organ, inside, best, fields, t, q, p)
    stomach = inside & (best == 4)
    tissue[stomach] = T.STOMACH_WALL
    lumen = stomach & (fields[4] > 0.3)
    tissue[lumen] = T.FLUID
    tissue[lumen & (q[None, :, None] < an.stomach.c[1] - 0.35 * an.stomach.r[1])] = T.GAS
    tissue[inside & (best == 5)] = T.HEART
    if an.gallbladder is not None:
        tissue[inside & (best == 6)] = T.GALLBLADDER
    return organ


def _paint_kidneys(an: Anatomy, tissue: np.ndarray, organ: np.ndarray, inside: np.ndarray, best: np.ndarray,
                   fields: Sequence[np.ndarray], t: np.ndarray, q: np.ndarray, p: np.ndarray) -> None:
    """Cortex, medulla and a renal sinus (fat, not labelled kidney) at the medial hilum."""
    for k, kidney in ((1, an.kidney_right), (2, an.kidney_left)):
        sel = inside & (best == k)
        tissue[sel] = T.KIDNEY_CORTEX
        tissue[sel & (fields[k] > 0.45)] = T.KIDNEY_MEDULLA
        medial = -np.sign(kidney.c[0])
        sinus = Ellipsoid((kidney.c[0] + medial * kidney.r[0] * 0.55, kidney.c[1], kidney.c[2]),
                          (kidney.r[0] * 0.45, kidney.r[1] * 0.35, kidney.r[2] * 0.5), kidney.angle)
        hilum = sel & (sinus.field(t, q, p) > 0)
        tissue[hilum] = T.RENAL_SINUS
        organ[hilum] = ORGAN_NONE


def _add_retroperitoneum(an: Anatomy, grid: Grid, tissue: np.ndarray, organ: np.ndarray, inner: np.ndarray,
                         body: np.ndarray) -> None:
    """Spine, spinal canal, aorta, IVC, psoas and ribs (in mm, drawn over the organs)."""
    t = grid.t
    vb_y = an.cy + an.b * 0.92 - 0.6 * an.fat_mm - 9.0 - an.paraspinal_mm + 0.3 * an.vb_radius
    vb_x = an.cx
    vb = _disc(grid, vb_x, vb_y, an.vb_radius)
    vb_core = _disc(grid, vb_x, vb_y, an.vb_radius - 2.5)
    canal_y = vb_y + an.vb_radius + 8.0
    arch = _disc(grid, vb_x, canal_y, 12.0, 11.0)
    canal = _disc(grid, vb_x, canal_y, 7.0, 6.5)
    spinous = (np.abs(grid.x[None, :] - vb_x) < 3.5) & (grid.y[:, None] > canal_y) & (grid.y[:, None] < canal_y + 30)
    aorta = _disc(grid, vb_x + 0.45 * an.vb_radius + 4, vb_y - an.vb_radius - 11.0, 11.0)
    ivc = _disc(grid, vb_x - an.vb_radius - 8, vb_y - an.vb_radius - 8.0, 10.0, 14.0)
    for z, tz in enumerate(t):
        sl, org = tissue[z], organ[z]
        in_body = body[z]
        if tz > 0.5:  # psoas muscles grow towards the feet
            rad = 6.0 + 30.0 * (tz - 0.5)
            psoas = (_disc(grid, vb_x - an.vb_radius - rad * 0.7, vb_y, rad, rad * 0.8)
                     | _disc(grid, vb_x + an.vb_radius + rad * 0.7, vb_y, rad, rad * 0.8)) & inner[z]
            sl[psoas & (org == 0)] = T.MUSCLE
        if tz < 0.6:  # ribs: small bony rings inside the muscle wall
            _draw_ribs(an, grid, sl, org, in_body & ~inner[z], tz)
        for mask, value in ((arch | spinous, T.BONE), (vb, T.BONE), (vb_core, T.MARROW), (canal, T.CSF),
                            (aorta, T.AORTA), (ivc, T.IVC)):
            m = mask & in_body
            sl[m] = value
            org[m] = ORGAN_NONE


def _draw_ribs(an: Anatomy, grid: Grid, sl: np.ndarray, org: np.ndarray, wall: np.ndarray, tz: float) -> None:
    """A few rib cross-sections along the wall at this level."""
    for k in range(9):
        ang = an.rib_phase + k * 0.55 + 1.2 * tz
        ang = (ang % (2 * np.pi))
        if 1.2 < ang < 1.95:   # none behind the spine
            continue
        inset = float(_fat_thickness(an, np.sin(ang))) + 5.0
        x0 = an.cx + (an.a - inset) * np.cos(ang)
        y0 = an.cy + (an.b - inset) * np.sin(ang)
        rib = _disc(grid, x0, y0, 6.0, 4.5) & wall & (org == 0)
        sl[rib] = T.BONE


def add_table(an: Anatomy, grid: Grid, tissue: np.ndarray) -> None:
    """The CT couch: a curved plate under the patient's back."""
    back = an.cy + an.b * 0.92 * (1 + abs(an.taper) / 2) + 6.0
    xr = grid.x[None, :] - an.cx
    top = back + 6.0 + 0.0006 * xr ** 2
    plate = (grid.y[:, None] > top) & (grid.y[:, None] < top + 7.0) & (np.abs(xr) < 1.1 * an.a)
    tissue[:, plate & (tissue[0] == T.AIR)] = T.TABLE
