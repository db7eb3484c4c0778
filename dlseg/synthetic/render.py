"""Phantom → stored pixel values: per-patient contrast, texture, blur, bias field, ghost and noise; Ground masks.

T1 in/out phase come from separate water and fat signals: in = W + F, out = |W − F|, which darkens fat-water
boundaries (the "India ink" ring) and fatty livers. Liver, spleen, bowel and stomach wall overlap in intensity on
purpose, so no threshold segments the liver.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dlseg.sources.masks import GRAY_VALUES
from dlseg.synthetic.anatomy import CT_HU, ORGAN_LIVER, T, T1_FAT, T1_WATER, T2_SIGNAL, TEXTURE, Anatomy, Grid, RBFField
from dlseg.synthetic.phantom import Phantom


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
    """Organ labels → CHAOS MR gray values (organ codes are the CHAOS label values)."""
    lut = np.zeros(len(GRAY_VALUES["MR"]) + 1, np.uint8)
    for label, gray in GRAY_VALUES["MR"].items():
        lut[label] = gray
    return lut[organ]


def ct_ground(organ: np.ndarray) -> np.ndarray:
    """Organ labels → CHAOS CT liver mask."""
    return np.where(organ == ORGAN_LIVER, GRAY_VALUES["CT"][ORGAN_LIVER], 0).astype(np.uint8)
