"""Helpers shared by the tests (no tests here): hand-made DICOM/PNG sources, stores, weights, tiny training runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from safetensors.torch import load_file

from dlseg.store import CaseData, StoreWriter

# Trainer arguments of a tiny CPU run (a 4-wide, 2-level U-Net on 32 px slices); tests append their own.
TINY_RUN = ["--model.base_width", "4", "--model.depth", "2", "--loader.size", "32", "--loader.batch_size", "4",
            "--loader.val_batch_size", "8"]


# ---------------------------------------------------------------------------------------------- DICOM / PNG sources


def write_slice(path: Path, pixels: np.ndarray, z: float, *, modality: str = "CT", series_uid: str = "1.2.3.4",
                slope: float | None = 1.0, intercept: float | None = -1000.0, instance: int = 1,
                orientation=(1, 0, 0, 0, 1, 0), spacing=(0.8, 0.7), series_number: int = 1) -> Path:
    """One single-frame grayscale slice (uint16 or int16 stored values) written as a real DICOM file."""
    pixels = np.ascontiguousarray(pixels)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "Secret^Name"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-100.0, -90.0, float(z)]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 3.0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_sr(path: Path) -> Path:
    """A non-image DICOM object (a bare Structured Report) in a series folder."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def volume(n: int, h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    """Random stored values (uint16) for n slices."""
    return np.random.default_rng(seed).integers(0, 2000, size=(n, h, w), dtype=np.uint16)


def ground(n: int, h: int = 12, w: int = 10, gray: int = 255, seed: int = 1) -> np.ndarray:
    """Random ground-truth PNG contents: 0 or ``gray`` (plus a few other MR organ values)."""
    rng = np.random.default_rng(seed)
    g = np.where(rng.random((n, h, w)) < 0.3, gray, 0).astype(np.uint8)
    g[:, 0, :3] = [126, 189, 252] if gray != 255 else [0, 0, 0]
    return g


def make_ct_patient(root: Path, patient: str, n: int = 5, *, masks: int | None = None, seed: int = 0,
                    ground_dir: bool = True, z0: float = 100.0, dz: float = -2.5) -> tuple[np.ndarray, np.ndarray]:
    """``root/CT/<patient>/DICOM_anon/i0000,0000b.dcm`` + ``Ground/liver_GT_000.png`` (names differ → position)."""
    vol, gt = volume(n, seed=seed), ground(n if masks is None else masks, seed=seed + 1)
    base = root / "CT" / patient
    for k in range(n):
        write_slice(base / "DICOM_anon" / f"i{k:04d},0000b.dcm", vol[k], z0 + dz * k, instance=k + 1,
                    series_uid=f"1.2.3.{seed}")
    if ground_dir:
        (base / "Ground").mkdir(parents=True, exist_ok=True)
        for k in range(len(gt)):
            cv2.imwrite(str(base / "Ground" / f"liver_GT_{k:03d}.png"), gt[k])
    return vol, gt


def make_mr_patient(root: Path, patient: str, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """MR T1DUAL in/out phase (shared Ground, same stems as in-phase) and T2SPIR, CHAOS-style names."""
    base = root / "MR" / patient
    out: dict[str, np.ndarray] = {}
    gt = ground(n, gray=63, seed=seed + 7)
    for seq, folder, prefix, s in (("t1-in", "T1DUAL/DICOM_anon/InPhase", "IMG-0004-", 0),
                                   ("t1-out", "T1DUAL/DICOM_anon/OutPhase", "IMG-0004-", 1),
                                   ("t2", "T2SPIR/DICOM_anon", "IMG-0002-", 2)):
        vol = volume(n, seed=seed * 10 + s)
        number0 = 1 if seq != "t1-out" else 2  # out-phase numbers differ from the shared Ground's stems
        for k in range(n):
            write_slice(base / folder / f"{prefix}{number0 + 2 * k:05d}.dcm", vol[k], 50.0 - 6.0 * k, modality="MR",
                        slope=None, series_uid=f"1.2.4.{seed}.{s}", instance=k + 1)
        out[seq] = vol
    for sub, prefix in (("T1DUAL", "IMG-0004-"), ("T2SPIR", "IMG-0002-")):
        (base / sub / "Ground").mkdir(parents=True, exist_ok=True)
        for k in range(n):
            cv2.imwrite(str(base / sub / "Ground" / f"{prefix}{1 + 2 * k:05d}.png"), gt[k])
    out["ground"] = gt
    return out


def read_sources(files, ground_files=None):
    """Reference decode straight from pydicom (+ modality LUT) and OpenCV, for bit-for-bit comparisons."""
    image = np.stack([apply_modality_lut(pydicom.dcmread(f).pixel_array, pydicom.dcmread(f)) for f in files])
    gt = None if ground_files is None else np.stack([cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in ground_files])
    return image, gt


# ---------------------------------------------------------------------------------------------- stores


def write_store(path: Path, cases: Iterable[CaseData], split: dict[str, Any], label_map: dict[str, str]) -> Path:
    """A finalized store written with ``StoreWriter``, the writer preprocessing uses."""
    writer = StoreWriter(path)
    for case in cases:
        writer.write_case(case)
    writer.finalize(split, label_map)
    return Path(path)


# ---------------------------------------------------------------------------------------------- weights


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (no pickle)."""
    return load_file(str(path))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical tensors under the same names; two empty dicts are not "the same weights"."""
    assert a, "no weights to compare"
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
