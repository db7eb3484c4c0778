"""Intensity statistics, intensity normalization and the invertible resize to training size.

Shared by preprocessing (which stores ``intensity_stats`` per case), training and prediction, so a model
sees exactly the same numbers at training and at prediction time. Everything here is vectorized numpy/OpenCV.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import cv2
import numpy as np

CT_BODY_HU = -500.0          # CT voxels above this are "body" for statistics
MR_BODY_FRACTION = 0.10      # MR voxels above this fraction of the 99th percentile are "body"


STATS_MAX_VOXELS = 2_000_000  # statistics use at most this many voxels (a fixed, deterministic stride)


HISTOGRAM_MAX_LEVELS = 1 << 20  # integer volumes spanning at most this many values take the histogram path


def body_threshold(modality: str, p99: Callable[[], float]) -> float:
    """Voxels above this are "body" (air excluded), for statistics only: fixed HU for CT, a fraction of the
    99th percentile for MR (``p99`` is called only then, so each caller computes it its own way)."""
    if modality.upper() == "CT":
        return CT_BODY_HU
    return MR_BODY_FRACTION * float(p99())


def hist_percentiles(levels: np.ndarray, counts: np.ndarray, q: list[float]) -> np.ndarray:
    """``np.percentile(values, q)`` (linear method) of the values ``levels`` (ascending) occurring ``counts`` times.

    The order statistics come from the cumulative counts instead of a partition of every voxel: O(levels).
    """
    n = int(counts.sum())
    cum = np.cumsum(counts)
    pos = np.asarray(q, dtype=np.float64) / 100.0 * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    a = levels[np.searchsorted(cum, lo, side="right")].astype(np.float64)
    b = levels[np.searchsorted(cum, np.minimum(lo + 1, n - 1), side="right")].astype(np.float64)
    t = pos - lo
    return np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)   # numpy's lerp, both halves


def _stats_from_histogram(sample: np.ndarray, modality: str) -> tuple[np.ndarray, float, float, float] | None:
    """(percentiles, clipped mean, clipped std, body fraction) of an integer sample via its histogram; None when
    its values span too many levels for one."""
    lo, hi = int(sample.min()), int(sample.max())
    if hi - lo >= HISTOGRAM_MAX_LEVELS:
        return None
    values = sample.astype(np.intp)   # widen before shifting: int16 - (-32768) overflows int16
    counts = np.bincount(values - lo if lo else values, minlength=hi - lo + 1)
    levels = np.arange(lo, hi + 1, dtype=np.int64)
    present = counts > 0
    levels, counts = levels[present], counts[present]
    body = levels > body_threshold(modality, lambda: hist_percentiles(levels, counts, [99.0])[0])
    if int(counts[body].sum()) >= 16:
        levels, counts = levels[body], counts[body]
    n = int(counts.sum())
    p = hist_percentiles(levels, counts, [0.5, 1, 50, 99, 99.5])
    v = np.clip(levels.astype(np.float64), p[0], p[4])
    mean = float((v * counts).sum() / n)
    std = float(np.sqrt(((v - mean) ** 2 * counts).sum() / n))
    return p, mean, std, n / sample.size


def intensity_stats(image: np.ndarray, modality: str) -> dict[str, float]:
    """Percentiles, mean and std inside the body (mean/std of values clipped to [p0.5, p99.5]).

    Large volumes are subsampled with a fixed voxel stride (deterministic: the same volume always gives the same
    numbers), which keeps memory near one float32 copy of the sample rather than several of the whole case.
    Integer volumes (DICOM's usual int16) take their histogram rather than partitioning every voxel: the same
    numbers (to float rounding) in a fraction of the time.
    """
    img = np.asarray(image)
    if img.size == 0:
        raise ValueError("intensity_stats: empty image")
    flat = img.reshape(-1)
    stride = max(1, int(np.ceil(flat.size / STATS_MAX_VOXELS)))
    raw = flat[::stride]
    fast = _stats_from_histogram(raw, modality) if np.issubdtype(raw.dtype, np.integer) else None
    if fast is not None:
        p, mean, std, fraction = fast
    else:
        sample = raw.astype(np.float32)
        body = sample[sample > body_threshold(modality, lambda: np.percentile(sample, 99.0))]
        if body.size < 16:
            body = sample
        p = np.percentile(body, [0.5, 1, 50, 99, 99.5])
        clipped = np.clip(body, p[0], p[4])
        mean, std = float(clipped.mean(dtype=np.float64)), float(clipped.std(dtype=np.float64))
        fraction = body.size / sample.size
    return {
        "p0_5": float(p[0]), "p1": float(p[1]), "p50": float(p[2]), "p99": float(p[3]), "p99_5": float(p[4]),
        "mean": mean, "std": std, "min": float(img.min()), "max": float(img.max()), "body_fraction": float(fraction),
    }


@dataclass(frozen=True)
class NormConfig:
    """How intensities become network inputs. Saved with an exported model."""

    mr: str = "zscore"            # MR: clip to [p_low, p_high] then z-score inside the body
    ct_window: tuple[float, float] = (-150.0, 250.0)  # CT: HU window mapped to [-1, 1]
    p_low: str = "p0_5"
    p_high: str = "p99_5"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ct_window"] = list(self.ct_window)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NormConfig":
        d = dict(d)
        if "ct_window" in d:
            d["ct_window"] = tuple(float(x) for x in d["ct_window"])
        return cls(**d)


def normalize(image: np.ndarray, stats: dict[str, float], modality: str, cfg: NormConfig = NormConfig()) -> np.ndarray:
    """Scanner values → float32 network input (works on a slice or a volume); a new array, the input untouched.

    In place on one float32 copy: fresh arrays per step cost more than the arithmetic on CT-sized volumes.
    """
    img = np.array(image, dtype=np.float32)
    if modality.upper() == "CT":
        lo, hi = cfg.ct_window
        center, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    else:
        lo, hi = float(stats[cfg.p_low]), float(stats[cfg.p_high])
        center, half = float(stats["mean"]), max(float(stats["std"]), 1e-6)
    np.clip(img, lo, hi, out=img)
    img -= np.float32(center)
    img /= np.float32(half)
    return img


@dataclass(frozen=True)
class ResizeMapping:
    """Pad a (H, W) slice to a centred square, then resize to ``size``; exactly invertible in geometry.

    ``forward`` takes the original slice to the training grid; ``inverse`` takes a map on the training grid
    (probabilities or labels) back to the original (H, W).
    """

    height: int
    width: int
    size: int

    @property
    def side(self) -> int:
        return max(self.height, self.width)

    @property
    def pad(self) -> tuple[int, int]:
        """(top, left) padding added before resizing."""
        return (self.side - self.height) // 2, (self.side - self.width) // 2

    def forward(self, arr: np.ndarray, is_mask: bool = False, fill: float = 0.0) -> np.ndarray:
        """(H, W) or (C, H, W) → (size, size) or (C, size, size)."""
        if arr.ndim == 3:
            return np.stack([self.forward(a, is_mask, fill) for a in arr])
        top, left = self.pad
        if self.side != self.height or self.side != self.width:
            arr = cv2.copyMakeBorder(
                arr, top, self.side - self.height - top, left, self.side - self.width - left,
                cv2.BORDER_CONSTANT, value=fill,
            )
        if self.side == self.size:
            return np.ascontiguousarray(arr)
        interp = cv2.INTER_NEAREST if is_mask else cv2.INTER_AREA if self.side > self.size else cv2.INTER_LINEAR
        return cv2.resize(arr, (self.size, self.size), interpolation=interp)

    def inverse(self, arr: np.ndarray, is_mask: bool = False) -> np.ndarray:
        """(size, size) or (C, size, size) on the training grid → original (H, W) or (C, H, W)."""
        if arr.ndim == 3:
            return np.stack([self.inverse(a, is_mask) for a in arr])
        if self.side != self.size:
            interp = cv2.INTER_NEAREST if is_mask else cv2.INTER_LINEAR
            arr = cv2.resize(arr, (self.side, self.side), interpolation=interp)
        top, left = self.pad
        return np.ascontiguousarray(arr[top:top + self.height, left:left + self.width])

    def to_dict(self) -> dict[str, int]:
        return {"height": self.height, "width": self.width, "size": self.size}


def prepare_volume(
    image: np.ndarray, stats: dict[str, float], modality: str, size: int, cfg: NormConfig = NormConfig()
) -> tuple[np.ndarray, ResizeMapping]:
    """Scanner volume (Z, H, W) → network inputs (Z, size, size) float32, and the mapping back.

    The one path from stored/decoded voxels to model inputs, used by training and prediction alike:
    normalize, then pad (with the normalized value of the darkest voxel) and resize.
    """
    vol = normalize(image, stats, modality, cfg)
    mapping = ResizeMapping(int(vol.shape[1]), int(vol.shape[2]), int(size))
    fill = float(vol.min()) if vol.size else 0.0
    out = np.empty((vol.shape[0], size, size), dtype=np.float32)
    for z in range(vol.shape[0]):
        out[z] = mapping.forward(vol[z], fill=fill)
    return out, mapping


def prepare_mask(mask: np.ndarray, mapping: ResizeMapping) -> np.ndarray:
    """Label volume (Z, H, W) uint8 → (Z, size, size) uint8 on the training grid (nearest neighbour)."""
    out = np.empty((mask.shape[0], mapping.size, mapping.size), dtype=np.uint8)
    for z in range(mask.shape[0]):
        out[z] = mapping.forward(mask[z], is_mask=True)
    return out
