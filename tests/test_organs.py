"""Per-organ numbers: per-class validation Dice in a multi-class run's records, and dlseg.evaluate per class."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dlseg import curves, evaluate, metrics, trainer
from dlseg.class_metrics import resolve_classes
from dlseg.data import DataConfig, build_val_loader
from dlseg.export import load_model
from dlseg.inference import outputs
from dlseg.runlog import epoch_line, epoch_table
from dlseg.store import CaseData
from dlseg.train import parse
from helpers import TINY_RUN, write_store
from preprocess.cli import main as preprocess_main

ORGANS = ["liver", "right_kidney", "left_kidney", "spleen"]
SPACING = (2.5, 0.7, 0.7)
SHAPE = (6, 12, 10)


@pytest.fixture(scope="module")
def organs_store(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic MR T2 cohort with liver, kidneys and spleen labelled (4 train / 2 val patients)."""
    out = tmp_path_factory.mktemp("organs") / "t2.zarr"
    assert preprocess_main([str(synthetic_root), str(out), "--modality", "t2", "--labels", "organs",
                            "--val-fraction", "0.34", "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def organs_run(organs_store, tmp_path_factory) -> Path:
    """One epoch of a tiny four-organ model."""
    out = tmp_path_factory.mktemp("organs_run") / "run"
    args = ["--data", str(organs_store), "--out", str(out), *TINY_RUN, "--loader.workers", "0", "--epochs", "1",
            "--augment.enabled", "false", "--keep_last", "1"]
    assert trainer.run(parse(args)) == 0
    return out


def hand_class_dice(run: Path, store: Path) -> dict[str, list[float]]:
    """Dice per val case and class from the exported model's argmax on the training grid, counted in numpy."""
    model, meta = load_model(run / "model")
    loader = build_val_loader(store, DataConfig(size=meta["train_size"], val_batch_size=8, workers=0))
    n_cls = meta["arch"]["num_classes"]
    counts = np.zeros((len(loader.dataset.case_ids), n_cls, 3))
    with torch.no_grad():
        for batch in loader:
            pred = model(batch["image"]).argmax(1).numpy()
            truth = batch["mask"].numpy()
            for case, p, t in zip(batch["case"].tolist(), pred, truth):
                for k in range(1, n_cls):
                    counts[case, k] += [np.sum((p == k) & (t == k)), np.sum((p == k) & (t != k)),
                                        np.sum((p != k) & (t == k))]
    out = {}
    for k, name in enumerate(meta["class_names"], start=1):
        tp, fp, fn = counts[:, k, 0], counts[:, k, 1], counts[:, k, 2]
        out[name] = [1.0 if d == 0 else 2 * a / d for a, d in zip(tp, 2 * tp + fp + fn)]
    return out


def test_multiclass_run_records_per_class_dice(organs_run, organs_store):
    (row,) = curves.read_metrics(organs_run)
    assert sorted(row["val_dice_class"]) == sorted(ORGANS)                 # metrics.jsonl sorts its keys
    hand = hand_class_dice(organs_run, organs_store)
    for name in ORGANS:
        assert row["val_dice_class"][name] == pytest.approx(np.mean(hand[name]), abs=1e-9)
    per_case = np.mean([hand[n] for n in ORGANS], axis=0)       # a case's Dice: mean over its classes
    assert list(row["val_dice"].values()) == pytest.approx(list(per_case), abs=1e-9)
    assert row["val_dice_mean"] == pytest.approx(np.mean(list(row["val_dice_class"].values())), abs=1e-9)
    _, meta = load_model(organs_run / "model")
    assert meta["class_names"] == ORGANS and meta["invariances"] == []
    line = epoch_line(1, row)
    assert all(f"dice_{n} {row['val_dice_class'][n]:.4f}" in line for n in ORGANS)
    assert "dice_spleen" in (organs_run / "train.log").read_text()
    cells = [c for col in epoch_table(0, 1, row).columns for c in col._cells]
    assert f"{row['val_dice_class']['spleen']:.4f}" in cells
    assert curves.class_names([row]) == sorted(ORGANS) and (organs_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert curves.class_names([{**row, "val_dice_class": {"liver": 0.5}}]) == []   # one class: the mean says it


# ---------------------------------------------------------------------------------------------- evaluate

def box(z0, z1, y0, y1, x0, x1, label, into=None) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8) if into is None else into
    m[z0:z1, y0:y1, x0:x1] = label
    return m


# liver (1) a slab of slices, right kidney (2) a small box, spleen (4) absent from the truth of case B
TRUTH = {"MR-1": box(0, 6, 6, 10, 6, 10, 2, box(1, 4, 0, 5, 0, 10, 1)),
         "MR-2": box(1, 4, 0, 12, 0, 4, 1)}
PRED = {"MR-1": box(0, 6, 6, 10, 6, 10, 2, box(2, 5, 0, 5, 0, 10, 1)),      # liver one slice off, kidney exact
        "MR-2": box(1, 4, 0, 12, 0, 4, 1, box(0, 1, 0, 2, 8, 10, 4))}       # liver exact, a spleen not in truth
MAP = {"0": "background", "1": "liver", "2": "right_kidney", "3": "left_kidney", "4": "spleen"}


@pytest.fixture()
def truth_store(tmp_path) -> Path:
    cases = [CaseData(cid, np.zeros(SHAPE, np.int16), mask, {"patient": cid[3:], "modality": "MR", "sequence": "t2",
                                                            "spacing": list(SPACING), "fingerprint": cid})
             for cid, mask in TRUTH.items()]
    return write_store(tmp_path / "truth.zarr", cases, {"train": ["MR-1"], "val": ["MR-2"], "unlabeled": [],
                                                        "seed": 0, "method": "fixed"}, MAP)


def write_multiclass(out: Path, png: bool) -> Path:
    """Prediction folders of a five-class model: CHAOS gray PNGs (or npz) and a record with class volumes."""
    for cid, labels in PRED.items():
        case = outputs.CaseOutput(cid, labels, 5, [f"s{k}" for k in range(SHAPE[0])],
                                  {"spacing": SPACING, "origin": [0, 0, 0], "direction": list(np.eye(3).ravel())})
        outputs.write_case(out, case, ["png"] if png else ["npz"], False, 63, {}, 0.0)
    return out


@pytest.mark.parametrize("png", [True, False])
def test_evaluate_scores_every_metric_per_class_and_the_mean(truth_store, tmp_path, png):
    pred = write_multiclass(tmp_path / "pred", png)
    assert evaluate.main(["--pred", str(pred), "--truth", str(truth_store)]) == 0      # --classes auto
    doc = json.loads((pred / "evaluation.summary.json").read_text())
    assert list(doc["classes"]) == ORGANS
    hand = {"MR-1": {"liver": 2 / 3, "right_kidney": 1.0, "left_kidney": 1.0, "spleen": 1.0},
            "MR-2": {"liver": 1.0, "right_kidney": 1.0, "left_kidney": 1.0, "spleen": 0.0}}
    for cls in ORGANS:
        assert doc["classes"][cls]["Dice"]["mean"] == pytest.approx(np.mean([hand[c][cls] for c in hand]))
    assert doc["metrics"]["Dice"]["mean"] == pytest.approx(np.mean([np.mean(list(h.values())) for h in hand.values()]))
    with open(pred / "evaluation.csv", newline="") as f:
        rows = {(r["case"], r["class"]): r for r in csv.DictReader(f)}
    assert len(rows) == 2 * 5
    for cid in TRUTH:
        for k, cls in enumerate(ORGANS, start=1):
            want = metrics.case_metrics(PRED[cid] == k, TRUTH[cid] == k, SPACING)
            for col, key in evaluate.COLUMNS.items():
                assert float(rows[cid, cls][col]) == pytest.approx(want[key]), (cid, cls, col)
        mean_assd = np.mean([float(rows[cid, c]["ASSD"]) for c in ORGANS])
        assert float(rows[cid, "mean"]["ASSD"]) == pytest.approx(mean_assd)
    assert float(rows["MR-1", "liver"]["Dice"]) == pytest.approx(2 / 3) and rows["MR-2", "spleen"]["RAVD"] == "inf"


def test_evaluate_classes_option(truth_store, tmp_path, capsys):
    pred = write_multiclass(tmp_path / "pred", png=False)
    rows, _ = evaluate.evaluate_folder(pred, truth_store, classes="liver")              # the one-class report
    assert [r["Dice"] for r in rows] == pytest.approx([2 / 3, 1.0]) and "classes" not in rows[0]
    rows, _ = evaluate.evaluate_folder(pred, truth_store, classes="spleen,liver")
    assert list(rows[1]["classes"]) == ["spleen", "liver"] and rows[1]["Dice"] == pytest.approx(0.5)
    assert evaluate.main(["--pred", str(pred), "--truth", str(truth_store), "--classes", "pancreas"]) == 2
    err = capsys.readouterr().err
    assert "--classes 'pancreas': unknown class pancreas" in err and len(err.strip().splitlines()) == 1


def test_all_scores_every_class_the_model_wrote_when_the_truth_names_fewer(tmp_path):
    pred = write_multiclass(tmp_path / "pred", png=False)
    named = {int(k): v for k, v in MAP.items()}
    assert resolve_classes("all", pred, named) == {k: v for k, v in named.items() if k > 0}
    # a labels folder without its dataset.json names the liver alone: the other classes are still scored
    assert resolve_classes("all", pred, {0: "background", 1: "liver"}) == {
        1: "liver", 2: "class_2", 3: "class_3", 4: "class_4"}


def test_binary_prediction_scored_per_class_is_its_liver(truth_store, tmp_path):
    out = tmp_path / "binary"
    for cid, labels in PRED.items():
        case = outputs.CaseOutput(cid, (labels == 1).astype(np.uint8), 1, [f"s{k}" for k in range(SHAPE[0])],
                                  {"spacing": SPACING, "origin": [0, 0, 0], "direction": list(np.eye(3).ravel())})
        outputs.write_case(out, case, ["png"], False, 255, {}, 0.0)      # gray 255: the spleen's MR range
    rows, _ = evaluate.evaluate_folder(out, truth_store, label_value=255, classes="all")
    by_case = {r["case"]: r["classes"] for r in rows}
    assert by_case["MR-1"]["liver"]["Dice"] == pytest.approx(2 / 3) and by_case["MR-2"]["liver"]["Dice"] == 1.0
    assert by_case["MR-1"]["spleen"]["Dice"] == 1.0 and by_case["MR-1"]["right_kidney"]["Dice"] == 0.0
