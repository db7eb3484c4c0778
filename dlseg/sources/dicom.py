"""Reading DICOM series with pydicom: one volume in scanner values, its geometry, and clear errors.

Uncompressed (implicit/explicit VR, little/big endian), deflated and RLE data decode natively; JPEG
baseline/lossless, JPEG-LS and JPEG 2000 need the optional ``jpeg`` extra (pylibjpeg and its plugins).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from dlseg.errors import CaseError, one_line
from dlseg.sources.files import natural_key, natural_sorted
from dlseg.sources.series_select import header_fields

JPEG_EXTRA = 'pip install "dlseg[jpeg]"'
# Objects that may carry Rows/Columns or even pixel data but are not slices of an image series.
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "DOC", "RTPLAN", "RTSTRUCT", "RTDOSE", "RTRECORD", "SEG", "REG"})
# What header-only reads keep: enough for is_image, find_series and header_meta.
HEADER_TAGS = [
    "SOPClassUID", "Modality", "Rows", "Columns", "SeriesInstanceUID", "SeriesNumber", "ImagePositionPatient",
    "ImageOrientationPatient", "InstanceNumber", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    # series selection (series_select.header_fields)
    "ImageType", "SeriesDescription", "StudyInstanceUID", "MagneticFieldStrength", "ImagingFrequency", "EchoTime",
    "EchoNumbers", "RepetitionTime", "ScanningSequence", "SequenceName", "DiffusionBValue", "NumberOfFrames",
]
INT16_MIN, INT16_MAX = -32768, 32767


@dataclass
class Volume:
    """A decoded series: (Z, H, W) scanner values and its geometry (slices in the given file order)."""

    image: np.ndarray                       # int16 when exact, else float32; RescaleSlope/Intercept applied
    spacing: tuple[float, float, float]     # (z, y, x) in mm
    origin: tuple[float, float, float]      # ImagePositionPatient of the first slice
    direction: tuple[float, ...]            # 9 cosines: row (x) axis, column (y) axis, slice (z) axis
    positions: list[tuple[float, float, float]] | None
    modality: str
    files: list[Path]                       # the files that became slices, in order
    skipped: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)   # SOPInstanceUID of each slice (hashed, never printed)


@dataclass
class SeriesFiles:
    """One series of a generic DICOM tree: its image files ordered along the slice normal."""

    name: str                               # folder + series number (a folder can be a patient name: do not print)
    uid: str                                # SeriesInstanceUID (for grouping only; do not print)
    modality: str
    files: list[Path]
    notes: list[str] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)   # series_select.header_fields of each file, in order


def read_dataset(path: Path, header_only: bool = False) -> pydicom.Dataset:
    """dcmread with one-line errors; ``header_only`` stops before the pixel data."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if header_only:
                return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            return pydicom.dcmread(path)
    except InvalidDicomError:
        raise CaseError(path, "not a DICOM file (no DICM header)") from None
    except (OSError, EOFError) as e:
        raise CaseError(path, f"cannot read file ({one_line(e)})") from None
    except Exception as e:  # pydicom raises many types for damaged files
        raise CaseError(path, f"corrupt DICOM ({type(e).__name__}: {one_line(e)})") from None


def sop_class_name(ds: pydicom.Dataset) -> str:
    """Name of the SOP class (from the dataset, else the file meta), e.g. ``CT Image Storage``."""
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    return str(getattr(uid, "name", "") or "")


def is_image(ds: pydicom.Dataset, need_pixels: bool = True) -> bool:
    """True for a slice of an image series; False for SR/RT/presentation states/SEG and other non-images.

    An object of an image storage class is an image even when damaged (so ``read_series`` reports it).
    """
    if "Image Storage" in sop_class_name(ds):
        return True
    if ds.get("Modality") in NON_IMAGE_MODALITIES or "Rows" not in ds or "Columns" not in ds:
        return False
    return not need_pixels or "PixelData" in ds


def split_image_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(image files, non-image files) by reading headers only; unreadable files count as images."""
    images, skipped = [], []
    for path in files:
        try:
            (images if is_image(read_dataset(path, header_only=True), need_pixels=False) else skipped).append(path)
        except CaseError:
            images.append(path)
    return images, skipped


def decode_pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Stored pixel values of a single-frame grayscale slice (no rescale), with one-line errors."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise CaseError(path, f"multi-frame DICOM ({ds.NumberOfFrames} frames) is not supported; expected one slice per file")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise CaseError(path, f"color image (SamplesPerPixel={ds.SamplesPerPixel}); expected grayscale")
    if "ModalityLUTSequence" in ds:
        raise CaseError(path, "Modality LUT Sequence is not supported (expected RescaleSlope/RescaleIntercept)")
    if ts is not None and ts.is_compressed:
        try:
            available = get_decoder(ts).is_available
        except NotImplementedError:
            raise CaseError(path, f"unsupported transfer syntax {ts.name}") from None
        if not available:
            raise CaseError(path, f"{ts.name} pixel data needs the optional JPEG decoders: {JPEG_EXTRA}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as e:
        hint = f"; {JPEG_EXTRA} adds more decoders" if ts is not None and ts.is_compressed and ts.name != "RLE Lossless" else ""
        raise CaseError(path, f"cannot decode pixel data ({one_line(e, 200)}){hint}") from None
    if arr.ndim != 2:
        raise CaseError(path, f"pixel data has shape {arr.shape}; expected one 2-D slice")
    return arr


def rescale_of(ds: pydicom.Dataset) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), defaulting to (1, 0)."""
    slope = ds.get("RescaleSlope", 1)
    intercept = ds.get("RescaleIntercept", 0)
    return float(1 if slope in (None, "") else slope), float(0 if intercept in (None, "") else intercept)


def apply_rescale(raw: list[np.ndarray], rescale: list[tuple[float, float]]) -> np.ndarray:
    """Stack slices in scanner values: int16 when every value is exactly an int16, else float32."""
    exact = all(s.is_integer() and b.is_integer() for s, b in rescale)
    if exact:
        lo = min(int(r.min()) * s + b if s >= 0 else int(r.max()) * s + b for r, (s, b) in zip(raw, rescale))
        hi = max(int(r.max()) * s + b if s >= 0 else int(r.min()) * s + b for r, (s, b) in zip(raw, rescale))
        exact = INT16_MIN <= lo and hi <= INT16_MAX
    out = np.empty((len(raw),) + raw[0].shape, dtype=np.int16 if exact else np.float32)
    for k, (r, (s, b)) in enumerate(zip(raw, rescale)):
        if exact:
            out[k] = r.astype(np.int64) * int(s) + int(b)
        else:  # the same arithmetic as pydicom.pixels.apply_modality_lut, then float32
            out[k] = (r.astype(np.float64) * s + b).astype(np.float32)
    return out


def geometry(datasets_meta: list[dict], files: list[Path]) -> tuple[tuple, tuple, tuple, list | None, list[str]]:
    """Spacing (z,y,x), origin, direction cosines, positions and warnings from per-slice header values."""
    notes: list[str] = []
    first = datasets_meta[0]
    row_cos = np.array(first["orientation"][:3], dtype=float) if first["orientation"] else np.array([1.0, 0, 0])
    col_cos = np.array(first["orientation"][3:], dtype=float) if first["orientation"] else np.array([0.0, 1, 0])
    normal = np.cross(row_cos, col_cos)
    dy, dx = first["pixel_spacing"] or (1.0, 1.0)
    if not first["pixel_spacing"]:
        notes.append("no PixelSpacing; in-plane spacing set to 1 mm")
    positions = [m["position"] for m in datasets_meta]
    have_pos = all(p is not None for p in positions)
    dz = None
    sign = 1.0
    if have_pos and len(positions) > 1:
        d = np.array([float(np.dot(p, normal)) for p in positions])
        steps = np.diff(d)
        sign = -1.0 if np.median(steps) < 0 else 1.0
        bad = np.nonzero(steps * sign <= 0)[0]
        if bad.size:
            k = int(bad[0]) + 1
            notes.append(
                f"slice positions are not monotonic along the series in file-name order "
                f"(first at {files[k].name}, slice {k}); file-name order kept"
            )
        dz = float(np.median(np.abs(steps)))
    if not dz:
        dz = first["spacing_between"] or first["thickness"]
        if not dz:
            dz = 1.0
            notes.append("no slice positions, SpacingBetweenSlices or SliceThickness; slice spacing set to 1 mm")
    direction = tuple(float(x) + 0.0 for x in (*row_cos, *col_cos, *(sign * normal)))  # + 0.0: no -0.0
    origin = tuple(float(x) for x in positions[0]) if positions[0] is not None else (0.0, 0.0, 0.0)
    return (float(dz), float(dy), float(dx)), origin, direction, ([tuple(map(float, p)) for p in positions] if have_pos else None), notes


def header_meta(ds: pydicom.Dataset) -> dict:
    """The geometry-relevant header values of one slice as plain Python."""
    def floats(name: str) -> list[float] | None:
        v = ds.get(name)
        return [float(x) for x in v] if v not in (None, "") else None

    def number(name: str) -> float | None:
        v = ds.get(name)
        return float(v) if v not in (None, "") else None

    return {
        "rows": int(ds.Rows), "cols": int(ds.Columns), "orientation": floats("ImageOrientationPatient"),
        "position": floats("ImagePositionPatient"), "pixel_spacing": floats("PixelSpacing"),
        "thickness": number("SliceThickness"), "spacing_between": number("SpacingBetweenSlices"),
        "modality": str(ds.get("Modality", "")),
    }


def check_consistent(meta: dict, first: dict, path: Path) -> None:
    """All slices of a case share rows, columns and orientation."""
    if (meta["rows"], meta["cols"]) != (first["rows"], first["cols"]):
        raise CaseError(path, f"slice is {meta['rows']}x{meta['cols']} but the series' first slice is "
                              f"{first['rows']}x{first['cols']} (mixed shapes)")
    a, b = meta["orientation"], first["orientation"]
    if (a is None) != (b is None) or (a is not None and max(abs(x - y) for x, y in zip(a, b)) > 1e-4):
        raise CaseError(path, "slice orientation differs from the series' first slice (mixed orientations)")


def read_series(files: list[str | os.PathLike]) -> Volume:
    """Decode slices in the given order into a Volume; non-image objects are skipped with a note."""
    files = [Path(f) for f in files]
    if not files:
        raise CaseError("<series>", "no DICOM files")
    raw: list[np.ndarray] = []
    rescale: list[tuple[float, float]] = []
    metas: list[dict] = []
    kept: list[Path] = []
    uids: list[str] = []
    skipped: list[Path] = []
    for path in files:
        ds = read_dataset(path)
        if not sop_class_name(ds) and "PixelData" not in ds:
            raise CaseError(path, "DICOM file with neither SOP class nor pixel data (truncated or damaged)")
        if not is_image(ds):
            skipped.append(path)
            continue
        if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
            raise CaseError(path, "image object without rows, columns or pixel data (truncated or damaged file)")
        try:
            meta = header_meta(ds)
        except (TypeError, ValueError) as e:
            raise CaseError(path, f"invalid geometry tag value ({one_line(e, 120)})") from None
        if metas:
            check_consistent(meta, metas[0], path)
        raw.append(decode_pixels(ds, path))
        rescale.append(rescale_of(ds))
        metas.append(meta)
        kept.append(path)
        uids.append(str(ds.get("SOPInstanceUID", "") or ""))
        del ds
    if not kept:
        raise CaseError(files[0].parent, f"no image slices among {len(files)} DICOM files")
    spacing, origin, direction, positions, notes = geometry(metas, kept)
    if skipped:
        notes.insert(0, f"skipped {len(skipped)} non-image DICOM file(s): {', '.join(p.name for p in skipped)}")
    image = apply_rescale(raw, rescale)
    return Volume(image, spacing, origin, direction, positions, metas[0]["modality"], kept, skipped, notes, uids)


def find_series(root: str | os.PathLike) -> list[SeriesFiles]:
    """Group every DICOM image file under ``root`` by SeriesInstanceUID, each ordered along the slice normal."""
    root = Path(root)
    if not root.is_dir():
        raise CaseError(root, "no such folder")
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path in natural_sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = read_dataset(path, header_only=True)
        except CaseError:
            continue  # not DICOM (or unreadable header): not part of any series
        if not is_image(ds, need_pixels=False) or "SeriesInstanceUID" not in ds:
            continue
        groups[str(ds.SeriesInstanceUID)].append((path, ds))
    series = [order_series(uid, members, root) for uid, members in groups.items()]
    names = [s.name for s in series]
    for s in series:
        if names.count(s.name) > 1:
            s.name = f"{s.name}-{series.index(s) + 1}"
    return sorted(series, key=lambda s: natural_key(s.name))


def order_series(uid: str, members: list[tuple[Path, pydicom.Dataset]], root: Path) -> SeriesFiles:
    """A series' files sorted by position along the slice normal (else InstanceNumber, else name)."""
    notes: list[str] = []
    first = members[0][1]
    orient = first.get("ImageOrientationPatient")
    if orient is not None and all("ImagePositionPatient" in ds for _, ds in members):
        normal = np.cross(np.array(orient[:3], float), np.array(orient[3:], float))
        key = lambda m: (float(np.dot(np.array(m[1].ImagePositionPatient, float), normal)), natural_key(m[0].name))
    elif all("InstanceNumber" in ds for _, ds in members):
        notes.append("no slice positions; ordered by InstanceNumber")
        key = lambda m: (int(m[1].InstanceNumber), natural_key(m[0].name))
    else:
        notes.append("no slice positions or instance numbers; ordered by file name")
        key = lambda m: (0, natural_key(m[0].name))
    ordered = sorted(members, key=key)
    folder = os.path.relpath(ordered[0][0].parent, root)
    folder = "" if folder == "." else Path(folder).as_posix()
    number = first.get("SeriesNumber")
    parts = [p for p in (folder.replace("/", "_"), f"S{number}" if number not in (None, "") else "") if p]
    name = "-".join(parts) or "series"
    return SeriesFiles(name, uid, str(first.get("Modality", "")), [p for p, _ in ordered], notes,
                       [header_fields(ds) for _, ds in ordered])
