"""The prediction folder format, written and read here only.

    OUT/<case>/slice_NNNN.png       CHAOS submission PNGs (names sort in slice order; gray values below)
    OUT/<case>/sources.json         PNG name → source slice (salted SOPInstanceUID hash; path with --record-sources)
    OUT/<case>/prediction.npz       key ``mask``: (Z, H, W) uint8 class labels (liver = 1)
    OUT/<case>/prediction.nii.gz    labels as (x, y, z) uint8, RAS affine from the DICOM geometry; for a NIfTI
                                    source its voxel order and exact header geometry
    OUT/<case>/segmentation.dcm     DICOM Segmentation referencing the source slices (dicom_seg)
    OUT/<case>/thumbnails.jpg       a few slices with the prediction, for report.html (JPEG: not a slice PNG)
    OUT/<case>/overlays/*.png       image | ground truth (when known) | prediction
    OUT/<case>/record.json          written last: a folder with a record is complete
    OUT/.failed/<case>.json         the reason a case failed
    OUT/.tmp-<case>-<12 hex>        a case being written (renamed into place when complete)
    OUT/summary[-shard-I-of-N].csv/json
    OUT/selection.csv, OUT/id-salt.json   series selection and id salt (owned by selection.py and privacy.py)
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from dlseg.errors import CaseError, one_line
from dlseg.fileio import atomic_write, install_dir
from dlseg.inference import dicom_seg
from dlseg.inference.config import Shard
from dlseg.sources.masks import GRAY_VALUES, lookup_table
from dlseg.sources.nifti_volume import write_like_source

RECORD = "record.json"
SOURCES = "sources.json"
NPZ = "prediction.npz"
NPZ_KEY = "mask"
NIFTI = "prediction.nii.gz"
OVERLAYS = "overlays"
THUMBNAILS = "thumbnails.jpg"
FAILED_DIR = ".failed"
TMP_PREFIX = ".tmp-"             # .tmp-<case>-<12 hex> while writing, .tmp-<case>-old-<8 hex> (install_dir)
TMP_CASE_RE = re.compile(r"\.tmp-(?P<case>.+)-(?:[0-9a-f]{12}|old-[0-9a-f]{8})")
NOTE_TMP_RE = re.compile(r"\.(?P<case>.+)\.json\.[0-9a-f]{8}\.tmp")   # atomic_write's name in .failed/
LIVER = 1                        # the liver's label in prediction.npz (and in the store)
LIVER_GRAY = GRAY_VALUES["MR"][LIVER]   # default PNG gray value of a binary model's liver
OVERLAY_COLORS = {1: (0, 255, 0), 2: (255, 128, 0), 3: (0, 128, 255), 4: (255, 0, 255)}  # BGR per class


def _class_gray_table() -> np.ndarray:
    """Class label → CHAOS gray value (the MR organ values; labels beyond them saturate at 255)."""
    lut = np.full(256, 255, np.uint8)
    lut[0] = 0
    for label, gray in GRAY_VALUES["MR"].items():
        lut[label] = gray
    return lut


CLASS_GRAY = _class_gray_table()


# ---------------------------------------------------------------------------------------------------- names

def slice_names(n: int) -> list[str]:
    """``slice_0000.png`` … zero-padded so that a lexicographic sort is slice order."""
    width = max(4, len(str(max(n - 1, 0))))
    return [f"slice_{i:0{width}d}.png" for i in range(n)]


def summary_stem(shard: Shard | None) -> str:
    """``summary`` for the whole cohort, ``summary-shard-I-of-N`` for one shard (tasks never clobber each other)."""
    return "summary" if shard is None else f"summary-{shard.name}"


def summary_files(out: Path, shard: Shard | None = None) -> tuple[Path, Path]:
    """The (CSV, JSON) summary of the cohort or of one shard."""
    stem = summary_stem(shard)
    return out / f"{stem}.csv", out / f"{stem}.json"


def failure_note(out: Path, case_id: str) -> Path:
    """Where a failed case's reason is kept."""
    return out / FAILED_DIR / f"{case_id}.json"


def png_files(case_dir: Path) -> list[Path]:
    """The slice PNGs of a case folder in slice order (every ``*.png``, sorted, like the official reader)."""
    return sorted(case_dir.glob("*.png"), key=lambda p: p.name)


# ---------------------------------------------------------------------------------------------------- writing

def png_values(labels: np.ndarray, num_classes: int, label_value: int) -> np.ndarray:
    """Class labels → CHAOS PNG gray values (binary: ``label_value``; multi-class: the CHAOS organ values)."""
    if num_classes == 1:
        return (labels > 0).astype(np.uint8) * np.uint8(label_value)
    return CLASS_GRAY[labels]


def nifti_affine(spacing: Iterable[float], origin: Iterable[float], direction: Iterable[float]) -> np.ndarray:
    """RAS affine for a volume stored as (x=column, y=row, z=slice) from DICOM geometry (LPS)."""
    dz, dy, dx = (float(v) for v in spacing)
    d = np.asarray(list(direction), dtype=float).reshape(3, 3)   # rows: row axis, column axis, slice axis
    lps = np.eye(4)
    lps[:3, 0] = d[0] * dx
    lps[:3, 1] = d[1] * dy
    lps[:3, 2] = d[2] * dz
    lps[:3, 3] = np.asarray(list(origin), dtype=float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_nifti(path: Path, labels: np.ndarray, geometry: dict[str, Any]) -> None:
    """Labels as (x, y, z) uint8 with the affine from the DICOM geometry; a NIfTI source's own grid and header."""
    if geometry.get("nifti"):
        write_like_source(path, labels, geometry["nifti"])
        return
    import nibabel as nib

    affine = nifti_affine(geometry["spacing"], geometry["origin"], geometry["direction"])
    img = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def display_slice(image: np.ndarray, stats: dict[str, float]) -> np.ndarray:
    """A scanner slice → uint8 gray for overlays (window [p0.5, p99.5] of the case)."""
    lo, hi = float(stats["p0_5"]), float(stats["p99_5"])
    scaled = (np.asarray(image, np.float32) - lo) / max(hi - lo, 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def paint(gray: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A gray slice with each class as filled colour + contour."""
    bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    for c, color in OVERLAY_COLORS.items():
        m = (labels == c).astype(np.uint8)
        if not m.any():
            continue
        fill = bgr.copy()
        fill[m > 0] = color
        bgr = cv2.addWeighted(bgr, 0.65, fill, 0.35, 0)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(bgr, contours, -1, color, 1)
    return bgr


def overlay_panel(gray: np.ndarray, truth: np.ndarray | None, pred: np.ndarray) -> np.ndarray:
    """image | ground truth (when known) | prediction, side by side, 2-pixel white separators."""
    panels = [cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)]
    if truth is not None:
        panels.append(paint(gray, truth))
    panels.append(paint(gray, pred))
    sep = np.full((gray.shape[0], 2, 3), 255, np.uint8)
    out = [panels[0]]
    for p in panels[1:]:
        out += [sep, p]
    return np.concatenate(out, axis=1)


@dataclass
class CaseOutput:
    """One predicted case, ready to be written: labels at the original size plus what the files need."""

    case_id: str
    labels: np.ndarray                     # (Z, H, W) uint8 class labels
    num_classes: int
    sources: list[str]                     # source file of each slice, relative to the input
    geometry: dict[str, Any]               # spacing (z, y, x), origin, direction
    image: np.ndarray | None = None        # scanner volume, for overlays
    truth: np.ndarray | None = None        # ground-truth labels, for overlays (when known)
    stats: dict[str, float] | None = None  # intensity statistics, for the overlay window
    dicom_files: list[str] | None = None   # source DICOM files, for --format dicom-seg
    measures: dict[str, Any] | None = None  # case_flags.measure, kept in the record
    thumbnail: np.ndarray | None = None    # BGR strip for report.html


def case_record(case: CaseOutput, seconds: float, provenance: dict[str, Any]) -> dict[str, Any]:
    """``record.json``: shape, spacing, volumes, timing, then what makes the folder reusable (``provenance``)."""
    labels, z = case.labels, case.labels.shape[0]
    spacing = [float(v) for v in case.geometry["spacing"]]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(case.num_classes, 2))
    record = {
        "case_id": case.case_id, "status": "predicted", "slices": int(z), "shape": list(labels.shape),
        "spacing": spacing, "liver_volume_ml": round(float(counts[LIVER]) * voxel_ml, 4),
        "foreground_slices": int((labels.reshape(z, -1) > 0).any(axis=1).sum()),
        "seconds": round(seconds, 4), **provenance,
    }
    if case.measures is not None:
        record["measures"] = case.measures
    if case.num_classes > 1:
        record["class_volumes_ml"] = {str(c): round(float(counts[c]) * voxel_ml, 4)
                                      for c in range(1, case.num_classes)}
    return record


def _write_files(folder: Path, case: CaseOutput, formats: Iterable[str], overlays: bool, label_value: int,
                 model_fingerprint: str = "") -> None:
    """Every file of a case folder except its record."""
    names = slice_names(case.labels.shape[0])
    if "png" in formats:
        for name, sl in zip(names, png_values(case.labels, case.num_classes, label_value)):
            if not cv2.imwrite(str(folder / name), sl, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
                raise OSError(f"{folder / name}: cannot write PNG")
    (folder / SOURCES).write_text(json.dumps(dict(zip(names, case.sources)), indent=1))
    if "npz" in formats:
        np.savez_compressed(folder / NPZ, **{NPZ_KEY: case.labels})
    if "nifti" in formats:
        write_nifti(folder / NIFTI, case.labels, case.geometry)
    if case.thumbnail is not None:
        cv2.imwrite(str(folder / THUMBNAILS), case.thumbnail, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if "dicom-seg" in formats:
        dicom_seg.write_seg(folder / dicom_seg.SEG_FILE, case.labels, case.num_classes, case.dicom_files or [],
                            model_fingerprint)
    if overlays:
        (folder / OVERLAYS).mkdir()
        for i, name in enumerate(names):
            panel = overlay_panel(display_slice(case.image[i], case.stats),
                                  None if case.truth is None else case.truth[i], case.labels[i])
            cv2.imwrite(str(folder / OVERLAYS / name), panel, [cv2.IMWRITE_PNG_COMPRESSION, 1])


def write_case(out: Path, case: CaseOutput, formats: Iterable[str], overlays: bool, label_value: int,
               provenance: dict[str, Any], started: float, load_s: float = 0.0) -> dict[str, Any]:
    """Write a case folder under a temporary name, then rename it into place; returns its record."""
    tmp = out / f"{TMP_PREFIX}{case.case_id}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        _write_files(tmp, case, formats, overlays, label_value, provenance.get("model_fingerprint", ""))
        record = case_record(case, time.perf_counter() - started + load_s, provenance)
        (tmp / RECORD).write_text(json.dumps(record, indent=1))   # last: a folder with a record is complete
        final = out / case.case_id
        install_dir(tmp, final, final.with_name(f"{TMP_PREFIX}{final.name}-old-{uuid.uuid4().hex[:8]}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def write_failure(out: Path, case_id: str, reason: str, fingerprint: str = "") -> dict[str, Any]:
    """Note a failed case on disk for the cohort summary; returns the row."""
    row = {"case_id": case_id, "status": "failed", "reason": reason, "input_fingerprint": fingerprint}
    note = failure_note(out, case_id)
    note.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(note, json.dumps(row).encode())
    return row


# ---------------------------------------------------------------------------------------------------- reading

def load_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None when absent; CaseError when unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CaseError(path, f"unreadable JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise CaseError(path, "expected a JSON object")
    return data


def read_record(case_dir: Path) -> dict[str, Any] | None:
    """A case folder's record, or None when absent or unreadable (the case is then not done)."""
    try:
        return load_json(case_dir / RECORD)
    except CaseError:
        return None


def read_sources(case_dir: Path) -> dict[str, str] | None:
    """PNG name → source file of a case folder (None when absent)."""
    return load_json(case_dir / SOURCES)


def read_failure(out: Path, case_id: str) -> dict[str, Any] | None:
    """The failure note of a case (None when it has none)."""
    path = failure_note(out, case_id)
    return json.loads(path.read_text()) if path.is_file() else None


def read_labels(case_dir: Path) -> np.ndarray:
    """The (Z, H, W) class labels of ``prediction.npz``, loaded without pickle (CaseError when unusable)."""
    path = case_dir / NPZ
    if not path.is_file():
        raise CaseError(case_dir, f"no prediction PNGs and no {NPZ}")
    try:
        with np.load(path, allow_pickle=False) as data:
            labels = data[NPZ_KEY]
    except KeyError:
        raise CaseError(path, f"no array named '{NPZ_KEY}'") from None
    except Exception as e:  # zipfile/numpy raise many types for damaged files
        raise CaseError(path, f"unreadable npz ({one_line(e)})") from None
    if labels.ndim != 3:
        raise CaseError(path, f"mask has shape {labels.shape}; expected (Z, H, W)")
    return labels


def read_png_mask(path: Path, label_value: int | None) -> np.ndarray:
    """One prediction PNG as a boolean (H, W) mask (gray == label_value, or any nonzero)."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise CaseError(path, "cannot read PNG (missing, truncated or not a PNG)")
    return img != 0 if label_value is None else img == label_value


def check_slice_count(case_dir: Path, n_png: int) -> None:
    """The PNG count agrees with the record's ``slices`` and with the sources, when those exist."""
    record = load_json(case_dir / RECORD)
    if record is not None and "slices" in record and int(record["slices"]) != n_png:
        raise CaseError(case_dir, f"{n_png} PNGs but {RECORD} says {record['slices']} slices")
    sources = read_sources(case_dir)
    if sources is not None and len(sources) != n_png:
        raise CaseError(case_dir, f"{n_png} PNGs but {SOURCES} maps {len(sources)}")


def read_prediction(case_dir: Path, label_value: int | None) -> np.ndarray:
    """A case's predicted liver as a boolean (Z, H, W) volume, from its PNGs (else ``prediction.npz``)."""
    if not case_dir.is_dir():
        raise CaseError(case_dir, "no prediction for this case")
    pngs = png_files(case_dir)
    if not pngs:
        return read_labels(case_dir) == LIVER
    check_slice_count(case_dir, len(pngs))
    first = read_png_mask(pngs[0], label_value)
    volume = np.empty((len(pngs),) + first.shape, dtype=bool)
    volume[0] = first
    for k, path in enumerate(pngs[1:], start=1):
        sl = read_png_mask(path, label_value)
        if sl.shape != first.shape:
            raise CaseError(path, f"PNG is {sl.shape[0]}x{sl.shape[1]} but {pngs[0].name} is "
                                  f"{first.shape[0]}x{first.shape[1]}")
        volume[k] = sl
    return volume


def read_prediction_labels(case_dir: Path, label_value: int | None = LIVER_GRAY) -> np.ndarray:
    """A case's predicted class labels (Z, H, W) uint8: ``prediction.npz`` when present, else its PNGs.

    PNGs of a multi-class model (its record lists class volumes) map through the MR gray values; those of a binary
    model are its liver (``label_value``, as :func:`read_prediction`).
    """
    if not case_dir.is_dir():
        raise CaseError(case_dir, "no prediction for this case")
    pngs = png_files(case_dir)
    if (case_dir / NPZ).is_file() or not pngs:
        return read_labels(case_dir)
    if not (read_record(case_dir) or {}).get("class_volumes_ml"):
        return read_prediction(case_dir, label_value).astype(np.uint8) * np.uint8(LIVER)
    check_slice_count(case_dir, len(pngs))
    lut = lookup_table("MR", "organs")
    slices: list[np.ndarray] = []
    for path in pngs:
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise CaseError(path, "cannot read PNG (missing, truncated or not a PNG)")
        if slices and img.shape != slices[0].shape:
            raise CaseError(path, f"PNG is {img.shape[0]}x{img.shape[1]} but {pngs[0].name} is "
                                  f"{slices[0].shape[0]}x{slices[0].shape[1]}")
        slices.append(lut[img])
    return np.stack(slices)


def prediction_cases(pred_dir: Path) -> list[str]:
    """Case folders of a prediction directory (those holding a record, PNGs or ``prediction.npz``)."""
    out = []
    for d in sorted(p for p in pred_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (d / RECORD).is_file() or (d / NPZ).is_file() or png_files(d):
            out.append(d.name)
    return out
