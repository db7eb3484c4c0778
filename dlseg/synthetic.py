"""A synthetic cohort in the exact CHAOS layout: real DICOM series (pydicom) and Ground PNGs.

``python -m preprocess.synthetic OUT_DIR --patients N [--modality mr|ct|both] [--seed S]`` writes::

    OUT_DIR/Train_Sets/CT/<patient>/DICOM_anon/i0000,0000b.dcm …   + Ground/liver_GT_000.png … (liver 255)
    OUT_DIR/Train_Sets/MR/<patient>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/IMG-0004-000NN.dcm
                                    /T1DUAL/Ground/IMG-0004-000NN.png   (stems of the in-phase files)
    OUT_DIR/Train_Sets/MR/<patient>/T2SPIR/DICOM_anon/IMG-0002-000NN.dcm + T2SPIR/Ground/IMG-0002-000NN.png
    OUT_DIR/Test_Sets/…  the same without Ground (``--test-patients K``)

MR Ground gray values: liver 63, right kidney 126, left kidney 189, spleen 252. File numbering runs from head
to feet while ImagePositionPatient z *decreases* along it (as in the real CHAOS CT), so a reader that orders
slices by position instead of by file name visibly reverses them. In-phase Ground shares the in-phase stems
(pairing by stem); out-phase and CT names differ from their Ground names (pairing by position).

Anatomy lives in a continuous patient space: in-plane millimetres around the body centre (``p, q`` are those
divided by the body half-axes; image left = patient right, image top = anterior) and a normalized
head→feet coordinate ``t`` in [0, 1] over the scanned range. Organs are smooth implicit 3D shapes (unions of
ellipsoids plus a smooth random field made of Gaussian radial basis functions), so the same patient can be
sampled on different grids (T1-DUAL and T2-SPIR have different slice counts, like the real data). Tissues get
per-patient intensities (liver, spleen, bowel and stomach wall overlap on purpose, so no intensity threshold
segments the liver), a per-tissue texture, partial-volume blur, an MR bias field with slice-to-slice gain changes
and a faint breathing ghost, and Rician (MR) / Gaussian (CT) noise. T1 in/out phase come from separate water
and fat signals: in = W + F, out = |W − F|, which darkens fat-water boundaries (the "India ink" ring) and fatty
livers.

Every random number comes from ``numpy.random.SeedSequence([seed, modality, patient, is_test])`` and every UID
from ``pydicom.uid.generate_uid(entropy_srcs=…)``; nothing reads the clock, so the same seed gives the same bytes,
and a patient's files do not depend on how many other patients are generated.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from enum import IntEnum
from functools import partial
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid,
)
from scipy import ndimage

from dlseg.errors import ConfigError
from dlseg.workers import spawn_pool

MR_GRAY = {"liver": 63, "right_kidney": 126, "left_kidney": 189, "spleen": 252}
CT_LIVER_GRAY = 255
MODALITIES = ("mr", "ct", "both")
MR_SEQUENCES = ("t1-in", "t1-out", "t2")   # what an MR patient can have written (CT has its one series)
# Patient numbers of the real CHAOS training sets, extended with larger numbers; test patients get the
# smallest numbers not used for training. Gaps and two-digit ids exercise natural ordering.
CHAOS_MR_IDS = (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)
CHAOS_CT_IDS = (1, 2, 5, 6, 8, 10, 14, 16, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30)
UID_TAG = "dlseg-synthetic-v1"


class T(IntEnum):
    """Tissue classes; each has a T1 water/fat signal, a T2-SPIR signal, a CT number and a texture amplitude."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    LIVER = 3
    LIVER_VESSEL = 4
    KIDNEY_CORTEX = 5
    KIDNEY_MEDULLA = 6
    RENAL_SINUS = 7
    SPLEEN = 8
    BONE = 9
    MARROW = 10
    CSF = 11
    AORTA = 12
    IVC = 13
    LUNG = 14
    HEART = 15
    STOMACH_WALL = 16
    FLUID = 17
    GAS = 18
    BOWEL = 19
    GALLBLADDER = 20
    TABLE = 21


# Per tissue: T1 water, T1 fat, T2-SPIR, CT HU, texture amplitude (relative for MR, HU/100 for CT).
_TISSUE_TABLE = {
    T.AIR: (0, 0, 0, -1000, 0.0),
    T.FAT: (70, 880, 70, -105, 0.06),
    T.MUSCLE: (360, 15, 150, 50, 0.06),
    T.LIVER: (560, 0, 270, 110, 0.05),
    T.LIVER_VESSEL: (260, 0, 330, 165, 0.04),
    T.KIDNEY_CORTEX: (520, 0, 560, 175, 0.04),
    T.KIDNEY_MEDULLA: (380, 0, 720, 125, 0.04),
    T.RENAL_SINUS: (90, 700, 90, -80, 0.08),
    T.SPLEEN: (480, 0, 520, 115, 0.05),
    T.BONE: (30, 0, 30, 750, 0.10),
    T.MARROW: (230, 430, 130, 230, 0.12),
    T.CSF: (120, 0, 1150, 12, 0.03),
    T.AORTA: (170, 0, 90, 170, 0.03),
    T.IVC: (230, 0, 140, 140, 0.03),
    T.LUNG: (25, 0, 35, -850, 0.25),
    T.HEART: (330, 0, 230, 150, 0.06),
    T.STOMACH_WALL: (440, 0, 300, 85, 0.07),
    T.FLUID: (140, 0, 1050, 15, 0.05),
    T.GAS: (0, 0, 0, -1000, 0.0),
    T.BOWEL: (420, 30, 360, 60, 0.15),
    T.GALLBLADDER: (150, 0, 1150, 10, 0.03),
    T.TABLE: (0, 0, 0, 250, 0.02),
}
_TABLE = np.array([_TISSUE_TABLE[t] for t in T], dtype=np.float32)
T1_WATER, T1_FAT, T2_SIGNAL, CT_HU, TEXTURE = (_TABLE[:, i].copy() for i in range(5))

ORGAN_NONE, ORGAN_LIVER, ORGAN_RK, ORGAN_LK, ORGAN_SPLEEN = 0, 1, 2, 3, 4


# ----------------------------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class Grid:
    """Where one series samples the patient: pixel centres in mm (x: columns, y: rows) and t per slice."""

    rows: int
    cols: int
    spacing: float           # in-plane pixel spacing, mm
    t: np.ndarray            # (Z,) head→feet position of each slice in [0, 1]-ish

    @property
    def x(self) -> np.ndarray:
        """Column centres in mm relative to the isocentre."""
        return ((np.arange(self.cols) + 0.5) - self.cols / 2.0) * self.spacing

    @property
    def y(self) -> np.ndarray:
        """Row centres in mm relative to the isocentre (rows grow towards the patient's back)."""
        return ((np.arange(self.rows) + 0.5) - self.rows / 2.0) * self.spacing


@dataclass(frozen=True)
class RBFField:
    """A smooth random 3D field: random coefficients on a lattice of Gaussian bumps, unit variance everywhere."""

    coef: np.ndarray                      # (nt, nq, np)
    lo: tuple[float, float, float]        # lattice start in (t, q, p)
    hi: tuple[float, float, float]        # lattice end

    @staticmethod
    def draw(rng: np.random.Generator, nodes: tuple[int, int, int],
             lo: tuple[float, float, float] = (-0.1, -1.1, -1.1),
             hi: tuple[float, float, float] = (1.1, 1.1, 1.1)) -> "RBFField":
        """A field with ``nodes`` bumps per axis over ``lo..hi``."""
        return RBFField(rng.standard_normal(nodes).astype(np.float32), lo, hi)

    def _basis(self, axis: int, coords: np.ndarray) -> np.ndarray:
        """(len(coords), n) Gaussian basis, rows normalized to unit sum of squares."""
        n = self.coef.shape[axis]
        centers = np.linspace(self.lo[axis], self.hi[axis], n, dtype=np.float32)
        width = (self.hi[axis] - self.lo[axis]) / max(n - 1, 1)
        b = np.exp(-0.5 * ((coords[:, None].astype(np.float32) - centers[None, :]) / width) ** 2)
        return b / np.sqrt((b ** 2).sum(axis=1, keepdims=True) + 1e-12)

    def sample(self, t: np.ndarray, q: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Evaluate on the separable grid (Z,) × (H,) × (W,) → (Z, H, W) float32 (three matrix products)."""
        nt = self.coef.shape[0]
        a = self.coef @ self._basis(2, p).T                                      # (nt, nq, W)
        a = self._basis(1, q) @ a                                                # (nt, H, W)
        out = self._basis(0, t) @ a.reshape(nt, -1)                              # (Z, H*W)
        return out.reshape(len(t), len(q), len(p))


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in (p, q, t) with an in-plane rotation; its field is 1 at the centre, 0 on the surface."""

    c: tuple[float, float, float]         # centre (p, q, t)
    r: tuple[float, float, float]         # radii
    angle: float = 0.0                    # in-plane rotation, radians

    def field(self, t: np.ndarray, q: np.ndarray, p: np.ndarray) -> np.ndarray:
        """1 - squared normalized distance on the grid → (Z, H, W) float32."""
        ca, sa = np.cos(self.angle), np.sin(self.angle)
        dp = (p[None, :] - self.c[0]).astype(np.float32)
        dq = (q[:, None] - self.c[1]).astype(np.float32)
        pr, qr = ca * dp + sa * dq, -sa * dp + ca * dq
        inplane = (pr / self.r[0]) ** 2 + (qr / self.r[1]) ** 2                  # (H, W)
        dt = (((t - self.c[2]) / self.r[2]) ** 2).astype(np.float32)             # (Z,)
        return 1.0 - inplane[None, :, :] - dt[:, None, None]


def _union(shapes: Sequence[Ellipsoid], t: np.ndarray, q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Pointwise maximum of the ellipsoid fields (a union of shapes)."""
    out = shapes[0].field(t, q, p)
    for s in shapes[1:]:
        np.maximum(out, s.field(t, q, p), out=out)
    return out


# ----------------------------------------------------------------------------------------------- anatomy

@dataclass(frozen=True)
class Anatomy:
    """One synthetic patient's body and organs (all sizes in mm or in body-relative units)."""

    a: float                   # body half-width (mm)
    b: float                   # body half-depth (mm)
    cx: float                  # body centre offset from the isocentre (mm)
    cy: float
    exponent: float            # superellipse exponent of the body outline
    taper: float               # body scale change from head to feet
    fat_mm: float              # subcutaneous fat thickness
    fat_anterior: float        # extra anterior fat (fraction)
    paraspinal_mm: float       # posterior muscle bulk
    vb_radius: float           # vertebral body radius (mm)
    liver: tuple[Ellipsoid, ...]
    liver_top: float
    liver_bottom: float
    liver_field: RBFField
    vessel_field: RBFField
    vessel_gate: RBFField
    spleen: tuple[Ellipsoid, ...]
    spleen_field: RBFField
    kidney_right: Ellipsoid
    kidney_left: Ellipsoid
    stomach: Ellipsoid
    gallbladder: Ellipsoid | None
    heart: Ellipsoid
    bowel_field: RBFField
    gas_field: RBFField
    rib_phase: float


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    """One uniform draw as a plain float."""
    return float(rng.uniform(lo, hi))


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a plausible, patient-specific abdomen."""
    u = partial(_u, rng)
    top, bottom = u(0.09, 0.17), u(0.68, 0.8)
    span = bottom - top
    # Liver: a big right lobe, a dome, a left lobe reaching across the midline, an inferior tip.
    right = Ellipsoid((u(-0.5, -0.36), u(-0.12, 0.05), top + span * u(0.38, 0.5)),
                      (u(0.36, 0.46), u(0.5, 0.62), span * u(0.42, 0.55)), u(-0.25, 0.25))
    dome = Ellipsoid((u(-0.42, -0.25), u(-0.15, 0.05), top + span * u(0.22, 0.3)),
                     (u(0.35, 0.48), u(0.45, 0.6), span * u(0.2, 0.3)), u(-0.3, 0.3))
    left = Ellipsoid((u(-0.05, 0.18), u(-0.6, -0.4), top + span * u(0.2, 0.38)),
                     (u(0.28, 0.42), u(0.16, 0.26), span * u(0.15, 0.28)), u(-0.1, 0.5))
    tip = Ellipsoid((u(-0.62, -0.45), u(-0.3, 0.0), top + span * u(0.68, 0.85)),
                    (u(0.14, 0.26), u(0.2, 0.35), span * u(0.15, 0.3)), u(-0.4, 0.4))
    spleen_t = u(0.22, 0.42)
    spleen_main = Ellipsoid((u(0.55, 0.68), u(0.2, 0.45), spleen_t), (u(0.13, 0.2), u(0.25, 0.38), u(0.12, 0.2)),
                            u(0.35, 0.9))
    spleen_pole = Ellipsoid((spleen_main.c[0] + u(-0.05, 0.05), spleen_main.c[1] - u(0.1, 0.25),
                             spleen_t + u(0.04, 0.12)), (u(0.1, 0.15), u(0.14, 0.22), u(0.08, 0.13)), u(0.2, 1.0))
    rk_t, lk_t = u(0.62, 0.74), u(0.56, 0.68)
    kidney_r = (u(0.12, 0.16), u(0.17, 0.23), u(0.15, 0.2))
    return Anatomy(
        a=u(135, 172), b=u(95, 128), cx=u(-12, 12), cy=u(-10, 14), exponent=u(2.0, 2.6), taper=u(-0.06, 0.1),
        fat_mm=u(5, 28), fat_anterior=u(0.1, 0.8), paraspinal_mm=u(30, 48), vb_radius=u(14, 19),
        liver=(right, dome, left, tip), liver_top=top, liver_bottom=bottom,
        liver_field=RBFField.draw(rng, (7, 8, 8)),
        vessel_field=RBFField.draw(rng, (10, 16, 16)), vessel_gate=RBFField.draw(rng, (6, 6, 6)),
        spleen=(spleen_main, spleen_pole), spleen_field=RBFField.draw(rng, (6, 7, 7)),
        kidney_right=Ellipsoid((u(-0.42, -0.32), u(0.38, 0.52), rk_t), kidney_r, u(-0.6, -0.2)),
        kidney_left=Ellipsoid((u(0.32, 0.42), u(0.38, 0.52), lk_t),
                              tuple(r * u(0.92, 1.08) for r in kidney_r), u(0.2, 0.6)),  # type: ignore[arg-type]
        stomach=Ellipsoid((u(0.22, 0.4), u(-0.42, -0.2), u(0.3, 0.45)), (u(0.18, 0.3), u(0.18, 0.28), u(0.12, 0.2)),
                          u(-0.6, 0.6)),
        gallbladder=(Ellipsoid((u(-0.3, -0.15), u(-0.5, -0.35), top + span * u(0.6, 0.8)),
                               (u(0.06, 0.1), u(0.09, 0.15), u(0.06, 0.1)), u(-0.8, 0.8))
                     if rng.uniform() < 0.8 else None),
        heart=Ellipsoid((u(0.0, 0.2), u(-0.45, -0.25), top - u(0.02, 0.08)), (u(0.3, 0.4), u(0.3, 0.4), u(0.1, 0.14)),
                        u(-0.5, 0.0)),
        bowel_field=RBFField.draw(rng, (10, 16, 16)), gas_field=RBFField.draw(rng, (8, 10, 10)),
        rib_phase=u(0, 2 * np.pi),
    )


@dataclass
class Phantom:
    """Tissue classes and organ labels of one patient on one grid."""

    tissue: np.ndarray      # (Z, H, W) uint8 of T
    organ: np.ndarray       # (Z, H, W) uint8: 0 none, 1 liver, 2 right kidney, 3 left kidney, 4 spleen


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
    Z, H, W = len(t), grid.rows, grid.cols
    r, s, fat, muscle = _body_levels(an, grid)
    s3 = s[:, None, None]
    body = r[None] < s3
    wall = r[None] < s3 - fat[None]
    inner = r[None] < s3 - fat[None] - muscle[None]

    tissue = np.zeros((Z, H, W), np.uint8)
    tissue[body] = T.FAT
    tissue[wall] = T.MUSCLE
    # Organs: each is a field positive inside; the largest field wins where they touch.
    liver = _union(an.liver, t, q, p) + 0.22 * an.liver_field.sample(t, q, p)
    liver = np.minimum(liver, np.minimum((t - an.liver_top) * 8.0, (an.liver_bottom - t) * 8.0)[:, None, None])
    spleen = _union(an.spleen, t, q, p) + 0.15 * an.spleen_field.sample(t, q, p)
    spleen = np.minimum(spleen, ((t - an.liver_top - 0.02) * 8.0)[:, None, None])   # under the left diaphragm
    fields = [liver, an.kidney_right.field(t, q, p), an.kidney_left.field(t, q, p), spleen,
              an.stomach.field(t, q, p), an.heart.field(t, q, p)]
    if an.gallbladder is not None:
        fields.append(1.5 * an.gallbladder.field(t, q, p))
    best, top = _winner(fields)
    inside = (top > 0) & inner

    # Cavity filler: lungs above the diaphragm, bowel loops (more towards the feet), visceral fat.
    diaphragm = an.liver_top + 0.04 + 0.1 * np.clip(q, 0, 1)[:, None] ** 2 + 0.05 * np.abs(p)[None, :]
    lung = inner & (t[:, None, None] < diaphragm[None])
    tissue[inner] = T.FAT
    bowel_level = an.bowel_field.sample(t, q, p)
    bowel = inner & ~lung & (bowel_level > (0.9 - 1.3 * t)[:, None, None])
    tissue[bowel] = T.BOWEL
    tissue[bowel & (an.gas_field.sample(t, q, p) > 1.1)] = T.GAS
    tissue[lung] = T.LUNG

    organ = np.zeros((Z, H, W), np.uint8)
    for k, code in enumerate((ORGAN_LIVER, ORGAN_RK, ORGAN_LK, ORGAN_SPLEEN)):
        organ[inside & (best == k)] = code
    tissue[organ == ORGAN_LIVER] = T.LIVER
    tissue[organ == ORGAN_SPLEEN] = T.SPLEEN
    vessels = (np.abs(an.vessel_field.sample(t, q, p)) < 0.09) & (an.vessel_gate.sample(t, q, p) > -0.3)
    tissue[(organ == ORGAN_LIVER) & vessels & (liver > 0.12)] = T.LIVER_VESSEL
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
    stomach = inside & (best == 4)
    tissue[stomach] = T.STOMACH_WALL
    lumen = stomach & (fields[4] > 0.3)
    tissue[lumen] = T.FLUID
    tissue[lumen & (q[None, :, None] < an.stomach.c[1] - 0.35 * an.stomach.r[1])] = T.GAS
    tissue[inside & (best == 5)] = T.HEART
    if an.gallbladder is not None:
        tissue[inside & (best == 6)] = T.GALLBLADDER
    _add_retroperitoneum(an, grid, tissue, organ, inner, body)
    return Phantom(tissue, organ)


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


def _add_table(an: Anatomy, grid: Grid, tissue: np.ndarray) -> None:
    """The CT couch: a curved plate under the patient's back."""
    back = an.cy + an.b * 0.92 * (1 + abs(an.taper) / 2) + 6.0
    xr = grid.x[None, :] - an.cx
    top = back + 6.0 + 0.0006 * xr ** 2
    plate = (grid.y[:, None] > top) & (grid.y[:, None] < top + 7.0) & (np.abs(xr) < 1.1 * an.a)
    tissue[:, plate & (tissue[0] == T.AIR)] = T.TABLE


# ----------------------------------------------------------------------------------------------- rendering

@dataclass(frozen=True)
class Contrast:
    """Per-patient tissue values (a jittered copy of the tissue table)."""

    t1_water: np.ndarray
    t1_fat: np.ndarray
    t2: np.ndarray
    hu: np.ndarray


def draw_contrast(rng: np.random.Generator) -> Contrast:
    """Jitter tissue values per patient; liver, spleen, bowel and stomach wall overlap on purpose."""
    n = len(T)
    w = T1_WATER * rng.uniform(0.88, 1.12, n).astype(np.float32)
    f = T1_FAT * rng.uniform(0.9, 1.1, n).astype(np.float32)
    fat_fraction = float(rng.choice([0.0, 0.0, rng.uniform(0.03, 0.1), rng.uniform(0.1, 0.25)]))
    liver_signal = w[T.LIVER]
    w[T.LIVER], f[T.LIVER] = liver_signal * (1 - fat_fraction), liver_signal * fat_fraction * 1.3
    w[T.SPLEEN] = liver_signal * rng.uniform(0.8, 1.05)
    w[T.BOWEL] = liver_signal * rng.uniform(0.7, 0.95)
    w[T.STOMACH_WALL] = liver_signal * rng.uniform(0.75, 0.95)
    t2 = T2_SIGNAL * rng.uniform(0.88, 1.12, n).astype(np.float32)
    t2[T.SPLEEN] = t2[T.LIVER] * rng.uniform(1.4, 2.1)
    t2[T.BOWEL] = t2[T.LIVER] * rng.uniform(0.9, 1.5)
    t2[T.MUSCLE] = t2[T.LIVER] * rng.uniform(0.65, 0.95)
    t2[T.STOMACH_WALL] = t2[T.LIVER] * rng.uniform(0.9, 1.3)
    hu = CT_HU + rng.uniform(-10, 10, n).astype(np.float32)
    portal = rng.uniform() < 0.75                      # portal-venous phase, else late/unenhanced-looking
    hu[T.LIVER] = rng.uniform(95, 135) if portal else rng.uniform(55, 80)
    hu[T.SPLEEN] = hu[T.LIVER] + rng.uniform(-20, 15)
    hu[T.LIVER_VESSEL] = hu[T.LIVER] + (rng.uniform(25, 70) if portal else rng.uniform(-25, -10))
    hu[T.BOWEL] = hu[T.LIVER] - rng.uniform(20, 60)
    hu[T.STOMACH_WALL] = hu[T.LIVER] - rng.uniform(0, 35)
    hu[T.AORTA] = rng.uniform(150, 260) if portal else rng.uniform(40, 60)
    hu[T.IVC] = hu[T.LIVER] + rng.uniform(-10, 40)
    for tissue in (T.AIR, T.GAS):
        hu[tissue] = -1000.0
    return Contrast(w, f, t2, hu)


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float) -> np.ndarray:
    """Spatially correlated unit-variance noise (smoothed in-plane only)."""
    n = rng.standard_normal(shape, dtype=np.float32)
    n = ndimage.gaussian_filter(n, (0, sigma_px, sigma_px))
    return n / max(float(n.std()), 1e-6)


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """In-plane partial-volume blur."""
    return ndimage.gaussian_filter(img, (0, sigma_px, sigma_px))


def _bias(rng: np.random.Generator, an: Anatomy, grid: Grid) -> np.ndarray:
    """Smooth multiplicative MR bias field: a random low-order field times a surface-coil profile."""
    p = ((grid.x - an.cx) / an.a).astype(np.float32)
    q = ((grid.y - an.cy) / an.b).astype(np.float32)
    low = RBFField.draw(rng, (3, 3, 3), lo=(0.0, -1.2, -1.2), hi=(1.0, 1.2, 1.2)).sample(grid.t, q, p)
    r = np.sqrt(p[None, :] ** 2 + q[:, None] ** 2)
    coil = 1.0 + rng.uniform(0.1, 0.35) * np.clip(r, 0, 1.2) ** 2
    return (np.exp(rng.uniform(0.1, 0.22) * low) * coil[None]).astype(np.float32)


def _scanner_gain(rng: np.random.Generator, an: Anatomy, grid: Grid) -> np.ndarray:
    """Receiver gain × bias field × small slice-to-slice gain changes, (Z, H, W)."""
    per_slice = 1.0 + 0.025 * rng.standard_normal(len(grid.t)).astype(np.float32)
    return rng.uniform(0.7, 1.5) * _bias(rng, an, grid) * per_slice[:, None, None]


def _ghost(img: np.ndarray, amplitude: float) -> np.ndarray:
    """A faint copy shifted by half the field of view along the rows (phase-encoding ghost from breathing)."""
    return img + amplitude * np.roll(img, img.shape[1] // 2, axis=1)


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both channels."""
    re = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im)


def _to_uint12(img: np.ndarray) -> np.ndarray:
    """Round and clip to the stored 12-bit range."""
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def render_t1(rng: np.random.Generator, an: Anatomy, ph: Phantom, grid: Grid, c: Contrast
              ) -> tuple[np.ndarray, np.ndarray]:
    """T1-DUAL in-phase (W + F) and out-phase (|W − F|) stored values, co-registered."""
    tex = 1.0 + TEXTURE[ph.tissue] * _texture(rng, ph.tissue.shape, 1.0)
    water = _blur(c.t1_water[ph.tissue] * tex, 0.7)
    fat = _blur(c.t1_fat[ph.tissue] * tex, 0.7)
    gain, ghost = _scanner_gain(rng, an, grid), float(rng.uniform(0.0, 0.04))
    sigma = float(rng.uniform(0.02, 0.045) * c.t1_water[T.MUSCLE] * 1.5)
    inphase = _rician(rng, _ghost((water + fat) * gain, ghost), sigma)
    outphase = _rician(rng, _ghost(np.abs(water - fat) * gain, ghost), sigma)
    return _to_uint12(inphase), _to_uint12(outphase)


def render_t2(rng: np.random.Generator, an: Anatomy, ph: Phantom, grid: Grid, c: Contrast) -> np.ndarray:
    """T2-SPIR (fat-suppressed) stored values."""
    tex = 1.0 + TEXTURE[ph.tissue] * _texture(rng, ph.tissue.shape, 1.0)
    signal = _ghost(_blur(c.t2[ph.tissue] * tex, 0.7) * _scanner_gain(rng, an, grid), float(rng.uniform(0.0, 0.04)))
    sigma = float(rng.uniform(0.02, 0.045) * c.t2[T.LIVER] * 1.5)
    return _to_uint12(_rician(rng, signal, sigma))


def render_ct(rng: np.random.Generator, ph: Phantom, c: Contrast) -> np.ndarray:
    """CT stored values (HU + 1000, 0..4095)."""
    hu = c.hu[ph.tissue] + 100.0 * TEXTURE[ph.tissue] * _texture(rng, ph.tissue.shape, 1.2)
    hu = _blur(hu, 0.6) + rng.uniform(6, 18) * _texture(rng, ph.tissue.shape, 0.6)
    return _to_uint12(hu + 1000.0)


def mr_ground(organ: np.ndarray) -> np.ndarray:
    """Organ labels → CHAOS MR gray values."""
    lut = np.array([0, MR_GRAY["liver"], MR_GRAY["right_kidney"], MR_GRAY["left_kidney"], MR_GRAY["spleen"]],
                   np.uint8)
    return lut[organ]


def ct_ground(organ: np.ndarray) -> np.ndarray:
    """Organ labels → CHAOS CT liver mask (255)."""
    return np.where(organ == ORGAN_LIVER, CT_LIVER_GRAY, 0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- DICOM

@dataclass(frozen=True)
class SeriesMeta:
    """Everything one DICOM series shares."""

    modality: str                 # "CT" | "MR"
    patient_id: str
    study_uid: str
    series_uid: str
    frame_uid: str
    series_number: int
    description: str
    grid: Grid
    z_top: float                  # z (mm) of t = 0; z decreases towards the feet
    length_mm: float              # extent of t in [0, 1]
    thickness: float
    spacing_between: float
    uid_key: tuple[str, ...]      # entropy for SOP instance UIDs
    extra: dict = field(default_factory=dict)

    def z(self, k: int) -> float:
        """Slice position (mm) of slice k."""
        return round(self.z_top - float(self.grid.t[k]) * self.length_mm, 3)


def series_template(meta: SeriesMeta) -> Dataset:
    """The tags every slice of the series shares (Part 10 file meta included)."""
    ct = meta.modality == "CT"
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = CTImageStorage if ct else MRImageStorage
    fm.TransferSyntaxUID = ImplicitVRLittleEndian if ct else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = fm.MediaStorageSOPClassUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ""
    ds.StudyTime = "120000"
    ds.Modality = meta.modality
    ds.Manufacturer = "dlseg synthetic"
    ds.ManufacturerModelName = "phantom"
    ds.StudyDescription = "SYNTHETIC ABDOMEN"
    ds.SeriesDescription = meta.description
    ds.ProtocolName = meta.description
    ds.PatientName = "Anonymized"
    ds.PatientID = meta.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "FFS" if ct else "HFS"
    ds.SliceThickness = f"{meta.thickness:.2f}"
    ds.SpacingBetweenSlices = f"{meta.spacing_between:.2f}"
    ds.StudyInstanceUID = meta.study_uid
    ds.SeriesInstanceUID = meta.series_uid
    ds.FrameOfReferenceUID = meta.frame_uid
    ds.StudyID = "1"
    ds.SeriesNumber = meta.series_number
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [round(meta.grid.spacing, 6), round(meta.grid.spacing, 6)]
    for key, value in meta.extra.items():
        setattr(ds, key, value)
    ds.RescaleIntercept = -1000 if ct else 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU" if ct else "US"
    return ds


def write_series(folder: Path, names: Sequence[str], volume: np.ndarray, meta: SeriesMeta,
                 instances: Sequence[int]) -> None:
    """Write slice k of ``volume`` as ``folder/names[k]`` with InstanceNumber ``instances[k]``."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = series_template(meta)
    x0, y0 = round(float(meta.grid.x[0]), 4), round(float(meta.grid.y[0]), 4)
    for k, (name, inst) in enumerate(zip(names, instances)):
        uid = generate_uid(entropy_srcs=[*meta.uid_key, "sop", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = int(inst)
        ds.ImagePositionPatient = [x0, y0, meta.z(k)]
        ds.SliceLocation = meta.z(k)
        ds.set_pixel_data(volume[k], "MONOCHROME2", 12, generate_instance_uid=False)
        ds.save_as(folder / name, enforce_file_format=True)


def write_ground(folder: Path, names: Sequence[str], masks: np.ndarray) -> None:
    """Write one 8-bit PNG per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in zip(names, masks):
        if not cv2.imwrite(str(folder / name), m):
            raise OSError(f"{folder / name}: could not write PNG")


# ----------------------------------------------------------------------------------------------- cohort

@dataclass(frozen=True)
class CohortSpec:
    """What to generate (validated)."""

    patients: int
    modality: str = "mr"
    seed: int = 0
    size_range: tuple[int, int] = (192, 256)
    slices_range: tuple[int, int] = (26, 36)
    test_patients: int = 0
    sequences: tuple[str, ...] = MR_SEQUENCES   # MR series to write; the others are still drawn, not written

    def __post_init__(self) -> None:
        """Reject values that cannot make a cohort (ConfigError naming the option)."""
        if self.modality not in MODALITIES:
            raise ConfigError(f"modality: {self.modality!r} is not one of {', '.join(MODALITIES)}")
        unknown = [q for q in self.sequences if q not in MR_SEQUENCES]
        if unknown or not self.sequences:
            raise ConfigError(f"sequences: {list(self.sequences)} must be a non-empty subset of "
                              f"{', '.join(MR_SEQUENCES)}")
        if self.patients < 1:
            raise ConfigError(f"patients: {self.patients} must be at least 1")
        if self.test_patients < 0:
            raise ConfigError(f"test_patients: {self.test_patients} must be 0 or more")
        lo, hi = self.size_range
        if not 32 <= lo <= hi <= 1024:
            raise ConfigError(f"size: ({lo}, {hi}) must satisfy 32 <= min <= max <= 1024")
        lo, hi = self.slices_range
        if not 6 <= lo <= hi <= 512:
            raise ConfigError(f"slices: ({lo}, {hi}) must satisfy 6 <= min <= max <= 512")


@dataclass(frozen=True)
class PatientJob:
    """One patient to write."""

    modality: str          # "CT" | "MR"
    patient: int
    test: bool
    spec: CohortSpec

    @property
    def folder(self) -> Path:
        """Path relative to the output root."""
        return Path("Test_Sets" if self.test else "Train_Sets") / self.modality / str(self.patient)

    def rng(self) -> np.random.Generator:
        """This patient's own random stream."""
        code = 1 if self.modality == "CT" else 0
        entropy = [self.spec.seed, code, self.patient, int(self.test)]
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def patient_ids(modality: str, train: int, test: int) -> tuple[list[int], list[int]]:
    """CHAOS-like patient numbers for the train and test sets of one modality."""
    base = CHAOS_CT_IDS if modality == "CT" else CHAOS_MR_IDS
    ids = list(base[:train]) + list(range(max(base) + 1, max(base) + 1 + max(0, train - len(base))))
    used = set(ids)
    free = (n for n in range(1, 10 ** 6) if n not in used)
    return ids, [next(free) for _ in range(test)]


def plan(spec: CohortSpec) -> list[PatientJob]:
    """Every patient of the cohort, CT first."""
    mods = {"mr": ["MR"], "ct": ["CT"], "both": ["CT", "MR"]}[spec.modality]
    jobs = []
    for mod in mods:
        train, test = patient_ids(mod, spec.patients, spec.test_patients)
        jobs += [PatientJob(mod, pid, False, spec) for pid in train]
        jobs += [PatientJob(mod, pid, True, spec) for pid in test]
    return jobs


def _draw_grid(rng: np.random.Generator, an: Anatomy, size_range: tuple[int, int], t: np.ndarray) -> Grid:
    """In-plane size (occasionally non-square, 8:9) and a pixel spacing whose field of view holds the body."""
    lo, hi = size_range
    rows = int(rng.integers(lo, hi + 1))
    cols = rows
    if rng.uniform() < 0.25 and round(rows * 9 / 8) <= hi:
        cols = round(rows * 9 / 8)
    smax = 1.0 + abs(an.taper) / 2
    need = max((2 * (an.a * smax + abs(an.cx)) + 24) / cols, (2 * (an.b * smax + abs(an.cy)) + 40) / rows)
    return Grid(rows, cols, round(float(need * rng.uniform(1.0, 1.12)), 4), t)


def _slice_t(n: int, offset: float = 0.0, span: float = 1.0) -> np.ndarray:
    """Slice centres in t for n slices covering ``offset .. offset + span``."""
    return (offset + (np.arange(n) + 0.5) / n * span).astype(np.float32)


def _uids(job: PatientJob, *parts: str) -> str:
    """A deterministic UID for this patient and the given parts."""
    return generate_uid(entropy_srcs=[UID_TAG, str(job.spec.seed), job.modality, str(job.patient), *parts])


def write_ct_patient(job: PatientJob, root: Path) -> int:
    """One CT patient (DICOM_anon + Ground); returns the number of slices."""
    rng = job.rng()
    an, contrast = draw_anatomy(rng), draw_contrast(rng)
    n = int(rng.integers(job.spec.slices_range[0], job.spec.slices_range[1] + 1))
    grid = _draw_grid(rng, an, job.spec.size_range, _slice_t(n))
    spacing = round(float(rng.uniform(4.0, 7.5)), 2)
    ph = build_phantom(an, grid)
    _add_table(an, grid, ph.tissue)
    volume = render_ct(rng, ph, contrast)
    meta = SeriesMeta(
        "CT", f"SYN-CT-{job.patient:04d}", _uids(job, "study"), _uids(job, "series", "ct"), _uids(job, "frame"),
        int(rng.integers(2, 6)), "ABDOMEN PORTAL VENOUS", grid, round(float(rng.uniform(1400, 1800)), 1),
        spacing * n, spacing, spacing, (UID_TAG, str(job.spec.seed), "CT", str(job.patient)),
        extra={"KVP": "120", "ConvolutionKernel": "B", "WindowCenter": "50", "WindowWidth": "400",
               "ReconstructionDiameter": f"{grid.spacing * max(grid.rows, grid.cols):.1f}"},
    )
    write_series(root / "DICOM_anon", [f"i{k:04d},0000b.dcm" for k in range(n)], volume, meta, range(1, n + 1))
    if not job.test:
        write_ground(root / "Ground", [f"liver_GT_{k:03d}.png" for k in range(n)], ct_ground(ph.organ))
    return n


def write_mr_patient(job: PatientJob, root: Path) -> int:
    """One MR patient (T1DUAL in/out phase + T2SPIR, each with Ground); returns the number of slices written.

    Only the series in ``spec.sequences`` are written. Everything up to T1 is drawn whatever is written (the
    random stream stays the same) and T2 comes last, so a written series has the same bytes with or without
    the others.
    """
    wanted = job.spec.sequences
    rng = job.rng()
    an, contrast = draw_anatomy(rng), draw_contrast(rng)
    lo, hi = job.spec.slices_range
    n1, n2 = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    grid1 = _draw_grid(rng, an, job.spec.size_range, _slice_t(n1))
    offset, span = float(rng.uniform(-0.02, 0.02)), float(rng.uniform(0.97, 1.03))
    grid2 = _draw_grid(rng, an, job.spec.size_range, _slice_t(n2, offset, span)) if rng.uniform() < 0.5 else \
        Grid(grid1.rows, grid1.cols, grid1.spacing, _slice_t(n2, offset, span))
    spacing1 = round(float(rng.uniform(5.5, 9.0)), 2)
    length = spacing1 * n1
    spacing2 = round(length * span / n2, 2)
    gap1, gap2 = float(rng.choice([0.0, 0.5, 1.0])), float(rng.choice([0.0, 0.5, 1.0]))
    z_top = round(float(rng.uniform(-60, 60)), 1)
    s2 = int(rng.choice([2, 3]))
    s1 = s2 + int(rng.choice([1, 2, 3]))
    study, frame = _uids(job, "study"), _uids(job, "frame")
    key = (UID_TAG, str(job.spec.seed), "MR", str(job.patient))
    common = {"MagneticFieldStrength": "1.5", "MRAcquisitionType": "2D", "ImagingFrequency": "63.9",
              "ImagedNucleus": "1H"}

    ph1 = build_phantom(an, grid1)
    inphase, outphase = render_t1(rng, an, ph1, grid1, contrast)
    t1 = {**common, "ScanningSequence": "GR", "SequenceVariant": "SP", "RepetitionTime": "150", "FlipAngle": "70"}
    stems = [f"IMG-{s1:04d}-{2 * k + 2:05d}" for k in range(n1)]
    for phase, volume, te, echo, parity in (("InPhase", inphase, "4.6", 2, 2), ("OutPhase", outphase, "2.3", 1, 1)):
        if ("t1-in" if phase == "InPhase" else "t1-out") not in wanted:
            continue
        meta = SeriesMeta("MR", f"SYN-MR-{job.patient:04d}", study, _uids(job, "series", phase), frame, s1,
                          f"T1 DUAL {phase.lower()}", grid1, z_top, length, spacing1 - gap1, spacing1,
                          (*key, phase), extra={**t1, "EchoTime": te, "EchoNumbers": echo})
        numbers = [2 * k + parity for k in range(n1)]
        write_series(root / "T1DUAL" / "DICOM_anon" / phase, [f"IMG-{s1:04d}-{m:05d}.dcm" for m in numbers],
                     volume, meta, numbers)
    n_t1 = n1 * sum(q in wanted for q in ("t1-in", "t1-out"))
    if n_t1 and not job.test:
        write_ground(root / "T1DUAL" / "Ground", [f"{s}.png" for s in stems], mr_ground(ph1.organ))
    if "t2" not in wanted:
        return n_t1

    ph2 = build_phantom(an, grid2)
    t2 = render_t2(rng, an, ph2, grid2, contrast)
    meta = SeriesMeta("MR", f"SYN-MR-{job.patient:04d}", study, _uids(job, "series", "T2SPIR"), frame, s2,
                      "T2 SPIR", grid2, z_top, length, spacing2 - gap2, spacing2, (*key, "T2SPIR"),
                      extra={**common, "ScanningSequence": "SE", "SequenceVariant": "SK", "RepetitionTime": "1600",
                             "EchoTime": "80", "EchoNumbers": 1, "FlipAngle": "90"})
    names2 = [f"IMG-{s2:04d}-{k + 1:05d}" for k in range(n2)]
    write_series(root / "T2SPIR" / "DICOM_anon", [f"{s}.dcm" for s in names2], t2, meta, range(1, n2 + 1))
    if not job.test:
        write_ground(root / "T2SPIR" / "Ground", [f"{s}.png" for s in names2], mr_ground(ph2.organ))
    return n_t1 + n2


def write_patient(job: PatientJob, out_dir: Path) -> int:
    """Write one patient in ``OUT_DIR/.synthetic-tmp/`` (which no CHAOS reader looks at), then move it into place.

    A run killed half-way leaves no partial patient folder; returns the patient's slice count.
    """
    final = out_dir / job.folder
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / ".synthetic-tmp"
    scratch.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{job.modality}-{job.patient}-", dir=scratch))
    try:
        n = (write_ct_patient if job.modality == "CT" else write_mr_patient)(job, tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            scratch.rmdir()
        except OSError:          # another run is still using it
            pass
    return n


def generate(out_dir, patients: int, modality: str = "mr", seed: int = 0,
             size_range: tuple[int, int] = (192, 256), slices_range: tuple[int, int] = (26, 36),
             test_patients: int = 0, sequences: Sequence[str] = MR_SEQUENCES, workers: int = 1) -> Path:
    """Write a synthetic CHAOS cohort under ``out_dir`` (Train_Sets/, and Test_Sets/ when test_patients > 0).

    ``patients`` and ``test_patients`` count per modality; ``sequences`` picks the MR series written (a series'
    bytes do not depend on it); ``workers`` > 1 writes patients in that many processes (same bytes). Patient
    folders of the same ids are replaced, others are left alone. Raises ConfigError for unusable values (before
    writing anything), OSError when writing fails. Returns ``out_dir``.
    """
    spec = CohortSpec(int(patients), modality, int(seed), (int(size_range[0]), int(size_range[1])),
                      (int(slices_range[0]), int(slices_range[1])), int(test_patients), tuple(sequences))
    if int(workers) < 1:
        raise ConfigError(f"workers: {workers} must be at least 1")
    out = Path(out_dir)
    jobs = plan(spec)
    if int(workers) == 1 or len(jobs) == 1:
        for job in jobs:
            write_patient(job, out)
        return out
    # spawned, one core each, gone with this process (dlseg.workers): the caller (e.g. the trainer) may hold
    # OpenMP/OpenCV thread pools that fork does not copy safely
    with spawn_pool(min(int(workers), len(jobs))) as pool:
        for _ in pool.map(write_patient, jobs, [out] * len(jobs)):
            pass
    return out


# ----------------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(prog="python -m preprocess.synthetic",
                                 description="Write a synthetic cohort in the CHAOS layout (DICOM + Ground PNGs).")
    ap.add_argument("out_dir", type=Path, help="output folder (Train_Sets/ and Test_Sets/ are created in it)")
    ap.add_argument("--patients", type=int, required=True, help="training patients per modality")
    ap.add_argument("--modality", choices=MODALITIES, default="mr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, nargs=2, metavar=("MIN", "MAX"), default=(192, 256),
                    help="in-plane size range in pixels")
    ap.add_argument("--slices", type=int, nargs=2, metavar=("MIN", "MAX"), default=(26, 36),
                    help="slices per series range")
    ap.add_argument("--test-patients", type=int, default=0, help="unlabeled patients per modality (Test_Sets/)")
    ap.add_argument("--sequences", nargs="+", choices=MR_SEQUENCES, default=list(MR_SEQUENCES),
                    help="MR series to write (default: all)")
    return ap


def _error(message: str) -> None:
    """Print one error line (no traceback)."""
    from dlseg.console import err_console

    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 on success, 2 for unusable arguments, 1 when writing failed."""
    import time

    from dlseg.console import console, make_progress

    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:       # argparse printed its usage line; --help exits 0
        return 0 if e.code in (0, None) else 2
    try:
        spec = CohortSpec(args.patients, args.modality, args.seed, tuple(args.size), tuple(args.slices),
                          args.test_patients, tuple(args.sequences))
    except ConfigError as e:
        _error(str(e))
        return 2
    jobs = plan(spec)
    start, slices = time.perf_counter(), 0
    try:
        with make_progress(unit="patients", transient=True) as progress:
            task = progress.add_task("synthetic", total=len(jobs), info="")
            for job in jobs:
                progress.update(task, info=str(job.folder))
                slices += write_patient(job, args.out_dir)
                progress.advance(task)
    except OSError as e:
        _error(f"{e.filename or args.out_dir}: cannot write the cohort ({e.strerror or e})")
        return 1
    n_ct = sum(j.modality == "CT" for j in jobs)
    console.print(f"wrote {len(jobs)} patients ({n_ct} CT, {len(jobs) - n_ct} MR; "
                  f"{sum(j.test for j in jobs)} in Test_Sets), {slices} DICOM slices to {args.out_dir} "
                  f"in {time.perf_counter() - start:.1f} s", highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
