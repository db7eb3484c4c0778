"""NIfTI volumes: read into the store's canonical (z, y, x) slice stacks, record the source geometry, write back.

Canonical orientation: voxel axes x → patient Left, y → Posterior, z → Superior (nibabel axis codes
``("L", "P", "S")``), held as (z, y, x) arrays: the DICOM convention of the CHAOS cases (an axial slice as a
radiologist reads it: anterior at the top, the patient's right on the left). A volume is brought there by an axis
permutation and flips only (nibabel's closest-orientation transform, never a resampling), so spacing is kept.

The geometry record (``geometry``, the store's per-case ``nifti`` attribute) holds the source's affine, shape, the
transform applied and the raw header fields that carry geometry (pixdim, qform/sform codes and parameters, units):
:func:`write_like_source` undoes the transform and writes those fields back verbatim, so a prediction overlays its
input exactly in any viewer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from dlseg.errors import CaseError, one_line

CANONICAL = ("L", "P", "S")
SUFFIXES = (".nii.gz", ".nii")
HEADER_FIELDS = ("pixdim", "xyzt_units", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                 "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
INT16 = np.iinfo(np.int16)


def is_nifti(path: str | os.PathLike) -> bool:
    """``*.nii`` or ``*.nii.gz`` (any case)."""
    return str(path).lower().endswith(SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """``case_0000.nii.gz`` → ``case_0000``."""
    name = Path(path).name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class NiftiVolume:
    """A volume in canonical (z, y, x) order, its DICOM-style geometry (LPS) and the source geometry record."""

    data: np.ndarray
    spacing: list[float]          # (z, y, x) mm
    origin: list[float]           # LPS position of voxel (0, 0, 0) of the canonical array
    direction: list[float]        # 9 LPS cosines: x (column) axis, y (row) axis, z (slice) axis
    geometry: dict[str, Any]      # the source: format, shape, affine, transform, header fields


def load(path: Path) -> Any:
    """The nibabel image (header read, data not yet), with a one-line error."""
    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises many types for damaged or foreign files
        raise CaseError(path, f"cannot read NIfTI ({one_line(e, 200)})") from None


def orientation(img: Any, path: Path) -> np.ndarray:
    """The transform (nibabel ``ornt``) from the source voxel axes to the canonical ones."""
    ornt = io_orientation(img.affine)
    if np.isnan(ornt).any():
        raise CaseError(path, "affine is degenerate (an axis has no direction): cannot orient the volume")
    return ornt_transform(ornt, axcodes2ornt(CANONICAL)).astype(int)


def volume_shape(img: Any, path: Path) -> tuple[int, int, int]:
    """The 3D shape (x, y, z) of the source; a trailing axis of length 1 is accepted, any other 4D refused."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        raise CaseError(path, f"4D image with {shape[3]} volumes (multi-channel or time series): "
                              "dlseg takes one 3D single-channel volume per case")
    if len(shape) != 3:
        raise CaseError(path, f"{len(shape)}D image: expected a 3D volume")
    return shape  # type: ignore[return-value]


def canonical_slices(path: Path) -> int:
    """The number of canonical slices (z) of a NIfTI file, from its header only."""
    img = load(path)
    shape = volume_shape(img, path)
    return shape[int(np.nonzero(orientation(img, path)[:, 0] == 2)[0][0])]


def source_geometry(img: Any, path: Path) -> dict[str, Any]:
    """What writing back in the source's geometry needs (JSON-ready)."""
    header = img.header
    return {
        "format": "nifti2" if isinstance(img, nib.Nifti2Image) else "nifti1",
        "shape": list(volume_shape(img, path)), "affine": np.asarray(img.affine, float).tolist(),
        "transform": orientation(img, path).tolist(),
        "header": {k: np.asarray(header[k]).tolist() for k in HEADER_FIELDS},
    }


def to_canonical(data: np.ndarray, transform: Any) -> np.ndarray:
    """Source (x, y, z) voxels → canonical (z, y, x)."""
    return np.ascontiguousarray(apply_orientation(data, np.asarray(transform)).transpose(2, 1, 0))


def from_canonical(data: np.ndarray, transform: Any) -> np.ndarray:
    """Canonical (z, y, x) → source voxel order (the inverse of :func:`to_canonical`)."""
    t = np.asarray(transform, int)
    inverse = np.zeros_like(t)
    for axis, (target, flip) in enumerate(t):
        inverse[target] = (axis, flip)
    return np.ascontiguousarray(apply_orientation(data.transpose(2, 1, 0), inverse))


def canonical_frame(geometry: dict[str, Any]) -> tuple[list[float], list[float], list[float]]:
    """(spacing (z, y, x), origin, direction) of the canonical array, in the store's DICOM (LPS) convention."""
    affine = np.asarray(geometry["affine"], float) @ inv_ornt_aff(np.asarray(geometry["transform"]),
                                                                   geometry["shape"])
    axes = LPS_FROM_RAS @ affine[:3, :3]                       # columns: canonical x, y, z steps in LPS
    steps = np.linalg.norm(axes, axis=0)
    direction = (axes / steps).T.reshape(-1)                   # rows: x axis, y axis, z axis
    return [float(s) for s in steps[::-1]], (LPS_FROM_RAS @ affine[:3, 3]).tolist(), direction.tolist()


def read_array(img: Any, path: Path) -> np.ndarray:
    """The voxel values (scaling applied), 3D."""
    shape = volume_shape(img, path)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip, short file …
        raise CaseError(path, f"cannot read NIfTI data ({one_line(e, 200)})") from None
    return data.reshape(shape)


def store_image(data: np.ndarray, path: Path) -> np.ndarray:
    """Scanner values as the store holds them: int16 when every value is exactly one, else float32."""
    if data.dtype.kind in "iub":
        if data.size == 0 or (data.min() >= INT16.min and data.max() <= INT16.max):
            return data.astype(np.int16)
        return data.astype(np.float32)
    if not np.isfinite(data).all():
        raise CaseError(path, "image has NaN or infinite values")
    if data.size and data.min() >= INT16.min and data.max() <= INT16.max and np.array_equal(data, np.round(data)):
        return data.astype(np.int16)
    return data.astype(np.float32)


def read_volume(path: Path) -> NiftiVolume:
    """A NIfTI image file → canonical (z, y, x) image (int16 or float32) and its geometry."""
    img = load(path)
    geometry = source_geometry(img, path)
    data = to_canonical(store_image(read_array(img, path), path), geometry["transform"])
    spacing, origin, direction = canonical_frame(geometry)
    return NiftiVolume(data, spacing, origin, direction, geometry)


def label_dtype(values: np.ndarray) -> type:
    """uint8 when every label fits (the usual case: a volume of int64 would be 8x the memory), else int32."""
    return np.uint8 if values.size == 0 or (values.min() >= 0 and values.max() <= 255) else np.int32


def check_integral(values: np.ndarray, path: Path) -> np.ndarray:
    """Distinct label values as int64; CaseError naming the non-integral ones."""
    if values.dtype.kind == "f":
        bad = values[~np.isfinite(values) | (values != np.round(values))]
        if bad.size:
            shown = ", ".join(f"{v:g}" for v in bad[:5]) + (f" (and {bad.size - 5} more)" if bad.size > 5 else "")
            raise CaseError(path, f"label values are not integers: {shown}")
    return values.astype(np.int64)


def read_labels(path: Path, declared: set[int], like: NiftiVolume) -> np.ndarray:
    """A label file → canonical (z, y, x) integer labels, validated: integral (float storage accepted), within
    ``declared`` and on the same voxel grid as the image ``like``."""
    img = load(path)
    data = read_array(img, path)
    values = check_integral(np.unique(data), path)
    bad = sorted(set(values.tolist()) - declared)
    if bad:
        raise CaseError(path, f"label values {', '.join(map(str, bad))} are not declared in dataset.json "
                              f"(declared: {', '.join(map(str, sorted(declared)))})")
    if list(data.shape) != like.geometry["shape"]:
        raise CaseError(path, f"labels are {'x'.join(map(str, data.shape))} but the image is "
                              f"{'x'.join(map(str, like.geometry['shape']))} (voxels)")
    if not np.allclose(img.affine, like.geometry["affine"], rtol=1e-5, atol=1e-3):
        raise CaseError(path, "labels and image have different affines (not the same voxel grid)")
    return to_canonical(data.astype(label_dtype(values)), like.geometry["transform"])


def read_label_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A label file as canonical (z, y, x) integer labels (integral values checked) and its spacing (z, y, x)."""
    img = load(path)
    geometry = source_geometry(img, path)
    data = read_array(img, path)
    values = check_integral(np.unique(data), path)
    return to_canonical(data.astype(label_dtype(values)), geometry["transform"]), tuple(canonical_frame(geometry)[0])


def write_like_source(path: Path, labels: np.ndarray, geometry: dict[str, Any]) -> None:
    """Canonical (z, y, x) uint8 labels → a NIfTI in the source's voxel order with its exact header geometry."""
    data = from_canonical(np.asarray(labels, np.uint8), geometry["transform"])
    if list(data.shape) != list(geometry["shape"]):
        raise ValueError(f"labels {data.shape} do not match the source shape {geometry['shape']}")
    image_class = nib.Nifti2Image if geometry.get("format") == "nifti2" else nib.Nifti1Image
    img = image_class(data, None)
    for key, value in geometry["header"].items():
        img.header[key] = value
    img.header.set_data_dtype(np.uint8)
    img.header.set_slope_inter(None, None)
    nib.save(img, str(path))
