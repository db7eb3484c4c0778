"""One NIfTI case: read the image and its labels into canonical (z, y, x) order, validate, build the store record."""

from __future__ import annotations

import numpy as np

from dlseg.normalize import intensity_stats
from dlseg.store import CaseData

from dlseg.sources.layout import CaseSource
from dlseg.sources.nifti_volume import read_labels, read_volume


def store_labels(labels: np.ndarray, values: dict[int, int]) -> np.ndarray:
    """Declared label values → store labels (uint8) through one lookup table."""
    lut = np.zeros(max(values) + 1, np.uint8)
    for value, label in values.items():
        lut[value] = label
    return lut[labels]


def convert_nifti_case(src: CaseSource, labels: str, fingerprint: str) -> CaseData:
    """Decode a NIfTI case and build its store record (``dlseg.store.CASE_KEYS``; ``nifti`` holds the geometry)."""
    values = src.label_values or {0: 0, 1: 1}
    volume = read_volume(src.image_files[0])
    mask = None
    if src.mask_files is not None:
        mask = store_labels(read_labels(src.mask_files[0], set(values), like=volume), values)
    attrs = {
        "patient": src.patient, "modality": src.modality, "sequence": src.sequence,
        "group": "labeled" if mask is not None else "unlabeled",
        "spacing": volume.spacing, "origin": volume.origin, "direction": volume.direction,
        "source_files": src.relative(src.image_files), "mask_files": src.relative(src.mask_files),
        "order": src.order, "fingerprint": fingerprint,
        "stats": intensity_stats(volume.data, src.modality), "labels": labels,
        "notes": list(src.notes), "nifti": volume.geometry,
    }
    return CaseData(src.case_id, volume.data, mask, attrs)
