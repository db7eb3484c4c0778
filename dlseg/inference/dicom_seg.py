"""DICOM Segmentation output (``--format dicom-seg``): one binary SEG per case, written with highdicom.

Each frame is one predicted organ on one source slice: it references that slice's SOP instance and carries its
ImagePositionPatient, so viewers and PACS overlay it on the series it came from. A SEG copies the patient and
study modules of its source (the standard requires it); dlseg adds no other identifier.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.coding import Code

from dlseg.errors import CaseError, ConfigError, UsageError
from dlseg.fileio import atomic_write
from dlseg.sources.dicom import is_image, read_dataset
from dlseg.sources.layout import source_sets
from dlseg.store import Store

SEG_FILE = "segmentation.dcm"
SERIES_NUMBER = 9100                     # high, so the SEG sorts after the scanner's series
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
# Class label → (segment label, SNOMED CT code); the store's ``--labels organs`` numbering.
ORGANS = {
    1: ("Liver", Code("10200004", "SCT", "Liver")),
    2: ("Right kidney", Code("9846003", "SCT", "Right kidney")),
    3: ("Left kidney", Code("18639004", "SCT", "Left kidney")),
    4: ("Spleen", Code("78961009", "SCT", "Spleen")),
}
AI_FAMILY = Code("123109", "DCM", "Artificial Intelligence")
# Type 2 patient/study attributes a SEG copies: anonymized exports often drop them; they may be present but empty.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def dlseg_version() -> str:
    """The installed dlseg version (``0+unknown`` when running from a bare checkout)."""
    try:
        return importlib.metadata.version("dlseg")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def check_input(kind: str, source_root: str | None) -> None:
    """Refuse ``--format dicom-seg`` for inputs whose cases cannot reach their source DICOM files."""
    if kind == "store" and not source_root:
        raise ConfigError("--format dicom-seg: a store records its cases' DICOM files relative to the folder it "
                          "was preprocessed from, which it does not keep; name that folder with --source-root")
    if kind not in ("store", "chaos", "dicom"):
        raise ConfigError(f"--format dicom-seg: {kind} inputs have no source DICOM slices to reference")


def source_files(kind: str, root: str, case_id: str, files: Sequence[str], source_root: str | None) -> list[Path]:
    """The DICOM files a case's slices came from: the spec's own (DICOM/CHAOS) or the store's under --source-root."""
    if kind != "store":
        return [Path(f) for f in files]
    names = Store(root).info(case_id).attrs.get("source_files") or []
    if not names:
        raise CaseError(root, f"{case_id}: the store records no source files (DICOM-SEG needs them)")
    try:
        roots = [folder for folder, _ in source_sets(Path(source_root or "."))]   # Train_Sets/, Test_Sets/
    except UsageError:
        roots = [Path(source_root or ".")]
    for folder in roots:
        paths = [folder / n for n in names]
        if all(p.is_file() for p in paths):
            return paths
    raise CaseError(roots[0] / names[0], "source DICOM file of a store case not found under --source-root "
                                         "(DICOM-SEG)")


def source_headers(files: Sequence[Path], shape: tuple[int, int, int]) -> list[pydicom.Dataset]:
    """Headers of the image slices among ``files`` (non-images skipped, as the reader does), checked against
    the label volume's shape."""
    slices = [(path, ds) for path, ds in ((p, _header(p)) for p in files) if is_image(ds, need_pixels=False)]
    z, h, w = shape
    if len(slices) != z:
        raise CaseError(Path(files[0]).parent, f"{len(slices)} source slices for {z} predicted slices (DICOM-SEG)")
    for path, ds in slices:
        if (int(ds.Rows), int(ds.Columns)) != (h, w):
            raise CaseError(path, f"slice is {ds.Rows}x{ds.Columns}, the prediction {h}x{w} (DICOM-SEG)")
        for tag in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "ImagePositionPatient",
                    "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise CaseError(path, f"source slice has no {tag}; a DICOM-SEG cannot reference it")
    return [ds for _, ds in slices]


def _header(path: Path) -> pydicom.Dataset:
    """Every attribute of a slice except its pixel data (highdicom copies the patient and study modules)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        read_dataset(path, header_only=True)    # raises the one-line CaseError naming the file and the reason
        raise
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def segment_descriptions(num_classes: int, model_fingerprint: str) -> list[hd.seg.SegmentDescription]:
    """One automatic segment per foreground class, with dlseg and the model as the algorithm."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name="dlseg", family=AI_FAMILY, version=dlseg_version(), source="dlseg",
        parameters={"model_fingerprint": model_fingerprint[:64]})
    out = []
    for label in range(1, max(num_classes, 2)):
        name, code = ORGANS[label]
        out.append(hd.seg.SegmentDescription(
            segment_number=label, segment_label=name, segmented_property_category=ANATOMICAL_STRUCTURE,
            segmented_property_type=code, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=hd.UID(), tracking_id=f"dlseg {name.lower()}"))
    return out


def build_seg(labels: np.ndarray, num_classes: int, headers: Sequence[pydicom.Dataset],
              model_fingerprint: str) -> hd.seg.Segmentation:
    """The SEG object: frame k of the label volume is derived from ``headers[k]``."""
    if int(labels.max(initial=0)) >= max(num_classes, 2):
        raise ValueError(f"label {int(labels.max())} beyond the model's {num_classes} classes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hd.seg.Segmentation(
            source_images=list(headers), pixel_array=np.ascontiguousarray(labels, dtype=np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(num_classes, model_fingerprint),
            series_instance_uid=hd.UID(), series_number=SERIES_NUMBER, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="dlseg", manufacturer_model_name="dlseg U-Net",
            software_versions=dlseg_version(), device_serial_number="none",
            series_description="dlseg segmentation", content_label="DLSEG",
            content_description="automatic segmentation (dlseg)",
            omit_empty_frames=bool(labels.any()))


def write_seg(path: Path, labels: np.ndarray, num_classes: int, files: Sequence[str | os.PathLike],
              model_fingerprint: str) -> None:
    """Write the SEG of a case to ``path`` atomically (temporary name, rename)."""
    headers = source_headers([Path(f) for f in files], tuple(labels.shape))
    seg = build_seg(labels, num_classes, headers, model_fingerprint)
    buf = pydicom.filebase.DicomBytesIO()
    seg.save_as(buf, enforce_file_format=True)
    atomic_write(path, buf.getvalue())


def read_seg_frames(path: Path) -> list[dict[str, Any]]:
    """Each frame of a SEG written here: segment number, referenced SOP instance, position and its binary pixels."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    shared = ds.SharedFunctionalGroupsSequence[0]
    frames = []
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        segment = (item if "SegmentIdentificationSequence" in item else shared).SegmentIdentificationSequence[0]
        frames.append({
            "segment": int(segment.ReferencedSegmentNumber),
            "sop_instance_uid": str(source.ReferencedSOPInstanceUID),
            "position": [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            "pixels": pixels[k].astype(bool),
        })
    return frames
