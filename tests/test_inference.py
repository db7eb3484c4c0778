"""dlseg.inference: the in-memory API against the file-based run, the folder format, the generated flags."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from dlseg import evaluate
from dlseg.config import parse_args
from dlseg.errors import ConfigError
from dlseg.inference import outputs
from dlseg.inference.config import PredictConfig, Shard
from dlseg.inference.predictor import Predictor
from dlseg.inference.runner import predict_cohort
from dlseg.sources.dicom import read_series
from dlseg.sources.layout import discover
from dlseg.store import Store

from test_predict import make_model


@pytest.fixture(scope="module")
def one_mr_case(synthetic_root, tmp_path_factory) -> Path:
    """A CHAOS tree holding one MR patient (one case: the run's batches are the in-memory call's batches)."""
    root = tmp_path_factory.mktemp("one_case")
    shutil.copytree(synthetic_root / "Train_Sets" / "MR" / "1", root / "Train_Sets" / "MR" / "1")
    return root


def file_run(model: Path, inp: Path, out: Path, **kw) -> dict:
    return predict_cohort(PredictConfig(model=str(model), input=str(inp), out=str(out), workers=0, batch_size=16,
                                        formats=("png", "npz"), **kw))


@pytest.mark.parametrize("options", [{}, {"tta": True, "keep_largest": True, "threshold": 0.3}])
def test_in_memory_equals_the_written_case(one_mr_case, tmp_path, options):
    model = make_model(tmp_path / "m", "MR", "t1-in")
    summary = file_run(model, one_mr_case, tmp_path / "out", label_value=200, **options)
    (case,) = discover(one_mr_case, "t1-in", "liver")[0]
    image = read_series(case.image_files).image
    folder = tmp_path / "out" / case.case_id
    assert summary["predicted"] == 1

    pred = Predictor.load(model, **options)
    labels, probs = pred.predict_volume(image, batch_size=16)
    written = outputs.read_labels(folder)
    assert labels.dtype == np.uint8 and labels.shape == image.shape and 0 < labels.sum() < labels.size
    assert np.array_equal(labels, written)
    pngs = np.stack([cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in outputs.png_files(folder)])
    assert np.array_equal(outputs.png_values(labels, 1, 200), pngs)
    assert probs.shape == (image.shape[0], 1) + image.shape[1:] and probs.dtype == np.float32
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    raw = (probs[:, 0] > pred.threshold).astype(np.uint8)
    if options.get("keep_largest"):
        assert (labels <= raw).all() and labels.sum() > 0          # the filter only removes voxels
    else:
        assert np.array_equal(labels, raw)
    assert np.array_equal(pred.segment(image, batch_size=16), labels)


def test_in_memory_multiclass_is_the_argmax(one_mr_case, tmp_path):
    model = make_model(tmp_path / "organs", "MR", "t1-in", num_classes=5, labels="organs", context=1)
    file_run(model, one_mr_case, tmp_path / "out")
    (case,) = discover(one_mr_case, "t1-in", "organs")[0]
    labels, probs = Predictor.load(model).predict_volume(read_series(case.image_files).image, batch_size=16)
    assert np.array_equal(labels, outputs.read_labels(tmp_path / "out" / case.case_id))
    assert probs.shape[1] == 5 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(labels, probs.argmax(axis=1)) and len(np.unique(labels)) > 1


def test_in_memory_store_case_with_its_stats(synthetic_store, tmp_path):
    model = make_model(tmp_path / "m", "MR", "t1-in")
    store = Store(synthetic_store)
    cid = store.split_cases("val")[0]
    predict_cohort(PredictConfig(model=str(model), input=str(synthetic_store), out=str(tmp_path / "out"),
                                 split="val", workers=0, batch_size=64, formats=("npz",)))
    image, _ = store.read_case(cid)
    labels, _ = Predictor.load(model).predict_volume(image, store.info(cid).attrs["stats"], batch_size=64)
    assert np.array_equal(labels, outputs.read_labels(tmp_path / "out" / cid))


def test_documented_folder_format(tmp_path):
    """The names and values README and the CHAOS submission format promise."""
    assert outputs.slice_names(3) == ["slice_0000.png", "slice_0001.png", "slice_0002.png"]
    assert outputs.slice_names(10001)[-1] == "slice_10000.png"
    assert (outputs.RECORD, outputs.SOURCES, outputs.NPZ, outputs.NPZ_KEY, outputs.NIFTI, outputs.OVERLAYS) == (
        "record.json", "sources.json", "prediction.npz", "mask", "prediction.nii.gz", "overlays")
    assert outputs.summary_files(tmp_path) == (tmp_path / "summary.csv", tmp_path / "summary.json")
    assert outputs.summary_files(tmp_path, Shard(1, 3))[0] == tmp_path / "summary-shard-1-of-3.csv"
    assert outputs.failure_note(tmp_path, "CT-1") == tmp_path / ".failed" / "CT-1.json"
    labels = np.arange(7, dtype=np.uint8).reshape(1, 1, 7)
    assert outputs.png_values(labels, 5, 63).tolist() == [[[0, 63, 126, 189, 252, 255, 255]]]
    assert outputs.png_values(labels, 1, 200).tolist() == [[[0, 200, 200, 200, 200, 200, 200]]]
    assert outputs.LIVER_GRAY == 63 == PredictConfig().label_value


def test_written_case_reads_back(tmp_path):
    labels = np.zeros((3, 5, 4), np.uint8)
    labels[1, 1:4, 1:3] = 1
    labels[2, 0, 0] = 2
    case = outputs.CaseOutput("MR-1", labels, 3, ["a.dcm", "b.dcm", "c.dcm"],
                              {"spacing": [2.0, 1.0, 0.5], "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]})
    rec = outputs.write_case(tmp_path, case, ("png", "npz"), False, 63, {"input_fingerprint": "x"}, 0.0)
    folder = tmp_path / "MR-1"
    assert outputs.read_record(folder) == rec and rec["input_fingerprint"] == "x"
    assert rec["liver_volume_ml"] == pytest.approx(6 * 1.0 / 1000) and rec["class_volumes_ml"]["2"] == 0.001
    assert outputs.read_sources(folder) == dict(zip(outputs.slice_names(3), ["a.dcm", "b.dcm", "c.dcm"]))
    assert np.array_equal(outputs.read_labels(folder), labels)
    assert np.array_equal(outputs.read_prediction(folder, 63), labels == 1)           # PNG 63 = liver
    assert np.array_equal(outputs.read_prediction(folder, None), labels > 0)         # any organ
    for png in outputs.png_files(folder):
        png.unlink()
    assert np.array_equal(outputs.read_prediction(folder, 63), labels == 1)           # from the npz
    assert outputs.prediction_cases(tmp_path) == ["MR-1"]
    assert not list(tmp_path.glob(outputs.TMP_PREFIX + "*"))


def test_predict_flags_fill_the_config():
    argv = ["--model", "m", "--input", "i", "--out", "o", "--input-kind", "store", "--split", "val",
            "--batch-size", "4", "--workers", "1", "--prefetch", "3", "--write-threads", "2",
            "--max-pending-writes", "5", "--tta", "--keep-largest", "--threshold", "0.3", "--format", "png, nifti",
            "--overlays", "--label-value", "200", "--mixed-precision", "bf16", "--shard", "1/4"]
    assert parse_args(PredictConfig, argv, "p", "d") == PredictConfig(
        model="m", input="i", out="o", input_kind="store", split="val", batch_size=4, workers=1, prefetch=3,
        write_threads=2, max_pending_writes=5, tta=True, keep_largest=True, threshold=0.3,
        formats=("png", "nifti"), overlays=True, label_value=200, mixed_precision="bf16", shard="1/4")
    plain = parse_args(PredictConfig, ["--model", "m", "--input", "i", "--out", "o"], "p", "d")
    assert plain == PredictConfig(model="m", input="i", out="o")
    assert (plain.formats, plain.workers, plain.threshold, plain.tta) == (("png",), None, None, False)
    with pytest.raises(ConfigError, match="--mixed-precision"):
        parse_args(PredictConfig, ["--mixed-precision", "fp8"], "p", "d")


def test_evaluate_flags_fill_the_config():
    cfg = parse_args(evaluate.EvalConfig, ["--pred", "p", "--truth", "t", "--label-value", "ANY",
                                           "--workers", "0", "--split", "val"], "e", "d")
    assert (cfg.pred, cfg.truth, cfg.label_value, cfg.workers, cfg.split, cfg.csv) == ("p", "t", None, 1, "val", None)
    assert parse_args(evaluate.EvalConfig, ["--label-value", "255"], "e", "d").label_value == 255
    assert parse_args(evaluate.EvalConfig, [], "e", "d").label_value == 63
    for bad in ("0", "256", "liver"):
        with pytest.raises(ConfigError, match="--label-value"):
            parse_args(evaluate.EvalConfig, ["--label-value", bad], "e", "d")


def test_evaluate_label_value_out_of_range_exit_2(tmp_path, capsys):
    assert evaluate.main(["--pred", str(tmp_path), "--truth", str(tmp_path), "--label-value", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--label-value" in err
