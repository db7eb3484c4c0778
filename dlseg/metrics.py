"""Volume metrics with the CHAOS challenge definitions: Dice, RAVD, ASSD, MSSD, plus HD95, IoU and counts.

The reference is the official evaluation code, repository ``emrekavur/CHAOS-evaluation``,
``Python/CHAOSmetrics.py``. Its definitions, reproduced here exactly:

* ``DICE = 2 |R ∩ S| / (|R| + |S|)``.
* ``RAVD = |(|R| - |S|)| / |R| * 100`` — the *absolute* relative volume difference, in percent.
* Surface of a mask ``V``: ``V ^ binary_erosion(V, generate_binary_structure(3, 1), border_value=1)``, i.e. the
  mask minus its erosion by the 6-connected 3D cross. ``border_value=1``: outside the volume counts as
  foreground, so a mask touching the edge of the volume has **no** surface along that edge (no zero padding).
* Surface voxels are mapped to millimetres with the DICOM geometry (pixel spacing, orientation, and the mean
  slice step ``(T_last - T_first) / (N - 1)`` over the files sorted by name); for each surface voxel of one
  mask the distance to the nearest surface voxel of the other is found (KD-tree), in both directions.
* ``ASSD = (Σ d(S→R) + Σ d(R→S)) / (n_S + n_R)``; ``MSSD = max`` over both directions (the Hausdorff
  distance between the two surfaces).

Here surface voxels become points ``(z, y, x) · spacing`` with ``spacing = (slice step, row spacing, column
spacing)`` in mm, and the nearest neighbours come from a KD-tree (``scipy.spatial.cKDTree``), as in the official
code. The official matrix maps the same indices through orthonormal direction cosines, so the distances are
identical whenever the slice step is perpendicular to the image plane (axial stacks without gantry tilt: the
CHAOS data). A KD-tree rather than ``distance_transform_edt(~surface, sampling=spacing)`` (which gives the same
numbers, see the tests) because it needs memory only for the surface points, not for the whole volume, and is
faster on large volumes.

Not in the official Python code (which divides by zero, or fails in the KD-tree, on an empty mask), defined here:

* ``HD95 = max(P95(d(S→R)), P95(d(R→S)))`` (the MedPy/MONAI convention, numpy's linear percentile).
* ``IoU = |R ∩ S| / |R ∪ S|``.
* Empty masks. A mask whose surface is empty (an empty mask, or one filling the whole volume) has no
  distances; like the official MATLAB code (``Matlab/CHAOSMetrics.m``: "highest possible distance if any
  problem occurs") the distances are then the worst possible value, the volume diagonal
  ``D = sqrt(Σ (shape_i · spacing_i)²)`` in mm — except when both surfaces are empty (nothing to miss: 0):

  ============================  =====  =====  =========  ==================
  case                          Dice   IoU    RAVD (%)   ASSD, MSSD, HD95
  ============================  =====  =====  =========  ==================
  both empty                    1      1      0          0
  truth empty, prediction not   0      0      inf        D
  prediction empty, truth not   0      0      100        D
  ============================  =====  =====  =========  ==================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

#: Keys of :func:`case_metrics`, in report order (CHAOS metrics first).
METRIC_KEYS = ("dice", "ravd", "assd", "mssd", "hd95", "iou")

_CROSS_3D = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class Confusion:
    """Voxel counts of a binary prediction against the truth."""

    tp: int
    fp: int
    fn: int
    tn: int


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as boolean (Z,H,W) arrays of the same shape, or ValueError."""
    p = np.asarray(pred).astype(bool, copy=False)
    t = np.asarray(truth).astype(bool, copy=False)
    if p.ndim != 3 or p.shape != t.shape:
        raise ValueError(f"masks must be 3D (Z,H,W) of the same shape, got {p.shape} and {t.shape}")
    return p, t


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Spacing as three positive finite floats (z, y, x) in mm, or ValueError."""
    s = tuple(float(v) for v in spacing)
    if len(s) != 3 or not all(np.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing!r}")
    return s  # type: ignore[return-value]


def confusion(pred: np.ndarray, truth: np.ndarray) -> Confusion:
    """True/false positive/negative voxel counts."""
    p, t = _check_pair(pred, truth)
    tp = int(np.count_nonzero(p & t))
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    return Confusion(tp=tp, fp=n_p - tp, fn=n_t - tp, tn=p.size - n_p - n_t + tp)


def _dice_from(c: Confusion) -> float:
    """Dice from counts; 1.0 when both masks are empty."""
    denom = 2 * c.tp + c.fp + c.fn
    return 1.0 if denom == 0 else 2.0 * c.tp / denom


def _iou_from(c: Confusion) -> float:
    """IoU from counts; 1.0 when both masks are empty."""
    denom = c.tp + c.fp + c.fn
    return 1.0 if denom == 0 else c.tp / denom


def _ravd_from(c: Confusion) -> float:
    """CHAOS RAVD (absolute, %) from counts; 0 when both empty, inf when only the truth is empty."""
    n_t, n_p = c.tp + c.fn, c.tp + c.fp
    if n_t == 0:
        return 0.0 if n_p == 0 else float("inf")
    return abs(n_t - n_p) / n_t * 100.0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Sørensen–Dice coefficient ``2|P∩T| / (|P|+|T|)``; 1.0 when both are empty."""
    return _dice_from(confusion(pred, truth))


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard index ``|P∩T| / |P∪T|``; 1.0 when both are empty."""
    return _iou_from(confusion(pred, truth))


def ravd(pred: np.ndarray, truth: np.ndarray) -> float:
    """CHAOS relative absolute volume difference ``|(|T|-|P|)| / |T| * 100`` (%).

    0 when both are empty; ``inf`` when the truth is empty and the prediction is not.
    """
    return _ravd_from(confusion(pred, truth))


def surface(mask: np.ndarray) -> np.ndarray:
    """CHAOS surface voxels: the mask minus its 6-connected erosion, outside the volume counting as foreground."""
    m = np.asarray(mask).astype(bool, copy=False)
    return m & ~ndimage.binary_erosion(m, structure=_CROSS_3D, border_value=1)


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Smallest box holding every True voxel of a non-empty mask, grown by ``margin`` (clipped to the volume)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _surface_points(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Surface voxel centres in mm, (n, 3) as (z, y, x) · spacing; erodes only the mask's box plus one voxel.

    The one-voxel margin is background inside the volume and the volume edge itself where the box touches it,
    so ``border_value=1`` on the crop gives the same surface as on the whole volume.
    """
    if not mask.any():
        return np.zeros((0, 3))
    box = _bbox(mask, margin=1)
    start = np.array([b.start for b in box])
    return (np.argwhere(surface(mask[box])) + start) * np.asarray(spacing)


def _nearest(pts_a: np.ndarray, pts_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each point of a to the nearest of b, and from each of b to the nearest of a."""
    a_to_b, _ = cKDTree(pts_b).query(pts_a)
    b_to_a, _ = cKDTree(pts_a).query(pts_b)
    return a_to_b, b_to_a


def volume_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the volume's diagonal: the worst possible surface distance."""
    s = _check_spacing(spacing)
    return float(np.sqrt(sum((n * d) ** 2 for n, d in zip(shape, s))))


def _distance_metrics(p: np.ndarray, t: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """ASSD, MSSD and HD95 (mm) with the documented values for empty surfaces."""
    s = _check_spacing(spacing)
    pts_p, pts_t = _surface_points(p, s), _surface_points(t, s)
    if len(pts_p) == 0 or len(pts_t) == 0:
        value = 0.0 if len(pts_p) == len(pts_t) else volume_diagonal(p.shape, s)
        return {"assd": value, "mssd": value, "hd95": value}
    d_pt, d_tp = _nearest(pts_p, pts_t)
    return {
        "assd": float((d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size)),
        "mssd": float(max(d_pt.max(), d_tp.max())),
        "hd95": float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))),
    }


def assd(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """CHAOS average symmetric surface distance (mm); 0 when both are empty, the volume diagonal when one is."""
    return _distance_metrics(*_check_pair(pred, truth), spacing)["assd"]


def mssd(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """CHAOS maximum symmetric surface distance = surface Hausdorff distance (mm); empty masks as ``assd``."""
    return _distance_metrics(*_check_pair(pred, truth), spacing)["mssd"]


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric surface distance ``max(P95(P→T), P95(T→P))`` (mm); empty masks as ``assd``."""
    return _distance_metrics(*_check_pair(pred, truth), spacing)["hd95"]


def case_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float | int]:
    """All metrics of one case: ``METRIC_KEYS`` plus confusion counts and voxel counts."""
    p, t = _check_pair(pred, truth)
    c = confusion(p, t)
    out: dict[str, float | int] = {"dice": _dice_from(c), "ravd": _ravd_from(c)}
    out.update(_distance_metrics(p, t, spacing))
    out["iou"] = _iou_from(c)
    out.update(asdict(c))
    out["voxels_pred"] = c.tp + c.fp
    out["voxels_truth"] = c.tp + c.fn
    return out
