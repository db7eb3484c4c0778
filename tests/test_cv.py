"""Cross-validation: K folds of a patient-level split trained in one command, and the per-organ report."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dlseg import cv
from dlseg.inference.predictor import Predictor, largest_component
from dlseg.metrics import dice
from dlseg.normalize import intensity_stats
from dlseg.preprocessing.split import SplitConfig, split_patients
from dlseg.store import CaseData, Store
from helpers import TINY_RUN, write_store

MAP = {"0": "background", "1": "liver", "2": "spleen"}


def phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 6×40×40 MR-like case: a bright liver disc and a darker spleen disc on a noisy body."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:40, :40]
    mask = np.zeros((6, 40, 40), np.uint8)
    cy, cx = 18 + seed % 3, 14 + seed % 2
    mask[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 60] = 1
    mask[1:5, (yy - 20) ** 2 + (xx - 30) ** 2 < 20] = 2
    image = (200 + 40 * rng.standard_normal(mask.shape) + 300 * (mask == 1) + 120 * (mask == 2)).astype(np.int16)
    return image, mask


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    """Four labeled MR patients (liver + spleen), one unlabeled case."""
    cases = []
    for p in range(1, 5):
        image, mask = phantom(p)
        cases.append(CaseData(f"MR-{p}-T2", image, mask, {
            "patient": str(p), "modality": "MR", "sequence": "t2", "spacing": [5.0, 1.5, 1.5],
            "fingerprint": f"f{p}", "stats": intensity_stats(image, "MR")}))
    image, _ = phantom(9)
    cases.append(CaseData("MR-test-9-T2", image, None, {"patient": "test-9", "modality": "MR", "sequence": "t2",
                                                        "spacing": [5.0, 1.5, 1.5], "stats": intensity_stats(image, "MR")}))
    split = {"train": ["MR-1-T2", "MR-2-T2", "MR-3-T2"], "val": ["MR-4-T2"], "unlabeled": ["MR-test-9-T2"],
             "seed": 3, "method": "fixed"}
    return write_store(tmp_path_factory.mktemp("cv") / "s.zarr", cases, split, MAP)


def test_folds_are_the_preprocess_kfold_assignment(tiny_store, tmp_path):
    cfg = cv.CVConfig(store=str(tiny_store), out=str(tmp_path), folds=2, prepare=True)
    assert cv.run(cfg, []) == 0
    store = Store(tiny_store)
    held_out = []
    for i in range(2):
        _, val_p = split_patients(["MR-1", "MR-2", "MR-3", "MR-4"], SplitConfig(seed=3, folds=2, fold=i))
        val = store.split_cases(f"cv2-fold{i}-val")
        assert val == [f"{p}-T2" for p in val_p]                         # the store split's seed by default
        assert sorted(store.split_cases(f"cv2-fold{i}-train") + val) == [f"MR-{p}-T2" for p in range(1, 5)]
        held_out += val
    assert sorted(held_out) == [f"MR-{p}-T2" for p in range(1, 5)]      # each patient held out exactly once
    assert store.split_cases("val") == ["MR-4-T2"]                      # the store's own split is kept


def test_two_fold_cv_trains_and_reports_per_organ(tiny_store, tmp_path):
    out = tmp_path / "cv"
    train = [*TINY_RUN, "--loader.workers", "0", "--epochs", "1", "--optim.lr", "1e-2", "--augment.enabled", "false",
             "--keep_last", "1"]
    assert cv.main(["--store", str(tiny_store), "--out", str(out), "--folds", "2", *train]) == 0
    doc = json.loads((out / "cv_report.json").read_text())
    assert doc["classes"] == ["liver", "spleen"] and doc["folds"] == 2
    assert sorted(r["case"] for r in doc["per_case"]) == [f"MR-{p}-T2" for p in range(1, 5)]
    store = Store(tiny_store)
    for r in doc["per_case"]:                    # each case: its own fold's model, scored by hand
        pred = Predictor.load(out / f"fold-{r['fold']}")
        assert r["case"] in store.split_cases(f"cv2-fold{r['fold']}-val")
        image, truth = store.read_case(r["case"])
        labels = pred.predict_volume(image, store.info(r["case"]).attrs["stats"])[0]
        for k, name in enumerate(["liver", "spleen"], start=1):
            assert r["dice"][name] == pytest.approx(dice(labels == k, truth == k))
        assert r["mean"] == pytest.approx(np.mean(list(r["dice"].values())))
    for f in doc["per_fold"]:
        rows = [r for r in doc["per_case"] if r["fold"] == f["fold"]]
        assert f["dice"]["liver"]["mean"] == pytest.approx(np.mean([r["dice"]["liver"] for r in rows]))
        metrics = [json.loads(line) for line in (out / f"fold-{f['fold']}" / "metrics.jsonl").read_text().splitlines()]
        assert f["model_selected"] == "last" and f["model_epoch"] == len(metrics)   # final epoch: no selection
        assert f["val_dice_training_grid"] == metrics[-1]["val_dice_mean"]
        assert sorted(metrics[-1]["val_dice"]) == sorted(f["cases"])    # the fold validated on its held-out cases
    spleen = [r["dice"]["spleen"] for r in doc["per_case"]]
    assert doc["pooled"]["spleen"] == pytest.approx({"mean": np.mean(spleen), "sd": np.std(spleen), "n": 4})
    md = (out / "cv_report.md").read_text()
    assert f"{doc['pooled']['liver']['mean']:.4f} ± {doc['pooled']['liver']['sd']:.4f}" in md
    assert "MR-test-9-T2" not in md and "the final epoch's model" in md
    # --ensemble: each fold's models together; two copies of one model score exactly as that model
    assert cv.main(["--store", str(tiny_store), "--out", str(out), "--folds", "2", "--report", "--ensemble", str(out)]) == 0
    ens = json.loads((out / "cv_report.json").read_text())["ensemble"]
    assert ens["members"] == 2 and ens["pooled"] == doc["pooled"]      # (p + p) / 2 == p exactly
    assert [(r["case"], r["fold"]) for r in ens["per_case"]] == [(r["case"], r["fold"]) for r in doc["per_case"]]
    assert "ensemble of 2, pooled" in (out / "cv_report.md").read_text()
    # --keep-largest: scored after prediction's largest-component filter, in its own report beside the plain one
    assert cv.main(["--store", str(tiny_store), "--out", str(out), "--folds", "2", "--report", "--keep-largest"]) == 0
    kept = json.loads((out / "cv_report-largest.json").read_text())
    assert kept["keep_largest"] is True and "ensemble" in json.loads((out / "cv_report.json").read_text())
    for r in kept["per_case"]:
        pred = Predictor.load(out / f"fold-{r['fold']}")
        image, truth = store.read_case(r["case"])
        labels = largest_component(pred.predict_volume(image, store.info(r["case"]).attrs["stats"])[0])
        for k, name in enumerate(["liver", "spleen"], start=1):
            assert r["dice"][name] == pytest.approx(dice(labels == k, truth == k))
    assert "largest connected component" in (out / "cv_report-largest.md").read_text()


def test_cv_report_with_tta_scores_as_predict_does(tiny_store, tmp_path, capsys):
    out = tmp_path / "cv"
    train = [*TINY_RUN, "--loader.workers", "0", "--epochs", "4", "--optim.lr", "1e-2", "--augment.enabled", "false",
             "--keep_last", "1"]
    assert cv.main(["--store", str(tiny_store), "--out", str(out), "--folds", "2", *train]) == 0
    capsys.readouterr()
    # trained without any geometric augmentation: refused in one line, as dlseg/predict.py --tta refuses it
    assert cv.main(["--store", str(tiny_store), "--out", str(out), "--folds", "2", "--report", "--tta"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tta refused" in err and len(err.splitlines()) == 1 and not (out / "cv_report-tta.json").exists()
    for i in range(2):          # as if trained with zooms: the report's TTA must be prediction's
        meta_path = out / f"fold-{i}" / "model" / "model.json"
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, "invariances": ["scale"], "invariance_limits": {"scale": 0.3}}))
    assert cv.main(["--store", str(tiny_store), "--out", str(out), "--folds", "2", "--report", "--tta"]) == 0
    doc = json.loads((out / "cv_report-tta.json").read_text())
    assert doc["tta"].startswith("TTA: zoom ×0.85/×1.15 (3 views") and (out / "cv_report.json").exists()
    store = Store(tiny_store)
    for r in doc["per_case"]:
        labels = Predictor.load(out / f"fold-{r['fold']}", tta=True).predict_volume(
            *(store.read_case(r["case"], mask=False)[0], store.info(r["case"]).attrs["stats"]))[0]
        truth = store.read_case(r["case"])[1]
        assert r["dice"]["liver"] == pytest.approx(dice(labels == 1, truth == 1))
    assert "test-time augmentation (TTA: zoom" in (out / "cv_report-tta.md").read_text()


def test_unusable_cv_arguments_exit_2(tiny_store, tmp_path, capsys):
    assert cv.main(["--store", str(tiny_store), "--out", str(tmp_path), "--folds", "1"]) == 2
    assert cv.main(["--store", str(tiny_store), "--out", str(tmp_path), "--folds", "9", "--prepare"]) == 2
    assert cv.main(["--store", str(tiny_store), "--out", str(tmp_path / "none"), "--folds", "2", "--report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "need at least 2 folds" in err[0] and "only 4 labeled patients" in err[1]
    assert "no exported model" in err[2] and "Traceback" not in "".join(err)


def test_train_cv_sbatch_gives_each_array_task_its_fold(tmp_path):
    # the array script hands one fold to train.sbatch (replaced here by a stand-in that prints what it got)
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "train.sbatch").write_text('echo "RUN=$RUN DATA=$DATA ARGS=$*"\n')

    def task(index: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "DLSEG_ROOT": str(tmp_path), "STORE": "s.zarr", "CV_OUT": "runs/cv", "FOLDS": "5",
               "SLURM_ARRAY_TASK_ID": index}
        return subprocess.run(["bash", str(repo / "launch" / "train_cv.sbatch"), "--config", "r", "--export_model",
                               "best"], env=env, capture_output=True, text=True, timeout=30)

    done = task("3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["RUN=runs/cv/fold-3", "DATA=s.zarr", "ARGS=--loader.train_split", "cv5-fold3-train",
                                   "--loader.val_split", "cv5-fold3-val", "--export_model", "last", "--config", "r",
                                   "--export_model", "best"]            # the final model by default; the user's flag wins
    refused = task("5")
    assert refused.returncode == 2 and "submit with --array=0-4" in refused.stderr
