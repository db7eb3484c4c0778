"""Ground-truth PNGs → a label volume, through one 256-entry lookup table (vectorized, no pixel loops).

CHAOS gray values: CT liver 255; MR liver 63 (accepted 55–70), right kidney 126 (110–135),
left kidney 189 (175–200), spleen 252 (240–255).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from dlseg.errors import CaseError

LABEL_NAMES = {0: "background", 1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
# label -> the gray value CHAOS ground truth uses, per modality (what predictions are written with)
GRAY_VALUES = {
    "CT": {1: 255},
    "MR": {1: 63, 2: 126, 3: 189, 4: 252},
}
# label -> inclusive gray-value range accepted when reading, per modality
GRAY_RANGES = {
    "CT": {1: (255, 255)},
    "MR": {1: (55, 70), 2: (110, 135), 3: (175, 200), 4: (240, 255)},
}


def label_map(labels: str) -> dict[int, str]:
    """Label value → organ name for ``liver`` (0/1) or ``organs`` (0..4)."""
    return {k: v for k, v in LABEL_NAMES.items() if labels == "organs" or k <= 1}


def lookup_table(modality: str, labels: str) -> np.ndarray:
    """256-entry uint8 table from PNG gray value to label."""
    lut = np.zeros(256, dtype=np.uint8)
    for label, (lo, hi) in GRAY_RANGES[modality.upper()].items():
        if labels == "organs" or label == 1:
            lut[lo:hi + 1] = label
    return lut


def read_png(path: Path) -> np.ndarray:
    """One 8-bit grayscale PNG as (H, W) uint8, with one-line errors."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise CaseError(path, "cannot read PNG (missing, truncated or not a PNG)")
    if img.ndim != 2 or img.dtype != np.uint8:
        shape = "x".join(map(str, img.shape))
        raise CaseError(path, f"expected an 8-bit grayscale PNG, got {shape} {img.dtype}")
    return img


def read_masks(files: list[str | os.PathLike], modality: str, labels: str) -> np.ndarray:
    """Stack ground-truth PNGs (slice order) into a (Z, H, W) uint8 label volume."""
    files = [Path(f) for f in files]
    if not files:
        raise CaseError("<ground>", "no ground-truth PNGs")
    first = read_png(files[0])
    gray = np.empty((len(files),) + first.shape, dtype=np.uint8)
    gray[0] = first
    for k, path in enumerate(files[1:], start=1):
        img = read_png(path)
        if img.shape != first.shape:
            raise CaseError(path, f"PNG is {img.shape[0]}x{img.shape[1]} but {files[0].name} is "
                                  f"{first.shape[0]}x{first.shape[1]}")
        gray[k] = img
    return lookup_table(modality, labels)[gray]
