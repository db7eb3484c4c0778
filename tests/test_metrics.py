"""CHAOS metrics against the official definitions, computed independently here, and values known by hand.

The reference below re-implements ``emrekavur/CHAOS-evaluation`` ``Python/CHAOSmetrics.py`` without scipy:
surface = mask XOR its erosion by the 6-neighbour cross with the outside counting as foreground
(``border_value=1``); voxel indices → millimetres through the official DICOM matrix
``[X·ΔI, Y·ΔJ, (T1-TN)/(1-N), T1]`` applied to ``(row, col, slice)``; nearest neighbours by all-pairs distances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from dlseg import metrics


# ---------------------------------------------------------------- independent reference (official definitions)
def ref_surface(mask: np.ndarray) -> np.ndarray:
    """Mask XOR its 6-connected erosion, the outside of the volume counting as foreground (numpy only)."""
    padded = np.pad(mask, 1, constant_values=True)
    eroded = mask.copy()
    inner = (slice(1, -1),) * 3
    for axis in range(3):
        for shift in (-1, 1):
            eroded &= np.roll(padded, shift, axis=axis)[inner]
    return mask ^ eroded


def official_matrix(n_slices, pixel_spacing, orientation=(1, 0, 0, 0, 1, 0), first=(0.0, 0.0, 0.0), normal=None):
    """The official 4x4 index→patient matrix for a stack of n_slices with the given slice step vector."""
    X, Y = np.array(orientation[:3], float), np.array(orientation[3:], float)
    T1 = np.array(first, float)
    TN = T1 + (n_slices - 1) * np.array(normal, float)
    M = np.zeros((4, 4))
    M[:3, 0] = X * pixel_spacing[0]
    M[:3, 1] = Y * pixel_spacing[1]
    M[:3, 2] = (T1 - TN) / (1 - n_slices)
    M[:3, 3] = T1
    M[3, 3] = 1
    return M


def ref_real_points(mask: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Surface voxels of mask → patient coordinates, as the official transformToRealCoordinates does."""
    z, r, c = np.nonzero(ref_surface(mask))
    P = np.stack([r, c, z, np.ones_like(z)]).astype(float)
    return (M @ P)[:3].T


def ref_distances(pred, truth, M):
    """All-pairs nearest distances (seg→ref, ref→seg) in mm."""
    a, b = ref_real_points(pred, M), ref_real_points(truth, M)
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    return d.min(axis=1), d.min(axis=0)


def ref_metrics(pred, truth, M):
    """Official DICE, RAVD, ASSD, MSSD (+ HD95 by the documented convention)."""
    d1, d2 = ref_distances(pred, truth, M)
    return {
        "dice": 2 * (pred & truth).sum() / (pred.sum() + truth.sum()),
        "ravd": abs(truth.sum() - pred.sum()) / truth.sum() * 100,
        "assd": (d1.sum() + d2.sum()) / (len(d1) + len(d2)),
        "mssd": np.concatenate([d1, d2]).max(),
        "hd95": max(np.percentile(d1, 95), np.percentile(d2, 95)),
    }


def geometry(spacing, n_slices, angle_deg=0.0, descending=False):
    """Official matrix for spacing (z, row, col); in-plane rotation by angle; slices going down if descending."""
    a = math.radians(angle_deg)
    orient = (math.cos(a), math.sin(a), 0.0, -math.sin(a), math.cos(a), 0.0)
    step = (0.0, 0.0, -spacing[0] if descending else spacing[0])
    return official_matrix(n_slices, spacing[1:], orient, first=(-185.0, -98.0, 1690.5), normal=step)


def box(shape, z, y, x):
    """Boolean volume with one True box given by (start, stop) per axis."""
    m = np.zeros(shape, bool)
    m[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return m


def ball(shape, center, radius_mm, spacing):
    """Voxels whose centre lies within radius_mm of center (voxel units) in physical space."""
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, center, spacing)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2


def blob(shape, seed, threshold):
    """Smooth random blob (touches the volume border for some seeds)."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) > threshold


def check_against_official(pred, truth, spacing, angle=0.0, descending=False):
    """case_metrics equals the official definitions to 1e-9 (far inside the required three decimals)."""
    ref = ref_metrics(pred, truth, geometry(spacing, pred.shape[0], angle, descending))
    got = metrics.case_metrics(pred, truth, spacing)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    return got


# ---------------------------------------------------------------- reference sanity
def test_reference_surface_equals_scipy_erosion_with_border_value_1():
    m = blob((9, 12, 11), 3, 0.0)
    st = ndimage.generate_binary_structure(3, 1)
    assert np.array_equal(ref_surface(m), m ^ ndimage.binary_erosion(m, structure=st, border_value=1))
    assert np.array_equal(metrics.surface(m), ref_surface(m))


def test_rotated_geometry_keeps_distances():
    p, t = blob((6, 14, 14), 1, 0.05), blob((6, 14, 14), 2, 0.05)
    d_plain = ref_distances(p, t, geometry((2.5, 0.7, 0.7), 6))
    d_rot = ref_distances(p, t, geometry((2.5, 0.7, 0.7), 6, angle_deg=30, descending=True))
    np.testing.assert_allclose(d_plain[0], d_rot[0], atol=1e-9)
    check_against_official(p, t, (2.5, 0.7, 0.7), angle=30, descending=True)   # and so do ours, from spacing alone


# ---------------------------------------------------------------- known by hand
def test_offset_cubes_dice_iou_by_counting():
    shape = (10, 10, 10)
    truth = box(shape, (2, 6), (2, 6), (2, 6))           # 64 voxels
    pred = box(shape, (2, 6), (2, 6), (3, 7))            # shifted 1 in x: overlap 4*4*3 = 48
    assert metrics.dice(pred, truth) == pytest.approx(96 / 128)
    assert metrics.iou(pred, truth) == pytest.approx(48 / 80)
    assert metrics.confusion(pred, truth) == metrics.Confusion(tp=48, fp=16, fn=16, tn=1000 - 80)
    check_against_official(pred, truth, (1.0, 1.0, 1.0))


def test_ravd_is_absolute_percent():
    shape = (8, 8, 8)
    truth = box(shape, (0, 4), (0, 4), (0, 4))           # 64
    smaller = box(shape, (0, 3), (0, 4), (0, 4))         # 48
    larger = box(shape, (0, 5), (0, 4), (0, 4))          # 80
    assert metrics.ravd(smaller, truth) == pytest.approx(25.0)
    assert metrics.ravd(larger, truth) == pytest.approx(25.0)


def test_slab_shifted_one_slice_anisotropic():
    # Slabs fill y and x: with the outside counting as foreground their surface is only the top and bottom
    # planes. Truth z∈[2,5) has surface planes 2 and 4, prediction z∈[3,6) planes 3 and 5: every surface
    # voxel is exactly one slice (2.5 mm) from the other surface.
    shape, spacing = (8, 5, 6), (2.5, 0.7, 0.7)
    truth = box(shape, (2, 5), (0, 5), (0, 6))
    pred = box(shape, (3, 6), (0, 5), (0, 6))
    assert np.array_equal(np.nonzero(metrics.surface(truth).any(axis=(1, 2)))[0], [2, 4])
    got = check_against_official(pred, truth, spacing)
    assert got["dice"] == pytest.approx(2 / 3)
    assert got["ravd"] == 0
    assert (got["assd"], got["mssd"], got["hd95"]) == pytest.approx((2.5, 2.5, 2.5))


def test_slab_shifted_one_column_anisotropic():
    shape, spacing = (4, 5, 9), (2.5, 0.7, 0.7)
    truth = box(shape, (0, 4), (0, 5), (2, 5))
    pred = box(shape, (0, 4), (0, 5), (3, 6))
    got = check_against_official(pred, truth, spacing)
    assert (got["assd"], got["mssd"]) == pytest.approx((0.7, 0.7))


def test_cube_shifted_one_slice_anisotropic():
    shape, spacing = (10, 10, 10), (2.5, 0.7, 0.7)
    truth = box(shape, (2, 6), (2, 6), (2, 6))
    pred = box(shape, (3, 7), (2, 6), (2, 6))
    got = check_against_official(pred, truth, spacing, angle=30, descending=True)
    # Farthest: the top face of pred (z=6) and bottom face of truth (z=2) are one slice from the other surface.
    assert got["mssd"] == pytest.approx(2.5)
    assert 0 < got["assd"] < 2.5
    assert got["dice"] == pytest.approx(2 * 48 / 128)


def test_concentric_spheres_distance_is_radius_difference():
    shape, spacing = (25, 25, 25), (1.0, 1.0, 1.0)
    inner = ball(shape, (12, 12, 12), 6.0, spacing)
    outer = ball(shape, (12, 12, 12), 9.0, spacing)
    got = check_against_official(inner, outer, spacing)
    assert got["assd"] == pytest.approx(3.0, abs=0.5)
    assert 3.0 <= got["mssd"] <= 4.0


def test_concentric_spheres_anisotropic_mm():
    spacing = (2.0, 0.8, 0.8)
    shape = (13, 33, 33)
    inner = ball(shape, (6, 16, 16), 6.0, spacing)
    outer = ball(shape, (6, 16, 16), 10.0, spacing)
    got = check_against_official(inner, outer, spacing)
    assert got["assd"] == pytest.approx(4.0, abs=1.0)


def test_identical_masks():
    m = blob((8, 16, 16), 5, 0.1)
    got = metrics.case_metrics(m, m, (3.0, 0.6, 0.6))
    assert got["dice"] == got["iou"] == 1.0
    assert got["ravd"] == got["assd"] == got["mssd"] == got["hd95"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_blobs_match_official(seed):
    shape = (7, 18, 16)  # blobs touch the volume border: exercises border_value=1
    pred, truth = blob(shape, 10 + seed, 0.05), blob(shape, 20 + seed, 0.0)
    assert pred.any() and truth.any()
    spacing = [(2.5, 0.7, 0.7), (5.0, 1.2, 1.2), (1.0, 1.0, 1.0), (3.2, 0.7265625, 0.7265625)][seed]
    check_against_official(pred, truth, spacing, angle=17.0 * seed, descending=bool(seed % 2))


def test_distances_use_the_bounding_box_exactly():
    # Small objects far from the origin in a large volume: the cropped EDT must equal the full brute force.
    shape, spacing = (20, 40, 40), (2.5, 0.7, 0.7)
    truth = box(shape, (10, 14), (25, 32), (28, 35))
    pred = box(shape, (11, 13), (26, 36), (27, 33))
    check_against_official(pred, truth, spacing)


# ---------------------------------------------------------------- edge cases
def test_empty_cases_have_documented_values():
    shape, spacing = (4, 6, 6), (2.0, 1.0, 1.0)
    diagonal = math.sqrt(8 ** 2 + 6 ** 2 + 6 ** 2)
    empty = np.zeros(shape, bool)
    some = box(shape, (1, 3), (1, 4), (1, 4))
    both = metrics.case_metrics(empty, empty, spacing)
    assert (both["dice"], both["iou"], both["ravd"], both["assd"], both["mssd"], both["hd95"]) == (1, 1, 0, 0, 0, 0)
    no_truth = metrics.case_metrics(some, empty, spacing)
    assert (no_truth["dice"], no_truth["iou"], no_truth["ravd"]) == (0, 0, math.inf)
    assert (no_truth["assd"], no_truth["mssd"], no_truth["hd95"]) == pytest.approx((diagonal,) * 3)
    no_pred = metrics.case_metrics(empty, some, spacing)
    assert (no_pred["dice"], no_pred["iou"], no_pred["ravd"]) == (0, 0, 100)
    assert no_pred["assd"] == pytest.approx(diagonal)
    assert no_pred["voxels_truth"] == 18 and no_pred["voxels_pred"] == 0


def test_mask_filling_the_volume_has_no_surface():
    shape, spacing = (3, 4, 4), (1.0, 1.0, 1.0)
    full = np.ones(shape, bool)
    assert not metrics.surface(full).any()
    assert metrics.assd(full, full, spacing) == 0
    part = box(shape, (0, 2), (0, 4), (0, 4))
    assert metrics.mssd(full, part, spacing) == pytest.approx(metrics.volume_diagonal(shape, spacing))


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="same shape"):
        metrics.dice(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="spacing"):
        metrics.assd(np.ones((2, 3, 3)), np.ones((2, 3, 3)), (0.0, 1.0, 1.0))


def test_distance_transform_gives_the_same_distances():
    # The docstring's claim: EDT with sampling=spacing on the surfaces gives the metrics of the KD-tree used here.
    shape, spacing = (9, 20, 18), (2.5, 0.7, 0.7)
    pred, truth = blob(shape, 31, 0.05), blob(shape, 32, 0.0)
    sp, st = ref_surface(pred), ref_surface(truth)
    d_pt = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    d_tp = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    assert metrics.assd(pred, truth, spacing) == pytest.approx(np.concatenate([d_pt, d_tp]).mean(), rel=1e-12)
    assert metrics.mssd(pred, truth, spacing) == pytest.approx(max(d_pt.max(), d_tp.max()), rel=1e-12)
    assert metrics.hd95(pred, truth, spacing) == pytest.approx(
        max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)), rel=1e-12)
