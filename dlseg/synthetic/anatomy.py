"""A synthetic patient in continuous space: tissue classes, smooth implicit shapes and the drawn abdomen.

In-plane coordinates are millimetres around the body centre (``p, q`` are those divided by the body half-axes;
image left = patient right, image top = anterior) and ``t`` in [0, 1] runs head→feet over the scanned range, so
the same patient can be sampled on the different grids of its series (T1-DUAL and T2-SPIR differ, as in CHAOS).
Organs are unions of ellipsoids plus a smooth random field of Gaussian radial basis functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from functools import partial
import numpy as np


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

ORGAN_NONE, ORGAN_LIVER, ORGAN_RK, ORGAN_LK, ORGAN_SPLEEN = 0, 1, 2, 3, 4   # the CHAOS label values


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
