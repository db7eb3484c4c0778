"""Cohort prediction: CHAOS/DICOM/store inputs, exactness vs a one-slice reference, TTA, post-processing,
resume and kill safety, failures, NIfTI geometry, shards (--shard I/N) and a two-process run of one shard.

Models are tiny (base width 4, depth 2, 32 px) with random weights whose output layer is rescaled so logits
spread over about ±8: plumbing, not accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch

from dlseg.export import export_model
from dlseg.inference import outputs
from dlseg.inference.config import PredictConfig, Shard
from dlseg.inference.outputs import nifti_affine, slice_names
from dlseg.inference.predictor import Predictor, context_inputs, largest_component
from dlseg.inference.records import clean_stale
from dlseg.inference.runner import predict_cohort
from dlseg.model import build_model
from dlseg.normalize import NormConfig, ResizeMapping
from dlseg.predict import main
from dlseg.sources.dicom import read_series
from dlseg.sources.layout import discover
from dlseg.store import Store

REPO = Path(__file__).resolve().parents[1]
BAND = 2e-4   # batch size changes CPU conv results by ~1e-7; pixels this close to the threshold may flip


def make_model(out: Path, modality: str, sequence: str, num_classes: int = 1, context: int = 0,
               labels: str = "liver", seed: int = 0, invariances: tuple[str, ...] = ("hflip", "vflip")) -> Path:
    """Export a tiny random U-Net whose logits spread over roughly ±8 (so masks have structure)."""
    torch.manual_seed(seed)
    arch = {"name": "unet", "in_channels": 2 * context + 1, "num_classes": num_classes, "base_width": 4,
            "depth": 2, "bilinear": True}
    model = build_model(arch).eval()
    with torch.no_grad():
        y = model(torch.randn(8, arch["in_channels"], 32, 32))
        mean, std = y.mean(dim=(0, 2, 3)), y.std()
        k = 4.0 / float(std)
        model.outc.conv.weight.mul_(k)
        model.outc.conv.bias.copy_((model.outc.conv.bias - mean) * k)
    meta = {"arch": arch, "normalization": NormConfig().to_dict(), "train_size": 32, "context_slices": context,
            "labels": labels, "modality": modality, "sequence": sequence, "threshold": 0.5, "channels_last": False,
            "invariances": list(invariances)}
    export_model(model, meta, out)
    return out


@pytest.fixture(scope="module")
def mr_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("mr_model"), "MR", "t1-in")


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("ct_model"), "CT", "ct")


def run(model: Path, inp: Path, out: Path, **kw) -> dict:
    """predict_cohort in this process (single process, no workers unless asked)."""
    cfg = PredictConfig(model=str(model), input=str(inp), out=str(out), workers=kw.pop("workers", 0),
                        batch_size=kw.pop("batch_size", 16), **kw)
    return predict_cohort(cfg)


def read_pngs(folder: Path) -> np.ndarray:
    """The case's slice PNGs in lexicographic order, as the official CHAOS reader does."""
    files = outputs.png_files(folder)
    return np.stack([cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in files])


def reference_probs(pred: Predictor, image: np.ndarray) -> np.ndarray:
    """One slice per forward pass through the same normalize/resize/model path → (Z, K, H, W) probabilities."""
    inputs, mapping = pred.prepare(image)
    t = torch.from_numpy(inputs)
    return np.stack([mapping.inverse(pred.probabilities(context_inputs(t, z, z + 1, pred.context))[0].numpy())
                     for z in range(inputs.shape[0])])


def assert_matches_reference(labels: np.ndarray, ref_probs: np.ndarray, threshold: float = 0.5) -> None:
    """Binary labels equal the reference exactly, except pixels within BAND of the threshold (float noise)."""
    ref = ref_probs[:, 0] > threshold
    near = np.abs(ref_probs[:, 0] - threshold) < BAND
    assert np.array_equal((labels > 0)[~near], ref[~near])
    assert near.mean() < 1e-3


# ---------------------------------------------------------------------------------------------------- CHAOS tree

def test_chaos_tree_outputs_and_reference(synthetic_root, mr_model, tmp_path):
    out = tmp_path / "out"
    summary = run(mr_model, synthetic_root, out, batch_size=16, formats=("png", "npz"), record_sources=True)
    cases, _ = discover(synthetic_root, "t1-in", "liver")
    assert summary["failed"] == 0 and summary["predicted"] == len(cases) == 6
    pred = Predictor.load(mr_model)
    for n, case in enumerate(cases):
        folder = out / case.case_id
        volume = read_series(case.image_files)
        z, h, w = volume.image.shape
        names = sorted(p.name for p in folder.glob("*.png"))
        assert names == slice_names(z) == [f"slice_{i:04d}.png" for i in range(z)]
        pngs = read_pngs(folder)
        assert pngs.shape == (z, h, w) and pngs.dtype == np.uint8
        assert set(np.unique(pngs)) <= {0, 63}
        sources = outputs.read_sources(folder)
        assert list(sources) == names
        assert [synthetic_root / s for s in sources.values()] == list(case.image_files)
        labels = outputs.read_labels(folder)
        assert np.array_equal(labels * 63, pngs)
        if n < 3:                       # batches of 16 span case boundaries; the reference goes slice by slice
            assert_matches_reference(labels, reference_probs(pred, volume.image))
        if n == 0:
            assert (pred.segment(volume.image, batch_size=1) != labels).mean() < 1e-3
        rec = outputs.read_record(folder)
        assert rec["case_id"] == case.case_id and rec["slices"] == z and rec["shape"] == [z, h, w]
        assert rec["spacing"] == pytest.approx(list(volume.spacing))
        assert rec["liver_volume_ml"] == pytest.approx(labels.sum() * np.prod(volume.spacing) / 1000, rel=1e-4)
        assert rec["foreground_slices"] == int(labels.reshape(z, -1).any(axis=1).sum())
        assert rec["world_size"] == 1
    summary_csv, summary_json = outputs.summary_files(out)
    with open(summary_csv) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case_id"] for r in rows) == sorted(c.case_id for c in cases)
    assert {r["status"] for r in rows} == {"predicted"}
    assert json.loads(summary_json.read_text())["cases_total"] == 6
    assert not list(out.glob(outputs.TMP_PREFIX + "*"))


def test_real_ct_case(chaos_ct_case, ct_model, tmp_path):
    root = chaos_ct_case.parents[2]      # .../chaos_sample (holds Train_Sets/CT/3)
    out = tmp_path / "out"
    summary = run(ct_model, root, out, batch_size=32, formats=("png", "nifti"), record_sources=True)
    assert summary["failed"] == 0
    folder = out / "CT-3"
    files = sorted((chaos_ct_case / "DICOM_anon").glob("*.dcm"))
    pngs = read_pngs(folder)
    assert pngs.shape == (len(files), 512, 512)
    sources = outputs.read_sources(folder)
    assert [Path(s).name for s in sources.values()] == [f.name for f in files]
    rec = outputs.read_record(folder)
    assert rec["spacing"][1:] == pytest.approx([0.7265625, 0.7265625])
    check_nifti(folder, files, pngs > 0)


def test_test_sets_tree_and_overlays_without_truth(synthetic_root, ct_model, tmp_path):
    cases, _ = discover(synthetic_root, "ct", "liver")
    dst = tmp_path / "src" / "Test_Sets" / "CT" / cases[0].patient / "DICOM_anon"
    shutil.copytree(cases[0].image_files[0].parent, dst)          # images only, no Ground: an unlabeled case
    out = tmp_path / "out"
    summary = run(ct_model, tmp_path / "src", out, overlays=True)
    (row,) = summary["cases"]
    assert row["case_id"] == f"CT-test-{cases[0].patient}" and row["status"] == "predicted"
    folder = out / row["case_id"]
    z, h, w = read_pngs(folder).shape
    assert z == len(cases[0].image_files)
    overlay = cv2.imread(str(folder / outputs.OVERLAYS / slice_names(z)[0]))
    assert overlay.shape == (h, 2 * w + 2, 3)                      # image | prediction
    assert [p.name for p in outputs.png_files(folder)] == slice_names(z)   # overlays stay out of the PNG set


# ---------------------------------------------------------------------------------------------------- NIfTI

def check_nifti(folder: Path, files: list[Path], labels: np.ndarray) -> None:
    """The NIfTI holds the labels as (x, y, z) and maps voxel centres to the DICOM positions (in RAS)."""
    import nibabel as nib     # optional dependency (extra "nifti"), in the test extra

    img = nib.load(str(folder / outputs.NIFTI))
    data = np.asarray(img.dataobj)
    assert np.array_equal(data.transpose(2, 1, 0) > 0, labels)
    first, second = pydicom.dcmread(files[0]), pydicom.dcmread(files[1])
    ipp0, ipp1 = np.array(first.ImagePositionPatient, float), np.array(second.ImagePositionPatient, float)
    row, col = np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:], float)
    dy, dx = (float(v) for v in first.PixelSpacing)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    a = img.affine
    assert np.allclose(a[:3, :3] @ [0, 0, 0] + a[:3, 3], ipp0 * lps_to_ras, atol=1e-4)
    assert np.allclose(a[:3, :3] @ [0, 0, 1] + a[:3, 3], ipp1 * lps_to_ras, atol=1e-3)   # next file's slice
    assert np.allclose(a[:3, :3] @ [1, 0, 0], row * dx * lps_to_ras, atol=1e-6)            # +column index
    assert np.allclose(a[:3, :3] @ [0, 1, 0], col * dy * lps_to_ras, atol=1e-6)            # +row index
    assert img.header.get_zooms() == pytest.approx((dx, dy, float(np.linalg.norm(ipp1 - ipp0))), rel=1e-4)


def test_nifti_affine_synthetic(synthetic_root, ct_model, tmp_path):
    cases, _ = discover(synthetic_root, "ct", "liver")
    case = cases[0]
    src = tmp_path / "src" / "Train_Sets" / "CT"
    shutil.copytree(synthetic_root / "Train_Sets" / "CT" / case.patient, src / case.patient)
    out = tmp_path / "out"
    run(ct_model, tmp_path / "src", out, formats=("png", "nifti"))
    check_nifti(out / case.case_id, list(case.image_files), read_pngs(out / case.case_id) > 0)


def test_nifti_affine_by_hand():
    # identity orientation, origin (10, 20, 30) LPS, spacing z=3, y=2, x=1 → RAS flips x and y
    a = nifti_affine((3.0, 2.0, 1.0), (10.0, 20.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert np.allclose(a, [[-1, 0, 0, -10], [0, -2, 0, -20], [0, 0, 3, 30], [0, 0, 0, 1]])


def test_nifti_without_nibabel_is_a_clear_error(monkeypatch, tmp_path, ct_model, capsys):
    monkeypatch.setitem(sys.modules, "nibabel", None)      # import nibabel → ImportError, find_spec → None
    code = main(["--model", str(ct_model), "--input", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--format", "png,nifti"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nibabel" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------- options

def test_tta_is_mean_of_four_flips(mr_model):
    pred = Predictor.load(mr_model, tta=True)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        by_hand = [torch.sigmoid(pred.model(x)),
                   torch.sigmoid(pred.model(x.flip(-1))).flip(-1),
                   torch.sigmoid(pred.model(x.flip(-2))).flip(-2),
                   torch.sigmoid(pred.model(x.flip(-2, -1))).flip(-2, -1)]
    expected = torch.stack(by_hand).mean(0)
    assert torch.allclose(pred.probabilities(x), expected, atol=1e-6)
    assert not torch.allclose(by_hand[0], expected, atol=1e-3)   # the flips do change something


def test_channels_last_and_bf16_agree_with_float32(tmp_path):
    model = make_model(tmp_path / "m", "MR", "t1-in", context=1)
    x = torch.randn(4, 3, 32, 32)
    plain = Predictor.load(model).probabilities(x)
    meta = json.loads((model / "model.json").read_text())
    meta["channels_last"] = True
    (model / "model.json").write_text(json.dumps(meta))
    cl = Predictor.load(model)
    assert cl.channels_last and torch.allclose(cl.probabilities(x), plain, atol=1e-5)
    bf16 = Predictor.load(model, mixed_precision="bf16").probabilities(x)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, plain)    # autocast did run in bf16
    diff = (bf16 - plain).abs()
    assert diff.max() < 0.06 and diff.mean() < 5e-3            # bf16 rounding, not a different computation


def test_empty_input_is_a_clear_error(ct_model, tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code = main(["--model", str(ct_model), "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no CT cases found" in err


def test_keep_largest_removes_small_blob():
    labels = np.zeros((8, 20, 20), np.uint8)
    labels[1:6, 2:12, 2:12] = 1            # big
    labels[6:8, 15:18, 15:18] = 1          # small, separate
    labels[0, 0, 19] = 1                   # a single voxel
    kept = largest_component(labels)
    assert kept.sum() == 5 * 10 * 10 and kept[6:, 15:, 15:].sum() == 0
    multi = labels.copy()
    multi[6:8, 15:18, 15:18] = 2           # its own class: kept as that class's largest component
    kept = largest_component(multi)
    assert (kept == 2).sum() == 2 * 3 * 3 and (kept == 1).sum() == 500 and kept[0, 0, 19] == 0


def test_keep_largest_through_predictor(mr_model):
    pred = Predictor.load(mr_model, keep_largest=True)
    probs = np.zeros((4, 1, 32, 32), np.float32)
    probs[:, 0, 4:20, 4:20] = 0.9
    probs[2, 0, 26:29, 26:29] = 0.9
    labels = pred.labels_from_probs(probs, ResizeMapping(32, 32, 32))
    assert labels[:, 4:20, 4:20].all() and labels[2, 26:29, 26:29].sum() == 0


def test_threshold_and_label_value(synthetic_root, mr_model, tmp_path):
    src = tmp_path / "src" / "Train_Sets" / "MR"
    shutil.copytree(synthetic_root / "Train_Sets" / "MR" / "1", src / "1")
    low = run(mr_model, tmp_path / "src", tmp_path / "low", threshold=0.2, label_value=200, formats=("png", "npz"))
    high = run(mr_model, tmp_path / "src", tmp_path / "high", threshold=0.8)
    a, b = read_pngs(tmp_path / "low" / "MR-1-T1in"), read_pngs(tmp_path / "high" / "MR-1-T1in")
    assert set(np.unique(a)) <= {0, 200} and (a > 0).sum() > (b > 0).sum()
    assert low["cases"][0]["liver_volume_ml"] > high["cases"][0]["liver_volume_ml"]


def test_multiclass_png_values(synthetic_root, tmp_path):
    model = make_model(tmp_path / "organs", "MR", "t1-in", num_classes=5, labels="organs", context=1)
    src = tmp_path / "src" / "Train_Sets" / "MR"
    shutil.copytree(synthetic_root / "Train_Sets" / "MR" / "2", src / "2")
    summary = run(model, tmp_path / "src", tmp_path / "out", formats=("png", "npz"))
    assert summary["failed"] == 0
    folder = tmp_path / "out" / "MR-2-T1in"
    pngs, labels = read_pngs(folder), outputs.read_labels(folder)
    assert set(np.unique(pngs)) <= {0, 63, 126, 189, 252} and len(np.unique(pngs)) > 1
    assert np.array_equal(pngs, labels * 63)
    rec = outputs.read_record(folder)
    assert set(rec["class_volumes_ml"]) == {"1", "2", "3", "4"}


# ---------------------------------------------------------------------------------------------------- resume / failures

def test_resume_skips_done_and_recomputes_tmp(synthetic_root, ct_model, tmp_path):
    out = tmp_path / "out"
    first = run(ct_model, synthetic_root, out)
    assert first["predicted"] == 6
    ids = sorted(r["case_id"] for r in first["cases"])
    mtimes = {c: (out / c / outputs.RECORD).stat().st_mtime_ns for c in ids}
    again = run(ct_model, synthetic_root, out)
    assert again["reused"] == 6 and again["predicted"] == 0
    assert {c: (out / c / outputs.RECORD).stat().st_mtime_ns for c in ids} == mtimes
    # a kill in the middle of writing: the case exists only as a temporary folder
    victim = ids[2]
    os.rename(out / victim, out / f"{outputs.TMP_PREFIX}{victim}-deadbeef0123")
    other = f"{outputs.TMP_PREFIX}CT-other-0123456789ab"
    (out / other).mkdir()     # not a case of this cohort: another run's, left alone
    third = run(ct_model, synthetic_root, out)
    assert third["predicted"] == 1 and third["reused"] == 5
    assert outputs.read_record(out / victim) is not None
    assert [p.name for p in out.glob(outputs.TMP_PREFIX + "*")] == [other]
    # other settings → recomputed
    fourth = run(ct_model, synthetic_root, out, threshold=0.7)
    assert fourth["predicted"] == 6


def test_corrupt_case_fails_alone(synthetic_root, ct_model, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(synthetic_root / "Train_Sets" / "CT", src / "Train_Sets" / "CT")
    cases, _ = discover(src, "ct", "liver")
    bad = cases[1]
    victim = bad.image_files[3]
    victim.write_bytes(victim.read_bytes()[:300])           # truncated DICOM
    out = tmp_path / "out"
    code = main(["--model", str(ct_model), "--input", str(src), "--out", str(out), "--workers", "1"])
    assert code == 1
    rows = {r["case_id"]: r for r in csv.DictReader(open(outputs.summary_files(out)[0]))}
    reason = rows[bad.case_id]["reason"]      # the file by its place in the case, not by path (privacy)
    assert rows[bad.case_id]["status"] == "failed" and f"<file 4 of {len(bad.image_files)}>" in reason
    assert victim.name not in reason and str(src) not in reason
    assert len(rows) == len(cases) >= 2
    assert all(r["status"] == "predicted" for c, r in rows.items() if c != bad.case_id)
    assert not (out / bad.case_id).exists()
    assert "failed" in capsys.readouterr().out


def test_missing_or_mismatched_model_exit_2(ct_model, synthetic_root, tmp_path, capsys):
    code = main(["--model", str(tmp_path / "nope"), "--input", str(synthetic_root), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "nope" in err
    broken = tmp_path / "broken"
    shutil.copytree(ct_model, broken)
    meta = json.loads((broken / "model.json").read_text())
    meta["arch"]["base_width"] = 8
    (broken / "model.json").write_text(json.dumps(meta))
    code = main(["--model", str(broken), "--input", str(synthetic_root), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "do not match" in err


# ---------------------------------------------------------------------------------------------------- shards

def test_shard_selection_is_disjoint_and_complete():
    items = list(range(11))
    for n in range(1, 6):
        parts = [Shard(i, n).select(items) for i in range(n)]
        assert sorted(x for p in parts for x in p) == items                  # complete, nothing twice
        assert [len(p) for p in parts] == [len(items[i::n]) for i in range(n)]
        assert max(map(len, parts)) - min(map(len, parts)) <= 1               # balanced
    assert Shard.parse("2/5") == Shard(2, 5) and Shard(2, 5).name == "shard-2-of-5"
    assert Shard(3, 7).select([1, 2]) == []


@pytest.mark.parametrize("value", ["2/2", "-1/2", "1/0", "0/0", "a/b", "3", "1/2/3", "", "1.0/2"])
def test_bad_shard_is_one_line_exit_2(value, ct_model, synthetic_root, tmp_path, capsys):
    code = main(["--model", str(ct_model), "--input", str(synthetic_root), "--out", str(tmp_path / "o"),
                 f"--shard={value}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--shard" in err, err
    assert not (tmp_path / "o").exists()


def summary_ids(path: Path) -> list[str]:
    with open(path) as f:
        return [r["case_id"] for r in csv.DictReader(f)]


def test_shards_share_out_then_one_summary_by_reuse(synthetic_root, ct_model, tmp_path, capsys):
    cases = [c.case_id for c in discover(synthetic_root, "ct", "liver")[0]]
    assert len(cases) == 6
    out = tmp_path / "out"
    out.mkdir()
    # another task's case in flight and its failure note; a temporary of a case whose id extends ours
    foreign_tmp = out / f"{outputs.TMP_PREFIX}{cases[0]}-0123456789ab"
    lookalike = out / f"{outputs.TMP_PREFIX}{cases[1]}-old-0123456789ab"   # case "<id>-old" in flight, not ours
    foreign_note, own_note = outputs.failure_note(out, cases[0]), outputs.failure_note(out, cases[1])
    foreign_note.parent.mkdir()
    for p in (foreign_tmp, lookalike):
        p.mkdir()
    foreign_note.write_text("{}")
    own_stale = out / f"{outputs.TMP_PREFIX}{cases[1]}-old-89abcdef"          # left by a killed task 1 earlier
    own_stale.mkdir()
    own_note.write_text('{"reason": "old"}')

    for i in (1, 2, 0):
        summary = run(ct_model, synthetic_root, out, shard=f"{i}/3")
        assert summary["shard"] == {"index": i, "count": 3} and summary["cohort_cases"] == 6
        assert [r["case_id"] for r in summary["cases"]] == cases[i::3]
        assert {r["status"] for r in summary["cases"]} == {"predicted"}
        shard_csv, shard_json = outputs.summary_files(out, Shard(i, 3))
        assert summary_ids(shard_csv) == cases[i::3]
        doc = json.loads(shard_json.read_text())
        assert doc["cases_total"] == 2 and doc["predicted"] == 2
        if i == 1:                       # task 1 cleaned only its own leftovers
            assert foreign_tmp.is_dir() and lookalike.is_dir() and foreign_note.is_file()
            assert not own_stale.exists() and not own_note.exists()
            foreign_tmp.rmdir()          # (task 0 would have renamed it into place)
        said = capsys.readouterr().out
        assert ("all 3 shard summaries" in said) == (i == 0)
    assert not outputs.summary_files(out)[0].exists()
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")) == sorted(cases)
    records = {c: outputs.read_record(out / c) for c in cases}

    # the same command without --shard: every case reused, nothing predicted, one summary.csv for the cohort
    whole = run(ct_model, synthetic_root, out)
    assert whole["reused"] == 6 and whole["predicted"] == 0 and whole["slices_predicted"] == 0
    assert whole["shard"] is None and sorted(summary_ids(outputs.summary_files(out)[0])) == sorted(cases)
    assert {c: outputs.read_record(out / c) for c in cases} == records


def test_store_shards(synthetic_store, mr_model, tmp_path):
    val = Store(synthetic_store).split_cases("val")
    out = tmp_path / "out"
    got = [[r["case_id"] for r in run(mr_model, synthetic_store, out, split="val", shard=f"{i}/2")["cases"]]
           for i in range(2)]
    assert got == [val[0::2], val[1::2]] and all(got)
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")) == sorted(val)


def test_empty_shard_is_success(ct_model, synthetic_root, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["--model", str(ct_model), "--input", str(synthetic_root), "--out", str(out), "--shard", "6/7"])
    said = capsys.readouterr().out
    assert code == 0 and "shard 6/7 has no cases" in said
    shard_csv, shard_json = outputs.summary_files(out, Shard(6, 7))
    doc = json.loads(shard_json.read_text())
    assert doc["cases_total"] == 0 and doc["cases"] == [] and doc["cohort_cases"] == 6
    assert summary_ids(shard_csv) == []
    assert not outputs.summary_files(out)[0].exists()


def test_clean_stale_touches_only_named_cases(tmp_path):
    for name in (".tmp-A-0123456789ab", ".tmp-A-old-01234567", ".tmp-A-B-0123456789ab", ".tmp-AB-0123456789ab",
                 ".tmp-A-old-0123456789ab", ".tmp-A-xyz"):
        (tmp_path / name).mkdir()
    (tmp_path / outputs.FAILED_DIR).mkdir()
    for name in ("A.json", ".A.json.0123abcd.tmp", "A-B.json", "AB.json"):
        (tmp_path / outputs.FAILED_DIR / name).write_text("{}")
    assert clean_stale(tmp_path, ["A"]) == 4
    assert sorted(p.name for p in tmp_path.glob(".tmp-*")) == [
        ".tmp-A-B-0123456789ab", ".tmp-A-old-0123456789ab", ".tmp-A-xyz", ".tmp-AB-0123456789ab"]
    assert sorted(p.name for p in (tmp_path / outputs.FAILED_DIR).iterdir()) == ["A-B.json", "AB.json"]


# ---------------------------------------------------------------------------------------------------- other inputs

def test_generic_dicom_tree(synthetic_root, mr_model, tmp_path):
    cases, _ = discover(synthetic_root, "t1-in", "liver")
    tree = tmp_path / "tree"
    for n, case in enumerate(cases[:2]):
        for k, f in enumerate(case.image_files):     # arbitrary folders, names that say nothing about order
            dst = tree / f"study {n}" / ("x" if k % 2 else "y") / f"obj{(k * 7919) % 1000:03d}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst)
    (tree / "notes.txt").write_text("not DICOM")
    out = tmp_path / "out"
    summary = run(mr_model, tree, out, record_sources=True)
    assert summary["failed"] == 0 and summary["predicted"] == 2 and summary["input_kind"] == "dicom"
    ids = [r["case_id"] for r in summary["cases"]]
    assert all(c.startswith("MR-series-") for c in ids)
    pred = Predictor.load(mr_model)
    for cid in ids:
        sources = outputs.read_sources(out / cid)
        files = [tree / s for s in sources.values()]
        volume = read_series(files)
        zs = [p[2] for p in volume.positions]
        assert zs == sorted(zs) or zs == sorted(zs, reverse=True)        # ordered along the slice normal
        assert_matches_reference(read_pngs(out / cid) > 0, reference_probs(pred, volume.image))


def test_store_input_with_overlays(synthetic_store, mr_model, tmp_path):
    store = Store(synthetic_store)
    out = tmp_path / "out"
    summary = run(mr_model, synthetic_store, out, split="val", overlays=True, record_sources=True)
    val = store.split_cases("val")
    assert summary["input_kind"] == "store" and sorted(r["case_id"] for r in summary["cases"]) == sorted(val)
    pred = Predictor.load(mr_model)
    for cid in val:
        info = store.info(cid)
        image, _ = store.read_case(cid)
        pngs = read_pngs(out / cid)
        assert pngs.shape == tuple(info.shape)
        sources = outputs.read_sources(out / cid)
        assert list(sources.values()) == info.attrs["source_files"]
        inputs, mapping = pred.prepare(image, info.attrs["stats"])
        t = torch.from_numpy(inputs)
        ref = np.stack([mapping.inverse(pred.probabilities(t[z:z + 1, None])[0].numpy()) for z in range(len(t))])
        assert_matches_reference(pngs, ref)
        z, h, w = info.shape
        overlay = cv2.imread(str(out / cid / outputs.OVERLAYS / slice_names(z)[0]))
        assert overlay.shape == (h, 3 * w + 4, 3)           # image | truth | prediction
    with pytest.raises(Exception, match="no split named"):
        run(mr_model, synthetic_store, tmp_path / "o2", split="nonsense")


# ---------------------------------------------------------------------------------------------------- two processes

def free_port() -> int:
    """A TCP port nobody listens on (other test runs use accelerate's default port at the same time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predict_on_two_cpu_ranks(model: Path, input: Path, out: Path, *flags: str,
                             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``dlseg/predict.py`` under ``accelerate launch`` with 2 gloo ranks on the CPU; its completed process."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           str(REPO / "dlseg" / "predict.py"), "--model", str(model), "--input", str(input), "--out", str(out), *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_split_a_shard_and_write_each_case_once(synthetic_root, ct_model, tmp_path):
    cases = [c.case_id for c in discover(synthetic_root, "ct", "liver")[0]]
    out = tmp_path / "out"
    proc = predict_on_two_cpu_ranks(ct_model, synthetic_root, out, "--workers", "1", "--batch-size", "8",
                                    "--shard", "1/2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on 2 process(es)" in proc.stdout
    summary = json.loads(outputs.summary_files(out, Shard(1, 2))[1].read_text())
    assert summary["world_size"] == 2 and summary["predicted"] == 3
    assert [r["case_id"] for r in summary["cases"]] == cases[1::2]      # the shard's cases, split over the ranks
    records = [outputs.read_record(out / r["case_id"]) for r in summary["cases"]]
    assert {r["rank"] for r in records} == {0, 1} and all(r["world_size"] == 2 for r in records)
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == sorted(cases[1::2])                   # every case exactly once, nothing temporary


def test_batch_and_workers_default_by_device():
    cpu, gpu = PredictConfig().for_device("cpu"), PredictConfig().for_device("cuda:1")
    assert (cpu.batch_size, cpu.workers) == (8, 0) and (gpu.batch_size, gpu.workers) == (64, 2)
    given = PredictConfig(batch_size=5, workers=3)
    assert given.for_device("cpu") == given == given.for_device("cuda")
    assert PredictConfig(workers=0).for_device("cuda").workers == 0
