"""One case: decode its DICOM series and ground truth, build the store record, write it (in a worker)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlseg.normalize import intensity_stats
from dlseg.store import CaseData, StoreWriter, fingerprint_files

from dlseg.preprocessing.convert_nifti import convert_nifti_case
from dlseg.preprocessing.qa import write_qa
from dlseg.sources.dicom import Volume, read_series
from dlseg.errors import CaseError, one_line
from dlseg.sources.layout import CaseSource
from dlseg.sources.masks import read_masks

CONVERTER_VERSION = 1  # bump when conversion output changes for the same sources


@dataclass
class CaseResult:
    """What a worker reports back: small and picklable (never the volume)."""

    case_id: str
    status: str                  # written | skipped | failed
    slices: int
    path: str = ""               # file at fault (failed)
    reason: str = ""             # one line (failed)
    notes: list[str] = field(default_factory=list)
    subject: str | None = None


def case_fingerprint(src: CaseSource, labels: str) -> str:
    """SHA-256 of the source files (relative names + bytes) and the conversion settings."""
    files = src.image_files + (src.mask_files or [])
    names = src.relative(files)
    h = hashlib.sha256(f"dlseg-preprocess:{CONVERTER_VERSION}:{src.modality}:{labels}:".encode())
    if src.label_values is not None:   # a NIfTI case: dataset.json's label values decide the mask too
        h.update(json.dumps(sorted(src.label_values.items())).encode())
    h.update(fingerprint_files(files, names).encode())
    return h.hexdigest()


@dataclass
class Decoded:
    """A decoded case: the volume, its label mask (or None) and the mask files actually used."""

    volume: Volume
    mask: np.ndarray | None
    mask_files: list[Path] | None


def decode_volume(src: CaseSource, labels: str = "liver") -> Decoded:
    """Decode the series and, when labeled, its masks paired slice for slice."""
    volume = read_series(src.image_files)
    masks = src.mask_files
    if masks is not None and volume.skipped:
        if src.order != "stem":
            raise CaseError(src.image_files[0].parent,
                            f"{len(volume.files)} image slices (after skipping non-image files) "
                            f"but {len(masks)} ground-truth PNGs")
        by_image = dict(zip(src.image_files, masks))
        masks = [by_image[p] for p in volume.files]
    mask = None if masks is None else read_masks(masks, src.modality, labels)
    if mask is not None and mask.shape != volume.image.shape:
        raise CaseError(masks[0], f"ground truth is {'x'.join(map(str, mask.shape))} (slices x rows x cols) "
                                  f"but the image is {'x'.join(map(str, volume.image.shape))}")
    if volume.modality and volume.modality != src.modality:
        volume.warnings.append(f"DICOM Modality is {volume.modality}, folder says {src.modality}")
    return Decoded(volume, mask, masks)


def decode_case(src: CaseSource, labels: str = "liver") -> tuple[np.ndarray, np.ndarray | None]:
    """Decode only: (image, mask) as the store would hold them (the benchmark's baseline)."""
    decoded = decode_volume(src, labels)
    return decoded.volume.image, decoded.mask


def convert_case(src: CaseSource, labels: str = "liver", fingerprint: str | None = None) -> CaseData:
    """Decode a case and build its store record (attributes per ``dlseg.store.CASE_KEYS``)."""
    if src.kind == "nifti":
        return convert_nifti_case(src, labels, fingerprint or case_fingerprint(src, labels))
    decoded = decode_volume(src, labels)
    volume = decoded.volume
    attrs = {
        "patient": src.patient, "modality": src.modality, "sequence": src.sequence,
        "group": "labeled" if decoded.mask is not None else "unlabeled",
        "spacing": list(volume.spacing), "origin": list(volume.origin), "direction": list(volume.direction),
        "source_files": src.relative(volume.files), "mask_files": src.relative(decoded.mask_files),
        "order": src.order, "fingerprint": fingerprint or case_fingerprint(src, labels),
        "stats": intensity_stats(volume.image, src.modality), "labels": labels,
        "notes": list(src.notes) + volume.warnings,
    }
    return CaseData(src.case_id, volume.image, decoded.mask, attrs)


def process_case(store_path: str, src: CaseSource, labels: str, qa_dir: str | None = None) -> CaseResult:
    """Worker entry: skip when unchanged, else convert and write atomically; never raises for bad input."""
    n = src.slice_count
    try:
        writer = StoreWriter(store_path)
        fingerprint = case_fingerprint(src, labels)
        qa_png = Path(qa_dir) / f"{src.case_id}.png" if qa_dir else None
        if writer.complete_fingerprint(src.case_id) == fingerprint and (qa_png is None or qa_png.is_file()):
            return CaseResult(src.case_id, "skipped", n, subject=src.subject)
        case = convert_case(src, labels, fingerprint)
        writer.write_case(case)
        if qa_png is not None:
            write_qa(qa_png, case.image, case.mask, case.attrs["stats"], src.modality, src.case_id)
        return CaseResult(src.case_id, "written", n, notes=case.attrs["notes"], subject=src.subject)
    except CaseError as e:
        return CaseResult(src.case_id, "failed", n, path=rel_or_abs(e.path, src.root), reason=e.reason, subject=src.subject)
    except MemoryError:
        return CaseResult(src.case_id, "failed", n, path=str(src.image_files[0].parent), reason="out of memory", subject=src.subject)
    except OSError as e:
        return CaseResult(src.case_id, "failed", n, path=str(e.filename or store_path),
                          reason=one_line(e.strerror or e), subject=src.subject)
    except Exception as e:  # a library choking on odd input must not stop the other cases
        return CaseResult(src.case_id, "failed", n, path=str(src.image_files[0].parent),
                          reason=f"unexpected error ({type(e).__name__}: {one_line(e, 200)})", subject=src.subject)


def rel_or_abs(path: str, root: Path) -> str:
    """A path relative to the source root when inside it (shorter in tables), else as given."""
    p, r = Path(path).resolve(), root.resolve()
    return p.relative_to(r).as_posix() if p.is_relative_to(r) else path
