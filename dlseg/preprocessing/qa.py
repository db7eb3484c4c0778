"""Quality-assurance pictures: a few slices of a case with the mask contours drawn on them.

Mis-pairing raises no error and looks plausible in numbers; a picture per case catches it at a glance.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from dlseg.fileio import atomic_write

QA_SLICES = 4
TILE = 256
# BGR contour colour per label: liver, right kidney, left kidney, spleen
COLORS = {1: (0, 255, 0), 2: (255, 128, 0), 3: (0, 128, 255), 4: (255, 0, 255)}


def qa_dir_for(out: str | os.PathLike) -> Path:
    """``OUT.zarr`` → ``OUT.qa`` (a sibling folder of the store)."""
    out = Path(out)
    return out.with_suffix(".qa") if out.suffix == ".zarr" else out.with_name(out.name + ".qa")


def pick_slices(mask: np.ndarray | None, depth: int, count: int = QA_SLICES) -> list[int]:
    """Evenly spaced slices, among those with foreground when there is a mask with any."""
    fg = np.nonzero(mask.reshape(depth, -1).any(axis=1))[0] if mask is not None else np.array([], int)
    pool = fg if fg.size else np.arange(depth)
    idx = np.linspace(0, pool.size - 1, num=min(count, pool.size)).round().astype(int)
    return sorted({int(pool[i]) for i in idx})


def to_gray8(slice_: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Scanner values → 8-bit gray between ``lo`` and ``hi``."""
    scaled = (np.clip(slice_.astype(np.float32), lo, hi) - lo) / max(hi - lo, 1e-6) * 255.0
    return scaled.astype(np.uint8)


def render_tile(image: np.ndarray, mask: np.ndarray | None, lo: float, hi: float, label: str) -> np.ndarray:
    """One slice as a TILE×TILE BGR picture with contours and its index."""
    bgr = cv2.cvtColor(to_gray8(image, lo, hi), cv2.COLOR_GRAY2BGR)
    if mask is not None:
        for value, color in COLORS.items():
            contours, _ = cv2.findContours((mask == value).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(bgr, contours, -1, color, 1)
    scale = TILE / max(bgr.shape[:2])
    bgr = cv2.resize(bgr, (max(1, round(bgr.shape[1] * scale)), max(1, round(bgr.shape[0] * scale))),
                     interpolation=cv2.INTER_NEAREST)
    tile = np.zeros((TILE, TILE, 3), np.uint8)
    tile[: bgr.shape[0], : bgr.shape[1]] = bgr
    cv2.putText(tile, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def write_qa(path: str | os.PathLike, image: np.ndarray, mask: np.ndarray | None, stats: dict, modality: str,
             case_id: str) -> Path:
    """Write the QA PNG for one case (temporary name, then rename); returns its path."""
    lo, hi = ((-150.0, 250.0) if modality.upper() == "CT" else (stats["p1"], stats["p99"]))
    tiles = [
        render_tile(image[z], None if mask is None else mask[z], lo, hi, f"{case_id} z={z}")
        for z in pick_slices(mask, image.shape[0])
    ]
    ok, png = cv2.imencode(".png", np.concatenate(tiles, axis=1))
    if not ok:
        raise OSError(f"cannot encode {path}")
    return atomic_write(path, png.tobytes())
