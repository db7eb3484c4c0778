"""python -m preprocess end to end: round trip bit for bit, patient split, resume, failures, exit codes."""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import zarr
from pydicom.data import get_testdata_file

import dlseg.preprocessing.convert as convert
import dlseg.preprocessing.pipeline as pipeline
from dlseg.config import parse_args
from dlseg.errors import CaseError
from dlseg.locks import FolderLock
from dlseg.normalize import intensity_stats
from dlseg.preprocessing.convert import CaseResult, convert_case, process_case
from dlseg.preprocessing.pipeline import WORKER_DIED, PreprocessConfig, run, run_cases
from dlseg.sources.layout import discover
from dlseg.store import Store, StoreError
from dlseg.workers import spawn_pool
from helpers import make_ct_patient, make_mr_patient, read_sources, write_sr
from preprocess.cli import main

REPO = Path(__file__).resolve().parents[1]


def assert_round_trip(store: Store, case_id: str, src_root: Path, modality: str) -> None:
    """The store's image/mask equal pydicom (+ rescale) and OpenCV reading the recorded source files."""
    info = store.info(case_id)
    image, mask = store.read_case(case_id)
    files = [src_root / f for f in info.attrs["source_files"]]
    gfiles = [src_root / f for f in info.attrs["mask_files"]] if info.labeled else None
    ref, gt = read_sources(files, gfiles)
    assert image.dtype in (np.int16, np.float32)
    np.testing.assert_array_equal(image, ref.astype(image.dtype))
    assert np.array_equal(image.astype(np.float64), ref)               # nothing lost by the dtype
    assert info.attrs["stats"] == intensity_stats(image, modality)
    if gt is not None:
        liver = gt == 255 if modality == "CT" else (gt >= 55) & (gt <= 70)
        np.testing.assert_array_equal(mask == 1, liver)
        assert info.attrs["foreground"] == [bool(m.any()) for m in mask]


@pytest.fixture(scope="module")
def ct_store(chaos_ct_case, tmp_path_factory):
    src = tmp_path_factory.mktemp("ctsrc")
    (src / "CT").mkdir()
    os.symlink(chaos_ct_case, src / "CT" / "3")
    out = tmp_path_factory.mktemp("ctout") / "ct.zarr"
    assert main([str(src), str(out), "--modality", "ct", "--workers", "1", "--qa"]) == 0
    return src, out


def test_real_ct_case_round_trip(ct_store):
    src, out = ct_store
    store = Store(out)
    assert store.cases == ["CT-3"]
    info = store.info("CT-3")
    names = [Path(f).name for f in info.attrs["source_files"]]
    assert names == sorted(os.listdir(src / "CT/3/DICOM_anon")) and len(names) == 78
    assert [Path(f).name for f in info.attrs["mask_files"]] == [f"liver_GT_{k:03d}.png" for k in range(78)]
    assert info.attrs["order"] == "position" and info.shape == (78, 512, 512)
    assert info.spacing == (2.0, 0.7265625, 0.7265625)
    assert info.attrs["direction"][6:] == [0.0, 0.0, -1.0]     # file order runs head → feet, z decreasing
    assert_round_trip(store, "CT-3", src, "CT")
    assert store.split["train"] == ["CT-3"] and store.split["val"] == []
    qa = cv2.imread(str(out.with_suffix(".qa") / "CT-3.png"))
    assert qa is not None and qa.shape == (256, 4 * 256, 3)


def test_synthetic_store_round_trip(synthetic_root, synthetic_store):
    store = Store(synthetic_store)
    train_root = synthetic_root / "Train_Sets"
    assert len(store.cases) == 6 and all(c.endswith("-T1in") for c in store.cases)
    for cid in store.cases:
        assert_round_trip(store, cid, train_root, "MR")
        assert store.info(cid).attrs["order"] == "stem"
    split = store.split
    assert (len(split["patients"]["train"]), len(split["patients"]["val"])) == (4, 2)
    assert set(split["train"]).isdisjoint(split["val"]) and sorted(split["train"] + split["val"]) == store.cases


def test_synthetic_all_modalities_round_trip(synthetic_root, tmp_path):
    out = tmp_path / "all.zarr"
    report = run_args(synthetic_root, out, "--modality", "all", "--labels", "organs")
    assert report.failures == [] and report.exit_code == 0
    store = Store(out)
    orders = {}
    for cid in store.cases:
        info = store.info(cid)
        root = synthetic_root / ("Test_Sets" if info.attrs["group"] == "unlabeled" else "Train_Sets")
        assert_round_trip(store, cid, root, info.attrs["modality"])
        orders.setdefault((info.attrs["sequence"], info.attrs["order"]), 0)
        assert info.attrs["direction"][8] < 0                 # file order runs against ImagePositionPatient z
        assert info.attrs["notes"] == []
    assert {k[0] for k in orders} == {"ct", "t1-in", "t1-out", "t2"}
    assert ("t1-in", "stem") in orders and ("t1-out", "position") in orders and ("ct", "position") in orders
    ct = [c for c in store.cases if c.startswith("CT-")]
    assert all(store.read_case(c)[0].dtype == np.int16 and store.read_case(c)[0].min() >= -1024 for c in ct)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Hand-made CHAOS tree: 5 MR patients (3 sequences), 2 CT patients, 1 MR test patient."""
    root = tmp_path_factory.mktemp("cohort")
    for k, p in enumerate(["1", "2", "5", "10", "21"]):
        make_mr_patient(root / "Train_Sets", p, n=3 + k % 2, seed=k)
    for k, p in enumerate(["3", "4"]):
        make_ct_patient(root / "Train_Sets", p, n=4, seed=20 + k)
    make_mr_patient(root / "Test_Sets", "7", n=3, seed=30)
    shutil.rmtree(root / "Test_Sets/MR/7/T1DUAL/Ground")
    shutil.rmtree(root / "Test_Sets/MR/7/T2SPIR/Ground")
    return root


def test_all_modalities_organs_parallel(cohort, tmp_path):
    out = tmp_path / "all.zarr"
    assert main([str(cohort), str(out), "--modality", "all", "--labels", "organs", "--workers", "2", "--seed", "3"]) == 0
    store = Store(out)
    assert len(store.cases) == 5 * 3 + 2 + 3
    assert store.label_map == {"0": "background", "1": "liver", "2": "right_kidney", "3": "left_kidney", "4": "spleen"}
    for cid in store.cases:
        root = cohort / ("Test_Sets" if "-test-" in cid else "Train_Sets")
        assert_round_trip(store, cid, root, store.info(cid).attrs["modality"])
    image, mask = store.read_case("MR-2-T2")
    gt = np.stack([cv2.imread(str(cohort / "Train_Sets" / f), cv2.IMREAD_UNCHANGED)
                   for f in store.info("MR-2-T2").attrs["mask_files"]])
    np.testing.assert_array_equal(mask, np.select([gt == 63, gt == 126, gt == 189, gt == 252], [1, 2, 3, 4], 0))
    split = store.split
    assert split["unlabeled"] == ["MR-test-7-T1in", "MR-test-7-T1out", "MR-test-7-T2"]
    assert store.info("MR-test-7-T2").attrs["group"] == "unlabeled" and not store.info("MR-test-7-T2").labeled
    # patient-disjoint: every case of a patient is on one side; 7 labeled patients → round(1.4) = 1 val
    side = {}
    for name in ("train", "val"):
        for cid in split[name]:
            attrs = store.info(cid).attrs
            assert side.setdefault(f"{attrs['modality']}-{attrs['patient']}", name) == name
    assert set(side) == {"MR-1", "MR-2", "MR-5", "MR-10", "MR-21", "CT-3", "CT-4"}
    assert set(side) == set(split["patients"]["train"] + split["patients"]["val"])
    assert len(split["patients"]["val"]) == 1 and split["seed"] == 3 and split["method"] == "fraction:0.2"
    for f in out.rglob("zarr.json"):
        assert "Secret" not in f.read_text()                    # no patient names from the DICOM headers


def test_split_is_deterministic_kfold_and_file(cohort, tmp_path):
    def split(*extra):
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.zarr"
        report = run_args(cohort, out, "--modality", "t2", *extra)
        return report.root["split"]

    a, b = split("--seed", "5"), split("--seed", "5")
    assert a == b and len(a["patients"]["val"]) == 1
    folds = [split("--folds", "2", "--fold", str(i))["patients"]["val"] for i in range(2)]
    assert set(folds[0] + folds[1]) == {"MR-1", "MR-2", "MR-5", "MR-10", "MR-21"} and set(folds[0]).isdisjoint(folds[1])
    spec = tmp_path / "split.json"
    spec.write_text(json.dumps({"train": ["1", "2", "5"], "val": [10, "21"]}))
    s = split("--split-file", str(spec))
    assert s["val"] == ["MR-10-T2", "MR-21-T2"] and s["method"] == "file:split.json"


@pytest.mark.parametrize("how", ["split file", "fraction 0"])
def test_no_val_patients_is_said_not_refused(cohort, tmp_path, capsys, how):
    spec = tmp_path / "split.json"
    spec.write_text(json.dumps({"train": ["1", "2", "5", "10", "21"], "val": []}))
    extra = ["--split-file", str(spec)] if how == "split file" else ["--val-fraction", "0"]
    out = tmp_path / "o.zarr"
    assert main([str(cohort), str(out), "--modality", "t2", "--workers", "1", *extra]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "5 train / 0 val" in text
    assert "warning: the split has no val cases: training will refuse this store until it has some" in text
    assert Store(out).split_cases("val") == [] and len(Store(out).split_cases("train")) == 5


def test_a_split_with_val_cases_gives_no_warning(cohort, tmp_path, capsys):
    assert main([str(cohort), str(tmp_path / "o.zarr"), "--modality", "t2", "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "4 train / 1 val" in " ".join(text.split()) and "warning" not in text


def run_args(src, out, *extra):
    return run(parse_args(PreprocessConfig, [str(src), str(out), "--workers", "1", *extra], "preprocess", ""),
               show_progress=False)


def test_resume_skips_unchanged_and_replaces_partial(cohort, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(cohort / "Train_Sets", src)
    out = tmp_path / "r.zarr"
    first = run_args(src, out, "--modality", "t1-in")
    assert len(first.written) == 5 and first.skipped == []
    # a killed run leaves a staging folder and a case folder without its `complete` attribute
    (out / ".partial" / "MR-1-T1in-deadbeef").mkdir(parents=True)
    half = out / "MR-2-T1in" / "zarr.json"
    meta = json.loads(half.read_text())
    meta["attributes"].pop("complete")
    half.write_text(json.dumps(meta))
    # and one source changed since
    f = next((src / "MR/5/T1DUAL/DICOM_anon/InPhase").iterdir())
    ds = pydicom.dcmread(f)
    ds.PixelData = (ds.pixel_array + 1).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(f)
    again = run_args(src, out, "--modality", "t1-in")
    assert sorted(again.written) == ["MR-2-T1in", "MR-5-T1in"]
    assert sorted(again.skipped) == ["MR-1-T1in", "MR-10-T1in", "MR-21-T1in"]
    assert not (out / ".partial").exists()
    store = Store(out)
    for cid in store.cases:
        assert_round_trip(store, cid, src, "MR")
    # a source that vanished drops its case from the store and the split
    shutil.rmtree(src / "MR/21")
    third = run_args(src, out, "--modality", "t1-in")
    assert third.removed == ["MR-21-T1in"] and len(third.skipped) == 4
    assert "MR-21-T1in" not in Store(out).cases


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_resume_after_kill_9(cohort, tmp_path):
    src = tmp_path / "src"
    for p in range(1, 7):
        make_ct_patient(src, str(p), n=30, seed=p)
    out = tmp_path / "k.zarr"
    cmd = [sys.executable, "-m", "preprocess", str(src), str(out), "--modality", "ct", "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "CT-2").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)                                     # kill while the third case is being written
    workers = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    killed = proc.wait() == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers and not any(alive(w) for w in workers)      # no orphan goes on converting or writing
    if killed:
        with pytest.raises(StoreError, match="never finalized"):
            Store(out)
    for case in out.iterdir() if out.exists() else []:
        meta = case / "zarr.json"
        if case.is_dir() and not case.name.startswith("."):   # whatever is visible is a complete case
            assert json.loads(meta.read_text())["attributes"]["complete"] is True
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    store = Store(out)
    assert store.cases == [f"CT-{p}" for p in range(1, 7)]
    for cid in store.cases:
        assert_round_trip(store, cid, src, "CT")


def test_bad_cases_fail_alone_exit_1(tmp_path, capsys):
    src = tmp_path / "src"
    make_ct_patient(src, "1", n=3)
    make_ct_patient(src, "2", n=3)
    shutil.copy(get_testdata_file("MR_truncated.dcm"), src / "CT/2/DICOM_anon/i0000,0000b.dcm")
    make_ct_patient(src, "3", n=3, masks=2)
    make_ct_patient(src, "4", n=3)
    cv2.imwrite(str(src / "CT/4/Ground/liver_GT_002.png"), np.zeros((7, 7), np.uint8))
    out = tmp_path / "o.zarr"
    assert main([str(src), str(out), "--modality", "ct", "--workers", "1"]) == 1
    text = capsys.readouterr().out
    assert "Traceback" not in text and "4 failed case(s)" not in text and "3 failed case(s)" in text
    report = run_args(src, out, "--modality", "ct")
    reasons = {f.case_id: (f.path, f.reason) for f in report.failures}
    assert reasons["CT-2"][0] == "CT/2/DICOM_anon/i0000,0000b.dcm" and "cannot decode pixel data" in reasons["CT-2"][1]
    assert "3 DICOM files" in reasons["CT-3"][1] and "2 PNGs" in reasons["CT-3"][1]
    assert reasons["CT-4"][0] == "CT/4/Ground/liver_GT_002.png" and "7x7" in reasons["CT-4"][1]
    assert Store(out).cases == ["CT-1"] and report.exit_code == 1


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing", "{tmp}/o.zarr"], "no such folder"),
    (["{tmp}", "{tmp}/o.zarr"], "unknown layout"),
    (["{cohort}", "{tmp}/o.zarr", "--folds", "3"], "--folds K needs --fold I"),
    (["{cohort}", "{tmp}/o.zarr", "--folds", "9", "--fold", "0", "--modality", "t2"], "only 5 labeled patients"),
    (["{cohort}", "{tmp}/o.zarr", "--split-file", "{tmp}/none.json"], "split file not found"),
    (["{cohort}", "{tmp}/o.zarr", "--val-fraction", "1.5"], "--val-fraction 1.5"),
    (["{cohort}", "{tmp}/notastore"], "not a Zarr store"),
    (["{cohort}", "{tmp}/o.zarr", "--modality", "pet"], "invalid choice"),
    (["{cohort}", "{tmp}/notastore/keep.txt/o.zarr"], "keep.txt/o.zarr: Not a directory"),
])
def test_unusable_arguments_exit_2(cohort, tmp_path, capsys, args, message):
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "keep.txt").write_text("mine")
    argv = [a.format(tmp=tmp_path, cohort=cohort) for a in args]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in " ".join((captured.out + captured.err).split()) and "Traceback" not in captured.err


def test_unexpected_library_error_fails_the_case_alone(tmp_path, monkeypatch):
    make_ct_patient(tmp_path, "1", n=2)
    (case,), _ = discover(tmp_path, "ct")

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(convert, "read_masks", boom)
    res = convert.process_case(str(tmp_path / "o.zarr"), case, "liver")
    assert (res.status, res.reason) == ("failed", "unexpected error (RuntimeError: boom second line)")


def test_non_image_object_changes_pairing_counts(tmp_path):
    make_ct_patient(tmp_path, "1", n=3, masks=4)
    write_sr(tmp_path / "CT/1/DICOM_anon/i0003,0000b.dcm")       # 4 files, 4 masks: paired by position
    (case,), _ = discover(tmp_path, "ct")
    assert case.order == "position" and len(case.image_files) == 4
    with pytest.raises(CaseError, match="3 image slices .after skipping non-image files. but 4 ground-truth PNGs"):
        convert_case(case)
    make_mr_patient(tmp_path / "mr", "2", n=3)
    folder = tmp_path / "mr/MR/2/T1DUAL/DICOM_anon/InPhase"
    write_sr(folder / "IMG-0004-00003.dcm")                        # replaces the middle slice; its mask stays
    (mr,), _ = discover(tmp_path / "mr", "t1-in")
    data = convert_case(mr)
    assert data.image.shape[0] == 2 and data.attrs["mask_files"] == [
        "MR/2/T1DUAL/Ground/IMG-0004-00001.png", "MR/2/T1DUAL/Ground/IMG-0004-00005.png"]
    assert any("skipped 1 non-image" in n for n in data.attrs["notes"])


def die_on_ct_2(store_path, src, labels, qa_dir):
    """A converter whose worker process dies on case CT-2 (as a decoder crash or the OOM killer would do)."""
    if src.case_id == "CT-2":
        os._exit(70)
    return process_case(store_path, src, labels, qa_dir)


def report_threads(store_path, src, labels, qa_dir):
    """A converter that reports the worker's thread budget instead of converting."""
    return CaseResult(src.case_id, "skipped", 0, notes=[f"{cv2.getNumThreads()},{zarr.config.get('threading.max_workers')}",
                                                         str(os.getpid())])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_dying_worker_fails_its_case_alone(tmp_path, workers):
    src = tmp_path / "src"
    for p in range(1, 6):
        make_ct_patient(src, str(p), n=3, seed=p)
    out = tmp_path / "o.zarr"
    sources, _ = discover(str(src), "ct", "liver")
    cfg = PreprocessConfig(src=str(src), out=str(out), modality="ct", workers=workers)
    results = list(run_cases(cfg, sources, None, convert=die_on_ct_2))
    assert sorted(r.case_id for r in results) == [f"CT-{p}" for p in range(1, 6)]     # each case reported once
    status = {r.case_id: (r.status, r.reason) for r in results}
    assert status.pop("CT-2") == ("failed", WORKER_DIED)
    assert set(status.values()) == {("written", "")}
    for p in (1, 3, 4, 5):
        assert (out / f"CT-{p}" / "image").is_dir()


def die_once_after_ct_3(store_path, src, labels, qa_dir):
    """A converter whose worker dies once right after handling CT-3 (written or found unchanged)."""
    res = process_case(store_path, src, labels, qa_dir)
    marker = Path(store_path).parent / "died-once"
    if src.case_id == "CT-3" and not marker.exists():
        marker.touch()
        os._exit(70)
    return res


def test_a_case_written_just_before_its_worker_died_is_reported_written(tmp_path):
    src = tmp_path / "src"
    for p in range(1, 5):
        make_ct_patient(src, str(p), n=2, seed=p)
    out = tmp_path / "o.zarr"
    sources, _ = discover(str(src), "ct", "liver")
    cfg = PreprocessConfig(src=str(src), out=str(out), modality="ct", workers=1)
    first = {r.case_id: r.status for r in run_cases(cfg, sources, None, convert=die_once_after_ct_3)}
    assert first == {f"CT-{p}": "written" for p in range(1, 5)}          # CT-3's retry found it in place
    (tmp_path / "died-once").unlink()
    again = {r.case_id: r.status for r in run_cases(cfg, sources, None, convert=die_once_after_ct_3)}
    assert again == {f"CT-{p}": "skipped" for p in range(1, 5)}          # unchanged before the death: unchanged


def test_workers_are_spawned_with_one_core_each(tmp_path):
    src = tmp_path / "src"
    for p in range(1, 4):
        make_ct_patient(src, str(p), n=2, seed=p)
    sources, _ = discover(str(src), "ct", "liver")
    cfg = PreprocessConfig(src=str(src), out=str(tmp_path / "o.zarr"), modality="ct", workers=1)
    results = list(run_cases(cfg, sources, None, convert=report_threads))
    assert [r.notes[0] for r in results] == ["1,1"] * 3                      # OpenCV 1 thread, zarr codec pool 1
    assert {int(r.notes[1]) for r in results} != {os.getpid()}               # converted in a worker, not here



def count_malloc_arenas(threads: int) -> int:
    """Start ``threads`` threads that each allocate and keep a few blocks; the number of glibc arenas then."""
    kept = []
    go = [threading.Thread(target=lambda: kept.append([bytearray(4096) for _ in range(64)])) for _ in range(threads)]
    for t in go:
        t.start()
    for t in go:
        t.join()
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        fp = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(fp))
        libc.fclose(ctypes.c_void_p(fp))
        return Path(f.name).read_text().count("<heap nr=")


def test_workers_allocate_from_one_malloc_arena():
    with spawn_pool(1) as pool:
        assert pool.submit(count_malloc_arenas, 4).result() == 1
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as plain:
        assert plain.submit(count_malloc_arenas, 4).result() > 1   # what a worker would otherwise have


# ------------------------------------------------------------------------------------------------ one writer per store

def test_second_run_into_a_held_store_exits_2_and_writes_nothing(tmp_path):
    src = tmp_path / "src"
    make_ct_patient(src, "1", n=3)
    out = tmp_path / "held.zarr"
    out.mkdir()
    cmd = [sys.executable, "-m", "preprocess", str(src), str(out), "--modality", "ct", "--workers", "1"]
    with FolderLock(out, "the first run"):
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert [p.name for p in out.iterdir()] == [".lock"]          # nothing written, the holder's lock kept
    assert done.returncode == 2, done.stdout + done.stderr
    line = " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr and f"{out}: in use by another writer" in line
    assert f"pid {os.getpid()} on {socket.gethostname()}" in line and "`the first run" in line
    assert f"remove {out}/.lock" in line
    assert list(out.iterdir()) == []


def test_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    src = tmp_path / "src"
    make_ct_patient(src, "1", n=3)
    out = tmp_path / "stale.zarr"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                           "started": "2024-01-01T00:00:00+00:00", "command": "python -m preprocess"}))
    assert main([str(src), str(out), "--modality", "ct", "--workers", "1"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"took over a stale lock (pid {gone.pid} on {socket.gethostname()}" in text
    assert Store(out).cases == ["CT-1"] and not (out / ".lock").exists()


def test_lock_is_released_after_failing_and_interrupted_runs(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_ct_patient(src, "1", n=3)
    make_ct_patient(src, "2", n=3)
    shutil.copy(get_testdata_file("MR_truncated.dcm"), src / "CT/2/DICOM_anon/i0000,0000b.dcm")
    out = tmp_path / "f.zarr"
    assert main([str(src), str(out), "--modality", "ct", "--workers", "1"]) == 1
    assert not (out / ".lock").exists() and Store(out).cases == ["CT-1"]

    def interrupted(cfg, show_progress):
        assert (Path(cfg.out) / ".lock").is_file()
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "run_locked", interrupted)
    assert main([str(src), str(out), "--modality", "ct", "--workers", "1"]) == 130
    assert not (out / ".lock").exists()
    fresh = tmp_path / "fresh.zarr"     # a run that stopped before writing leaves no folder behind
    assert main([str(src), str(fresh), "--modality", "ct", "--workers", "1"]) == 130
    assert not fresh.exists()
