"""Part 10 DICOM series (pydicom) and 8-bit Ground PNGs, written from rendered volumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid

from dlseg.synthetic.anatomy import Grid


@dataclass(frozen=True)
class SeriesMeta:
    """Everything one DICOM series shares."""

    modality: str                 # "CT" | "MR"
    patient_id: str
    study_uid: str
    series_uid: str
    frame_uid: str
    series_number: int
    description: str
    grid: Grid
    z_top: float                  # z (mm) of t = 0; z decreases towards the feet
    length_mm: float              # extent of t in [0, 1]
    thickness: float
    spacing_between: float
    uid_key: tuple[str, ...]      # entropy for SOP instance UIDs
    extra: dict = field(default_factory=dict)

    def z(self, k: int) -> float:
        """Slice position (mm) of slice k."""
        return round(self.z_top - float(self.grid.t[k]) * self.length_mm, 3)


def series_template(meta: SeriesMeta) -> Dataset:
    """The tags every slice of the series shares (Part 10 file meta included)."""
    ct = meta.modality == "CT"
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = CTImageStorage if ct else MRImageStorage
    fm.TransferSyntaxUID = ImplicitVRLittleEndian if ct else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = fm.MediaStorageSOPClassUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ""
    ds.StudyTime = "120000"
    ds.Modality = meta.modality
    ds.Manufacturer = "dlseg synthetic"
    ds.ManufacturerModelName = "phantom"
    ds.StudyDescription = "SYNTHETIC ABDOMEN"
    ds.SeriesDescription = meta.description
    ds.ProtocolName = meta.description
    ds.PatientName = "Anonymized"
    ds.PatientID = meta.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "FFS" if ct else "HFS"
    ds.SliceThickness = f"{meta.thickness:.2f}"
    ds.SpacingBetweenSlices = f"{meta.spacing_between:.2f}"
    ds.StudyInstanceUID = meta.study_uid
    ds.SeriesInstanceUID = meta.series_uid
    ds.FrameOfReferenceUID = meta.frame_uid
    ds.StudyID = "1"
    ds.SeriesNumber = meta.series_number
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [round(meta.grid.spacing, 6), round(meta.grid.spacing, 6)]
    for key, value in meta.extra.items():
        setattr(ds, key, value)
    ds.RescaleIntercept = -1000 if ct else 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU" if ct else "US"
    return ds


def write_series(folder: Path, names: Sequence[str], volume: np.ndarray, meta: SeriesMeta,
                 instances: Sequence[int]) -> None:
    """Write slice k of ``volume`` as ``folder/names[k]`` with InstanceNumber ``instances[k]``."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = series_template(meta)
    x0, y0 = round(float(meta.grid.x[0]), 4), round(float(meta.grid.y[0]), 4)
    for k, (name, inst) in enumerate(zip(names, instances)):
        uid = generate_uid(entropy_srcs=[*meta.uid_key, "sop", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = int(inst)
        ds.ImagePositionPatient = [x0, y0, meta.z(k)]
        ds.SliceLocation = meta.z(k)
        ds.set_pixel_data(volume[k], "MONOCHROME2", 12, generate_instance_uid=False)
        ds.save_as(folder / name, enforce_file_format=True)


def write_ground(folder: Path, names: Sequence[str], masks: np.ndarray) -> None:
    """Write one 8-bit PNG per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in zip(names, masks):
        if not cv2.imwrite(str(folder / name), m):
            raise OSError(f"{folder / name}: could not write PNG")
