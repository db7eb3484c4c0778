"""Ensembles: ``--model A --model B`` predicts the mean of the models' probabilities in one pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dlseg.config import parse_args
from dlseg.inference import outputs
from dlseg.inference.config import PredictConfig
from dlseg.inference.ensemble import Ensemble, load_predictor
from dlseg.inference.predictor import Predictor
from dlseg.inference.runner import predict_cohort
from dlseg.predict import main as predict_main
from dlseg.sources.dicom import read_series
from dlseg.sources.layout import discover
from test_predict import make_model


@pytest.fixture(scope="module")
def mr_case(synthetic_root, tmp_path_factory) -> Path:
    """A CHAOS tree with one synthetic MR patient."""
    root = tmp_path_factory.mktemp("ens_input")
    shutil.copytree(synthetic_root / "Train_Sets" / "MR" / "1", root / "Train_Sets" / "MR" / "1")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ens_models")
    return {"a": make_model(base / "a", "MR", "t1-in", seed=0), "b": make_model(base / "b", "MR", "t1-in", seed=1),
            "b3": make_model(base / "b3", "MR", "t1-in", context=1, seed=1),
            "organs": make_model(base / "o", "MR", "t1-in", num_classes=5, labels="organs")}


def predict(model: tuple[Path, ...], inp: Path, out: Path) -> np.ndarray:
    """predict_cohort in this process; the one case's labels."""
    summary = predict_cohort(PredictConfig(model=tuple(map(str, model)), input=str(inp), out=str(out), workers=0,
                                           batch_size=16, formats=("npz",)))
    (row,) = summary["cases"]
    assert row["status"] == "predicted"
    return outputs.read_labels(out / row["case_id"])


def test_model_flag_repeats():
    cfg = parse_args(PredictConfig, ["--model", "A", "--model", "B", "--input", "i", "--out", "o"], "p", "")
    assert cfg.model == ("A", "B")
    assert parse_args(PredictConfig, ["--model", "A", "--input", "i", "--out", "o"], "p", "").model == ("A",)
    assert PredictConfig(model="A").model == ("A",)


def test_two_copies_of_one_model_predict_as_that_model(models, mr_case, tmp_path):
    single = predict((models["a"],), mr_case, tmp_path / "one")
    double = predict((models["a"], models["a"]), mr_case, tmp_path / "two")
    assert 0 < single.sum() < single.size and np.array_equal(single, double)


def test_two_models_predict_the_mean_of_their_probabilities(models, mr_case, tmp_path):
    a, b = Predictor.load(models["a"]), Predictor.load(models["b"])
    ens = load_predictor([models["a"], models["b"]])
    assert isinstance(ens, Ensemble)
    x = torch.randn(4, 1, 32, 32)
    assert torch.allclose(ens.probabilities(x), (a.probabilities(x) + b.probabilities(x)) / 2, atol=1e-6)
    (case,) = discover(mr_case, "t1-in", "liver")[0]
    image = read_series(case.image_files).image
    labels, probs = ens.predict_volume(image)
    mean = (a.predict_volume(image)[1] + b.predict_volume(image)[1]) / 2
    assert np.allclose(probs, mean, atol=1e-6)
    assert np.array_equal(labels, (mean[:, 0] > 0.5).astype(np.uint8))
    assert not np.array_equal(labels, a.predict_volume(image)[0])        # the second model changes something
    written = predict((models["a"], models["b"]), mr_case, tmp_path / "ab")
    assert np.mean(written != labels) < 1e-4          # cohort path: mean on the grid, then the inverse resize


def test_models_with_other_context_take_the_centre_channels(models):
    a, b3 = Predictor.load(models["a"]), Predictor.load(models["b3"])
    ens = load_predictor([models["a"], models["b3"]])
    assert ens.context == 1
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(ens.probabilities(x), (a.probabilities(x[:, 1:2]) + b3.probabilities(x)) / 2, atol=1e-6)


def test_a_model_of_another_size_gets_the_grid_resized(models, tmp_path):
    big = tmp_path / "b48"
    shutil.copytree(models["b"], big)
    meta = json.loads((big / "model.json").read_text())
    (big / "model.json").write_text(json.dumps({**meta, "train_size": 48}))      # the U-Net takes any size
    a, b = Predictor.load(models["a"]), Predictor.load(big)
    ens = load_predictor([models["a"], big])
    x = torch.randn(2, 1, 32, 32)
    up = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    back = torch.nn.functional.interpolate(b.probabilities(up), size=(32, 32), mode="bilinear", align_corners=False)
    assert ens.size == 32 and torch.allclose(ens.probabilities(x), (a.probabilities(x) + back) / 2, atol=1e-6)


def test_models_that_disagree_on_labels_are_refused(models, tmp_path, capsys):
    code = predict_main(["--model", str(models["a"]), "--model", str(models["organs"]), "--input", str(tmp_path),
                         "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "must agree on labels" in err and str(models["organs"]) in err
