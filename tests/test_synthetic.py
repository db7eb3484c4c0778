"""The synthetic CHAOS cohort: exact layout, real DICOM tags, masks, contrast, determinism, CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, MRImageStorage

from dlseg.errors import ConfigError
from dlseg.sources.layout import discover
from dlseg.synthetic import cohort, generate, main

MR_VALUES = {0, 63, 126, 189, 252}
TINY = dict(size_range=(40, 48), slices_range=(8, 10))


def natural(path: Path) -> list:
    """Natural sort key: numbers compare as numbers."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def files(folder: Path, ext: str) -> list[Path]:
    """The files of a folder with one extension, in natural order."""
    return sorted(folder.glob(f"*.{ext}"), key=natural)


def read_volume(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """Modality-LUT values (Z, H, W) and the datasets of a DICOM folder, in file-name order."""
    dss = [pydicom.dcmread(f) for f in files(folder, "dcm")]
    return np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in dss]).astype(np.float32), dss


def read_ground(folder: Path) -> np.ndarray:
    """Ground PNGs (Z, H, W) uint8 in file-name order."""
    return np.stack([cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in files(folder, "png")])


def patients(root: Path, modality: str) -> list[Path]:
    """Patient folders of one modality in Train_Sets."""
    return sorted((root / "Train_Sets" / modality).iterdir(), key=natural)


def best_interval_dice(volume: np.ndarray, truth: np.ndarray) -> float:
    """The best Dice any single intensity interval [lo, hi] reaches against ``truth``."""
    edges = np.percentile(volume, np.linspace(0.5, 99.5, 48))
    n_true, best = truth.sum(), 0.0
    for i, lo in enumerate(edges):
        for hi in edges[i + 1:]:
            pred = (volume >= lo) & (volume <= hi)
            best = max(best, 2.0 * (pred & truth).sum() / (pred.sum() + n_true))
    return best


# ----------------------------------------------------------------------------------------------- layout

def test_layout_and_file_names(synthetic_root):
    ct, mr = patients(synthetic_root, "CT"), patients(synthetic_root, "MR")
    assert len(ct) == 6 and len(mr) == 6
    assert all(p.name.isdigit() for p in ct + mr)
    assert [p.name for p in mr] == ["1", "2", "3", "5", "8", "10"]      # CHAOS-like, two-digit id included
    assert not (synthetic_root / "Test_Sets").exists()
    for p in ct:
        dcm, png = files(p / "DICOM_anon", "dcm"), files(p / "Ground", "png")
        assert [f.name for f in dcm] == [f"i{k:04d},0000b.dcm" for k in range(len(dcm))]
        assert [f.name for f in png] == [f"liver_GT_{k:03d}.png" for k in range(len(dcm))]
        assert 10 <= len(dcm) <= 14
    for p in mr:
        inp = files(p / "T1DUAL" / "DICOM_anon" / "InPhase", "dcm")
        outp = files(p / "T1DUAL" / "DICOM_anon" / "OutPhase", "dcm")
        g1 = files(p / "T1DUAL" / "Ground", "png")
        t2, g2 = files(p / "T2SPIR" / "DICOM_anon", "dcm"), files(p / "T2SPIR" / "Ground", "png")
        assert len(inp) == len(outp) == len(g1) and 10 <= len(inp) <= 14
        assert len(t2) == len(g2) and 10 <= len(t2) <= 14
        pattern = re.compile(r"IMG-\d{4}-\d{5}")
        assert all(pattern.fullmatch(f.stem) for f in inp + outp + g1 + t2 + g2)
        assert [f.stem for f in g1] == [f.stem for f in inp]            # in-phase pairs by stem
        assert not {f.stem for f in outp} & {f.stem for f in g1}        # out-phase pairs by position
        assert [f.stem for f in g2] == [f.stem for f in t2]
    assert not list(synthetic_root.rglob(".*tmp*"))                      # scratch folder removed when done


def test_sizes_and_slice_counts_vary(synthetic_root):
    shapes = {pydicom.dcmread(files(p / "DICOM_anon", "dcm")[0]).pixel_array.shape
              for p in patients(synthetic_root, "CT")}
    counts = {len(files(p / "T1DUAL" / "DICOM_anon" / "InPhase", "dcm")) for p in patients(synthetic_root, "MR")}
    assert len(shapes) > 1 and len(counts) > 1
    for shape in shapes:
        assert all(48 <= n <= 64 for n in shape)


def test_test_sets_have_no_ground(tmp_path):
    generate(tmp_path, patients=1, modality="both", seed=3, test_patients=2, **TINY)
    for mod in ("CT", "MR"):
        train = {p.name for p in (tmp_path / "Train_Sets" / mod).iterdir()}
        test = {p.name for p in (tmp_path / "Test_Sets" / mod).iterdir()}
        assert len(train) == 1 and len(test) == 2 and not train & test
        for p in (tmp_path / "Test_Sets" / mod).iterdir():
            assert not list(p.rglob("Ground")) and list(p.rglob("*.dcm"))
    assert (tmp_path / "Test_Sets" / "MR" / "2" / "T1DUAL" / "DICOM_anon" / "OutPhase").is_dir()


# ----------------------------------------------------------------------------------------------- DICOM

def test_ct_tags_and_hounsfield_units(synthetic_root):
    p = patients(synthetic_root, "CT")[0]
    hu, dss = read_volume(p / "DICOM_anon")
    mask = read_ground(p / "Ground")
    ds = dss[0]
    assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage == ds.SOPClassUID
    assert ds.Modality == "CT" and ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert float(ds.RescaleIntercept) == -1000.0 and float(ds.RescaleSlope) == 1.0
    assert (ds.Rows, ds.Columns) == mask.shape[1:]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.SOPInstanceUID for d in dss}) == len(dss)
    assert [d.InstanceNumber for d in dss] == list(range(1, len(dss) + 1))
    raw = ds.pixel_array
    assert raw.dtype == np.uint16 and np.array_equal(hu[0], raw.astype(np.float32) - 1000.0)
    assert hu.min() >= -1000 and hu[:, :2, :2].mean() < -950                 # air in the corners
    liver = hu[mask == 255]
    assert 40 < np.median(liver) < 170                                         # enhanced liver parenchyma
    assert hu.max() > 400                                                      # bone


def test_slice_positions_run_against_file_order(synthetic_root):
    for folder in (patients(synthetic_root, "CT")[1] / "DICOM_anon",
                   patients(synthetic_root, "MR")[1] / "T1DUAL" / "DICOM_anon" / "InPhase"):
        _, dss = read_volume(folder)
        z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
        step = np.diff(z)
        assert np.all(step < 0)                                     # file 0 is the head end; z decreases
        assert np.allclose(-step, float(dss[0].SpacingBetweenSlices), atol=0.01)
        assert float(dss[0].SliceThickness) <= float(dss[0].SpacingBetweenSlices) + 1e-6
        assert np.allclose([float(d.SliceLocation) for d in dss], z)


def test_mr_tags_and_in_out_phase(synthetic_root):
    p = patients(synthetic_root, "MR")[0]
    inp, dss_in = read_volume(p / "T1DUAL" / "DICOM_anon" / "InPhase")
    outp, dss_out = read_volume(p / "T1DUAL" / "DICOM_anon" / "OutPhase")
    t2, dss_t2 = read_volume(p / "T2SPIR" / "DICOM_anon")
    for ds in (dss_in[0], dss_out[0], dss_t2[0]):
        assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR"
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
    assert float(dss_in[0].EchoTime) > float(dss_out[0].EchoTime)             # 4.6 ms vs 2.3 ms at 1.5 T
    assert dss_in[0].SeriesInstanceUID != dss_out[0].SeriesInstanceUID
    assert dss_in[0].StudyInstanceUID == dss_out[0].StudyInstanceUID == dss_t2[0].StudyInstanceUID
    # co-registered: same geometry slice by slice
    for a, b in zip(dss_in, dss_out):
        assert a.ImagePositionPatient == b.ImagePositionPatient and a.PixelSpacing == b.PixelSpacing
    assert inp.shape == outp.shape and not np.array_equal(inp, outp)
    body = inp > np.percentile(inp, 60)
    assert outp[body].mean() < 0.9 * inp[body].mean()        # fat-water cancellation darkens out-phase
    fat = inp > np.percentile(inp, 97)                       # the brightest in-phase voxels are fat: they survive
    assert outp[fat].mean() > 0.5 * inp[fat].mean()


def test_no_real_identifiers(synthetic_root):
    for f in list(synthetic_root.rglob("*.dcm"))[::25]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert str(ds.PatientName) == "Anonymized"
        assert re.fullmatch(r"SYN-(CT|MR)-\d{4}", ds.PatientID)
        assert ds.get("PatientBirthDate", "") == "" and ds.get("InstitutionName") is None
        assert ds.get("StudyDate", "") == "" and ds.get("ReferringPhysicianName") is None


# ----------------------------------------------------------------------------------------------- masks

def test_mr_masks_gray_values_and_liver_extent(synthetic_root):
    seen: set[int] = set()
    for p in patients(synthetic_root, "MR"):
        for g in (p / "T1DUAL" / "Ground", p / "T2SPIR" / "Ground"):
            m = read_ground(g)
            assert m.dtype == np.uint8 and set(np.unique(m).tolist()) <= MR_VALUES
            liver = (m == 63).reshape(len(m), -1).any(axis=1)
            assert liver[len(m) // 2]                        # liver in the middle slice
            assert not liver[0] or not liver[-1]             # and absent at an end
            seen |= set(np.unique(m).tolist())
    assert seen == MR_VALUES                                 # liver, both kidneys and spleen all occur


def test_ct_masks_values_and_liver_extent(synthetic_root):
    for p in patients(synthetic_root, "CT"):
        m = read_ground(p / "Ground")
        assert set(np.unique(m).tolist()) == {0, 255}
        liver = (m == 255).reshape(len(m), -1).any(axis=1)
        assert liver[len(m) // 2] and not liver[0]


def test_kidneys_on_the_correct_side(synthetic_root):
    m = read_ground(patients(synthetic_root, "MR")[2] / "T1DUAL" / "Ground")
    cols = np.arange(m.shape[2])
    right = cols[np.nonzero(m == 126)[2]].mean()            # patient right = image left
    left = cols[np.nonzero(m == 189)[2]].mean()
    liver = cols[np.nonzero(m == 63)[2]].mean()
    spleen = cols[np.nonzero(m == 252)[2]].mean()
    assert right < left and liver < spleen


def test_a_threshold_does_not_segment_the_liver(synthetic_root):
    p = patients(synthetic_root, "MR")[0]
    inp, _ = read_volume(p / "T1DUAL" / "DICOM_anon" / "InPhase")
    assert best_interval_dice(inp, read_ground(p / "T1DUAL" / "Ground") == 63) < 0.8
    q = patients(synthetic_root, "CT")[0]
    hu, _ = read_volume(q / "DICOM_anon")
    assert best_interval_dice(hu, read_ground(q / "Ground") == 255) < 0.8


# ----------------------------------------------------------------------------------------------- determinism

def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Relative path → file bytes of a tree."""
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = _tree_bytes(generate(tmp_path / "a", patients=1, modality="both", seed=0, **TINY))
    b = _tree_bytes(generate(tmp_path / "b", patients=1, modality="both", seed=0, **TINY))
    assert a == b and len(a) > 40
    c = _tree_bytes(generate(tmp_path / "c", patients=1, modality="both", seed=1, **TINY))
    shared = set(a) & set(c)
    assert sum(a[k] != c[k] for k in shared) > 0.9 * len(shared)


def test_t1_in_only_with_two_workers_gives_the_same_bytes(tmp_path):
    full = _tree_bytes(generate(tmp_path / "full", patients=2, modality="mr", seed=0, **TINY))
    only = _tree_bytes(generate(tmp_path / "only", patients=2, modality="mr", seed=0, sequences=("t1-in",),
                                workers=2, **TINY))
    assert only and all(full[rel] == data for rel, data in only.items())
    assert not any("OutPhase" in rel or "T2SPIR" in rel for rel in only)
    assert {rel for rel in full if "InPhase" in rel or "T1DUAL/Ground" in rel} == set(only)


def test_a_patient_does_not_depend_on_the_cohort_size(tmp_path):
    one = _tree_bytes(generate(tmp_path / "one", patients=1, modality="ct", seed=5, **TINY))
    three = _tree_bytes(generate(tmp_path / "three", patients=3, modality="ct", seed=5, **TINY))
    assert one and all(three[rel] == data for rel, data in one.items())
    assert len(three) > len(one)


def test_rerun_replaces_a_patient_and_a_failed_patient_leaves_nothing(tmp_path, monkeypatch):
    generate(tmp_path, patients=1, modality="ct", seed=0, **TINY)
    before = _tree_bytes(tmp_path)
    generate(tmp_path, patients=1, modality="ct", seed=0, **TINY)
    assert _tree_bytes(tmp_path) == before

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cohort, "write_ground", broken)
    with pytest.raises(OSError):
        generate(tmp_path / "x", patients=1, modality="mr", seed=0, **TINY)
    assert [p for p in (tmp_path / "x").rglob("*") if p.is_file()] == []
    assert list((tmp_path / "x" / "Train_Sets" / "MR").iterdir()) == []
    assert not (tmp_path / "x" / ".synthetic-tmp").exists()


def test_scratch_of_a_killed_run_is_not_a_patient(tmp_path):
    generate(tmp_path, patients=2, modality="mr", seed=0, **TINY)
    scratch = tmp_path / ".synthetic-tmp"                                # what kill -9 mid-patient leaves
    scratch.mkdir()
    (tmp_path / "Train_Sets" / "MR" / "1").rename(scratch / "MR-1-abc")
    cases, failures = discover(tmp_path, "t1-in")
    assert [c.case_id for c in cases] == ["MR-2-T1in"] and not failures


def test_bad_values_raise_config_errors(tmp_path):
    for kwargs in ({"patients": 0}, {"patients": 1, "modality": "pet"}, {"patients": 1, "size_range": (64, 48)},
                   {"patients": 1, "slices_range": (2, 3)}, {"patients": 1, "test_patients": -1},
                   {"patients": 1, "sequences": ("t1",)}, {"patients": 1, "sequences": ()},
                   {"patients": 1, "workers": 0}):
        with pytest.raises(ConfigError):
            generate(tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_writes_and_summarizes(tmp_path, capsys):
    code = main([str(tmp_path), "--patients", "1", "--modality", "ct", "--seed", "2", "--size", "40", "44",
                 "--slices", "8", "9", "--test-patients", "1"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("wrote 2 patients (2 CT, 0 MR; 1 in Test_Sets)")
    assert (tmp_path / "Train_Sets" / "CT" / "1" / "Ground").is_dir()
    assert (tmp_path / "Test_Sets" / "CT" / "2" / "DICOM_anon").is_dir()


@pytest.mark.parametrize("argv", [
    ["--patients", "0"], ["--patients", "2", "--modality", "pet"], ["--patients", "2", "--size", "64", "48"],
    ["--patients", "2", "--slices", "3", "40"], ["--patients", "x"], [], ["--patients", "1", "--size", "64"],
])
def test_cli_bad_arguments_exit_2(tmp_path, argv, capsys):
    assert main([str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_as_module_exit_codes(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "preprocess.synthetic", str(tmp_path), "--patients", "-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "patients" in bad.stderr and "Traceback" not in bad.stderr
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    res = subprocess.run([sys.executable, "-m", "preprocess.synthetic", str(blocked), "--patients", "1",
                          "--size", "32", "32", "--slices", "6", "6"], capture_output=True, text=True)
    assert res.returncode == 1 and "file" in res.stderr and "Traceback" not in res.stderr
