"""Per-case measurements of a prediction and the rules that flag implausible cases (pure functions).

Measured in the writer threads (``measure``, ``mean_foreground_probability``) and kept in each case's record;
the rules (``FlagConfig``) are applied when the summary is written, so changing a threshold needs no new prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from scipy import ndimage

from dlseg.config import option

LIVER = 1                                   # the liver's class label (outputs.LIVER)
MEASURE_FIELDS = ("components", "largest_share", "mean_probability", "first_slice_share", "last_slice_share")


@dataclass
class FlagConfig:
    """Plausible ranges; a case outside any of them is flagged with the rule that fired (adult abdominal scans)."""

    liver_min_ml: float = option("smallest plausible liver volume (mL)", 600.0)
    liver_max_ml: float = option("largest plausible liver volume (mL)", 3500.0)
    min_largest_share: float = option("the largest connected piece holds at least this share of the liver", 0.9)
    min_mean_probability: float = option("mean probability over the predicted foreground at least", 0.7)
    cut_off_share: float = option("flag liver on the first or last slice covering at least this share of the "
                                  "largest liver slice: the scan may cut the liver off (above 1: never)", 0.1)


def components(mask: np.ndarray) -> tuple[int, float | None]:
    """Number of 3D connected pieces (26-connectivity) and the largest one's share of the voxels (None if empty)."""
    labeled, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return 0, None
    sizes = np.bincount(labeled.ravel())[1:]
    return int(n), float(sizes.max() / sizes.sum())


def end_slice_shares(mask: np.ndarray) -> tuple[float, float]:
    """Liver area on the first and on the last slice as a share of the largest slice's (0 when empty)."""
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    top = max(int(areas.max(initial=0)), 1)
    return float(areas[0] / top), float(areas[-1] / top)


def mean_foreground_probability(probs: np.ndarray, threshold: float) -> float | None:
    """Mean probability of the predicted class over the predicted foreground of (Z, K, H, W) probabilities."""
    if probs.shape[1] == 1:
        p = probs[:, 0]
        fg = p > threshold
    else:
        p = probs.max(axis=1)
        fg = probs.argmax(axis=1) != 0
    return float(p[fg].mean()) if fg.any() else None


def measure(labels: np.ndarray, mean_probability: float | None) -> dict[str, Any]:
    """The record's ``measures`` of a (Z, H, W) label volume."""
    liver = labels == LIVER
    n, share = components(liver)
    first, last = end_slice_shares(liver)
    return {"components": n, "largest_share": None if share is None else round(share, 4),
            "mean_probability": None if mean_probability is None else round(mean_probability, 4),
            "first_slice_share": round(first, 4), "last_slice_share": round(last, 4)}


def rules_fired(row: dict[str, Any], cfg: FlagConfig) -> list[str]:
    """The rules a predicted case's summary row breaks (measures a record lacks are not judged)."""
    volume = row.get("liver_volume_ml")
    if volume is None:
        return []
    if volume == 0:
        return ["empty prediction (no liver)"]
    out = []
    if volume < cfg.liver_min_ml:
        out.append(f"liver {volume:.0f} mL < {cfg.liver_min_ml:g} mL")
    if volume > cfg.liver_max_ml:
        out.append(f"liver {volume:.0f} mL > {cfg.liver_max_ml:g} mL")
    share = row.get("largest_share")
    if share is not None and share < cfg.min_largest_share:
        out.append(f"largest piece {100 * share:.0f}% of {row.get('components')} < {100 * cfg.min_largest_share:.0f}%")
    prob = row.get("mean_probability")
    if prob is not None and prob < cfg.min_mean_probability:
        out.append(f"mean probability {prob:.2f} < {cfg.min_mean_probability:g}")
    ends = [name for name in ("first", "last")
            if row.get(f"{name}_slice_share") is not None and row[f"{name}_slice_share"] >= cfg.cut_off_share]
    if ends:
        out.append(f"liver on the {' and '.join(ends)} slice{'s' if len(ends) == 2 else ''} (cut off?)")
    return out


def row_measures(record: dict[str, Any]) -> dict[str, Any]:
    """The summary columns of a record's measures (None where an older record has none)."""
    measures = record.get("measures") or {}
    return {k: measures.get(k) for k in MEASURE_FIELDS}


def flag_rows(rows: Iterable[dict[str, Any]], cfg: FlagConfig) -> int:
    """Set each row's ``flags`` (rules joined by "; "); returns how many rows are flagged."""
    n = 0
    for row in rows:
        fired = rules_fired(row, cfg) if row.get("status") in ("predicted", "reused") else []
        row["flags"] = "; ".join(fired)
        n += bool(fired)
    return n
