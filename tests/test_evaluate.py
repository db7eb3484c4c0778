"""dlseg.evaluate: prediction folders (CHAOS PNGs) against a tiny store or the real CHAOS CT case."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from dlseg import evaluate, metrics
from dlseg.inference import outputs
from dlseg.store import CaseData
from helpers import write_store

SPACING = (2.5, 0.7, 0.7)
SHAPE = (6, 12, 10)


def slab(z0: int, z1: int) -> np.ndarray:
    """Liver filling y and x between slices z0..z1-1 (surface: the two end planes only)."""
    m = np.zeros(SHAPE, np.uint8)
    m[z0:z1] = 1
    return m


def cube(offset: int = 0) -> np.ndarray:
    """A 3x4x4 box, optionally shifted along x."""
    m = np.zeros(SHAPE, np.uint8)
    m[1:4, 3:7, 2 + offset:6 + offset] = 1
    return m


TRUTH = {"CT-1": slab(1, 4), "CT-2": cube(), "CT-3": slab(2, 5)}


@pytest.fixture()
def store(tmp_path) -> Path:
    """A finalized store with three labeled CT cases (train CT-1, CT-2; val CT-3) and one unlabeled."""
    cases = [CaseData(cid, np.zeros(SHAPE, np.int16), mask, {"patient": cid[3:], "modality": "CT", "sequence": "ct",
                                                            "spacing": list(SPACING), "fingerprint": cid})
             for cid, mask in TRUTH.items()]
    cases.append(CaseData("CT-test-9", np.zeros(SHAPE, np.int16), None,
                          {"patient": "test-9", "modality": "CT", "sequence": "ct", "spacing": list(SPACING)}))
    return write_store(tmp_path / "truth.zarr", cases, {"train": ["CT-1", "CT-2"], "val": ["CT-3"],
                                                        "unlabeled": ["CT-test-9"], "seed": 0, "method": "fraction"},
                       {"0": "background", "1": "liver"})


def write_prediction(out: Path, case_id: str, mask: np.ndarray, value: int = 63) -> Path:
    """A case folder in the predictor's CHAOS submission layout (names from dlseg.inference.outputs)."""
    case = out / case_id
    case.mkdir(parents=True)
    sources = {}
    for k, (name, sl) in enumerate(zip(outputs.slice_names(len(mask)), mask)):
        assert cv2.imwrite(str(case / name), (sl > 0).astype(np.uint8) * value)
        sources[name] = f"DICOM_anon/i{k:04d},0000b.dcm"
    (case / outputs.SOURCES).write_text(json.dumps(sources))
    (case / outputs.RECORD).write_text(json.dumps({"case_id": case_id, "slices": len(mask),
                                                    "spacing": list(SPACING)}))
    return case


PRED = {"CT-1": slab(2, 5), "CT-2": cube(1), "CT-3": slab(2, 5)}


@pytest.fixture()
def pred_dir(tmp_path) -> Path:
    """Predictions for the three labeled cases: CT-1 one slice off, CT-2 one column off, CT-3 exact."""
    out = tmp_path / "pred"
    for cid, mask in PRED.items():
        write_prediction(out, cid, mask)
    return out


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def test_rows_equal_the_metrics_and_hand_values(store, pred_dir):
    rows, failures = evaluate.evaluate_folder(pred_dir, store)
    assert failures == []
    by_case = {r["case"]: r for r in rows}
    assert sorted(by_case) == ["CT-1", "CT-2", "CT-3"]
    # CT-1: slabs one slice apart: Dice 2/3, every surface voxel 2.5 mm (one slice) from the other surface
    assert by_case["CT-1"]["Dice"] == pytest.approx(2 / 3)
    assert (by_case["CT-1"]["ASSD"], by_case["CT-1"]["MSSD"]) == pytest.approx((2.5, 2.5))
    # CT-2: a 3x4x4 box one column off: overlap 3x4x3
    assert by_case["CT-2"]["Dice"] == pytest.approx(2 * 36 / 96)
    assert by_case["CT-2"]["IoU"] == pytest.approx(36 / 60)
    assert by_case["CT-3"]["Dice"] == 1.0 and by_case["CT-3"]["ASSD"] == 0.0
    for cid, row in by_case.items():
        want = metrics.case_metrics(PRED[cid], TRUTH[cid], SPACING)
        assert row["HD95"] == pytest.approx(want["hd95"]) and row["MSSD"] == pytest.approx(want["mssd"])
        assert row["voxels_truth"] == int(TRUTH[cid].sum())


def test_cli_writes_csv_and_summary(store, pred_dir, tmp_path):
    out_csv = tmp_path / "reports" / "eval.csv"
    assert evaluate.main(["--pred", str(pred_dir), "--truth", str(store), "--csv", str(out_csv)]) == 0
    table = read_csv(out_csv)
    assert list(next(iter(table.values())))[:7] == ["case", "Dice", "RAVD", "ASSD", "MSSD", "HD95", "IoU"]
    assert float(table["CT-1"]["Dice"]) == pytest.approx(2 / 3)
    doc = json.loads(out_csv.with_suffix(".summary.json").read_text())
    assert (doc["cases"], doc["scored"], doc["failed"]) == (3, 3, 0)
    dice = [2 / 3, 72 / 96, 1.0]
    assert doc["metrics"]["Dice"]["mean"] == pytest.approx(np.mean(dice))
    assert doc["metrics"]["Dice"]["std"] == pytest.approx(np.std(dice))
    assert doc["metrics"]["Dice"]["median"] == pytest.approx(72 / 96)
    assert not list(out_csv.parent.glob(".*tmp"))


def test_missing_case_is_reported_and_exit_1(store, pred_dir, capsys):
    shutil.rmtree(pred_dir / "CT-2")
    assert evaluate.main(["--pred", str(pred_dir), "--truth", str(store)]) == 1
    table = read_csv(pred_dir / "evaluation.csv")
    assert sorted(table) == ["CT-1", "CT-3"]
    doc = json.loads((pred_dir / "evaluation.summary.json").read_text())
    assert [f["case"] for f in doc["failures"]] == ["CT-2"]
    assert "no prediction" in doc["failures"][0]["reason"]
    assert "CT-2" in capsys.readouterr().err


def test_garbage_png_fails_alone_with_one_line(store, pred_dir, capsys):
    (pred_dir / "CT-3" / outputs.slice_names(6)[3]).write_bytes(b"this is not a png")
    assert evaluate.main(["--pred", str(pred_dir), "--truth", str(store)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "CT-3" in line]
    assert len(lines) == 1 and "slice_0003.png" in lines[0] and "cannot read PNG" in lines[0]
    assert "Traceback" not in err
    assert sorted(read_csv(pred_dir / "evaluation.csv")) == ["CT-1", "CT-2"]


def test_shape_and_slice_count_mismatch_fail(store, pred_dir):
    shutil.rmtree(pred_dir / "CT-1")
    write_prediction(pred_dir, "CT-1", np.zeros((6, 12, 11), np.uint8))  # wrong width
    outputs.png_files(pred_dir / "CT-2")[5].unlink()                      # record.json says 6 slices
    rows, failures = evaluate.evaluate_folder(pred_dir, store)
    reasons = {f.case_id: f.reason for f in failures}
    assert "6x12x11" in reasons["CT-1"] and "6x12x10" in reasons["CT-1"]
    assert "5 PNGs but record.json says 6" in reasons["CT-2"]
    assert [r["case"] for r in rows] == ["CT-3"]


def test_label_value(store, tmp_path):
    out = tmp_path / "p255"
    for cid, mask in PRED.items():
        write_prediction(out, cid, mask, value=255)
    rows, _ = evaluate.evaluate_folder(out, store, label_value=63)
    assert all(r["voxels_pred"] == 0 and r["Dice"] == 0.0 for r in rows)   # 255 is not the liver value 63
    rows, _ = evaluate.evaluate_folder(out, store, label_value=None)         # --label-value any
    assert {r["case"]: r["Dice"] for r in rows}["CT-3"] == 1.0
    assert evaluate.parse_label_value("any") is None and evaluate.parse_label_value("63") == 63


def test_npz_prediction_without_pngs(store, pred_dir):
    case = pred_dir / "CT-2"
    for png in outputs.png_files(case):
        png.unlink()
    np.savez_compressed(case / outputs.NPZ, **{outputs.NPZ_KEY: PRED["CT-2"]})
    rows, failures = evaluate.evaluate_folder(pred_dir, store)
    assert failures == []
    assert {r["case"]: r["Dice"] for r in rows}["CT-2"] == pytest.approx(72 / 96)


def test_split_selects_cases(store, pred_dir, tmp_path):
    only_val = tmp_path / "val"
    write_prediction(only_val, "CT-3", PRED["CT-3"])
    assert evaluate.main(["--pred", str(only_val), "--truth", str(store), "--split", "val"]) == 0
    assert sorted(read_csv(only_val / "evaluation.csv")) == ["CT-3"]
    assert evaluate.main(["--pred", str(only_val), "--truth", str(store)]) == 1  # train cases have no prediction


def test_unusable_arguments_exit_2(store, pred_dir, tmp_path, capsys):
    assert evaluate.main(["--pred", str(tmp_path / "nope"), "--truth", str(store)]) == 2
    assert evaluate.main(["--pred", str(pred_dir), "--truth", str(store), "--split", "test"]) == 2
    assert evaluate.main(["--pred", str(pred_dir), "--truth", str(tmp_path / "empty_tree")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 3


def test_workers_give_the_same_rows(store, pred_dir):
    one, failed_one = evaluate.evaluate_folder(pred_dir, store, workers=1)
    two, failed_two = evaluate.evaluate_folder(pred_dir, store, workers=2)
    assert not failed_one and not failed_two
    assert len(one) == len(outputs.prediction_cases(pred_dir)) >= 2 and one == two


def test_empty_prediction_scores_documented_values(store, tmp_path):
    out = tmp_path / "empty"
    for cid in TRUTH:
        write_prediction(out, cid, np.zeros(SHAPE, np.uint8))
    assert evaluate.main(["--pred", str(out), "--truth", str(store)]) == 0
    row = read_csv(out / "evaluation.csv")["CT-1"]
    diagonal = metrics.volume_diagonal(SHAPE, SPACING)
    assert (float(row["Dice"]), float(row["RAVD"]), float(row["ASSD"])) == (0.0, 100.0, pytest.approx(diagonal))


# ------------------------------------------------------------------------------- real CHAOS case (official way)
def official_reference(ground: list[Path], seg: list[Path], dicom_dir: Path) -> dict[str, float]:
    """The official CHAOSmetrics.py computation (KD-tree in patient coordinates), written out here."""
    vref = np.array([cv2.imread(str(p), 0) for p in ground]).astype(bool)
    vseg = np.array([cv2.imread(str(p), 0) for p in seg]).astype(bool)
    st = ndimage.generate_binary_structure(3, 1)
    files = sorted(dicom_dir.glob("*.dcm"))
    a, b = pydicom.dcmread(files[0], stop_before_pixels=True), pydicom.dcmread(files[-1], stop_before_pixels=True)
    T1, TN = np.array(a.ImagePositionPatient, float), np.array(b.ImagePositionPatient, float)
    X, Y = np.array(a.ImageOrientationPatient[:3], float), np.array(a.ImageOrientationPatient[3:], float)
    dI, dJ, N = float(a.PixelSpacing[0]), float(a.PixelSpacing[1]), len(files)
    M = np.column_stack([X * dI, Y * dJ, (T1 - TN) / (1 - N), T1])

    def real(v):
        z, r, c = np.nonzero(v ^ ndimage.binary_erosion(v, structure=st, border_value=1))
        return (M @ np.stack([r, c, z, np.ones_like(z)]).astype(float)).T

    pr, ps = real(vref), real(vseg)
    d_sr, _ = cKDTree(pr).query(ps)
    d_rs, _ = cKDTree(ps).query(pr)
    return {
        "Dice": 2 * (vref & vseg).sum() / (vref.sum() + vseg.sum()),
        "RAVD": abs(int(vref.sum()) - int(vseg.sum())) / vref.sum() * 100,
        "ASSD": (d_sr.sum() + d_rs.sum()) / (len(d_sr) + len(d_rs)),
        "MSSD": np.concatenate([d_sr, d_rs]).max(),
    }


def test_real_chaos_case_agrees_with_official_code(chaos_ct_case, tmp_path):
    tree = tmp_path / "chaos" / "Train_Sets" / "CT"
    tree.mkdir(parents=True)
    (tree / "3").symlink_to(chaos_ct_case, target_is_directory=True)
    ground = sorted((chaos_ct_case / "Ground").glob("*.png"))
    pred = np.array([cv2.imread(str(p), 0) > 0 for p in ground])
    pred = ndimage.binary_erosion(pred, iterations=2)     # a segmentation a bit too small ...
    pred[30:34] = np.roll(pred[30:34], 5, axis=2)          # ... and shifted on a few slices
    case = write_prediction(tmp_path / "pred", "CT-3", pred.astype(np.uint8))
    # the official slice step |T_N - T_1| / (N - 1) = 154 mm / 77 = 2.0 mm (SliceThickness says 3.2)
    dicoms = sorted((chaos_ct_case / "DICOM_anon").glob("*.dcm"))
    assert evaluate.official_spacing(dicoms) == (2.0, 0.7265625, 0.7265625)

    rows, failures = evaluate.evaluate_folder(tmp_path / "pred", tmp_path / "chaos", modality="ct")
    assert failures == []
    ref = official_reference(ground, outputs.png_files(case), chaos_ct_case / "DICOM_anon")
    for key, value in ref.items():
        assert round(rows[0][key], 3) == round(float(value), 3), key
        assert rows[0][key] == pytest.approx(value, abs=1e-6), key
