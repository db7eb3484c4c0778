"""CHAOS discovery: accepted SRC forms, natural order, pairing rules (stem, position, mismatch)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dlseg.errors import UsageError
from dlseg.sources.layout import discover, natural_sorted
from helpers import make_ct_patient, make_mr_patient, write_sr


def test_natural_sort_orders_numbers_numerically():
    names = ["IMG-10.dcm", "IMG-9.dcm", "IMG-100.dcm", "img-2.dcm", "i0010,0000b.dcm", "i0009,0000b.dcm"]
    assert [p.name for p in natural_sorted(names)] == [
        "i0009,0000b.dcm", "i0010,0000b.dcm", "img-2.dcm", "IMG-9.dcm", "IMG-10.dcm", "IMG-100.dcm",
    ]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    train = root / "Train_Sets"
    make_ct_patient(train, "10", seed=3)
    make_ct_patient(train, "2", seed=0)
    make_mr_patient(train, "1")
    test = root / "Test_Sets"
    make_ct_patient(test, "4", ground_dir=False, seed=5)
    return root


@pytest.mark.parametrize("sub", ["", "Train_Sets"])
def test_discover_accepts_parent_or_train_sets(tree, sub):
    cases, failures = discover(tree / sub if sub else tree, "ct")
    train = [c for c in cases if c.group == "train"]
    assert [c.case_id for c in train] == ["CT-2", "CT-10"]          # natural patient order
    assert failures == []
    ct2 = train[0]
    assert ct2.patient == "2" and ct2.modality == "CT" and ct2.sequence == "ct" and ct2.order == "position"
    assert [p.name for p in ct2.image_files][:2] == ["i0000,0000b.dcm", "i0001,0000b.dcm"]
    assert [p.name for p in ct2.mask_files][:2] == ["liver_GT_000.png", "liver_GT_001.png"]
    assert ct2.relative(ct2.image_files)[0] == "CT/2/DICOM_anon/i0000,0000b.dcm"


def test_test_sets_become_unlabeled(tree):
    cases, _ = discover(tree, "ct")
    test = [c for c in cases if c.group == "test"]
    assert [(c.case_id, c.patient, c.mask_files, c.order) for c in test] == [("CT-test-4", "test-4", None, "name")]
    only_test, _ = discover(tree / "Test_Sets", "ct")
    assert [c.case_id for c in only_test] == ["CT-test-4"]


def test_mr_pairs_by_stem_or_position(tree):
    (t1in,), _ = discover(tree / "Train_Sets", "t1-in")
    (t1out,), _ = discover(tree / "Train_Sets", "t1-out")
    (t2,), _ = discover(tree / "Train_Sets", "t2")
    assert (t1in.case_id, t1in.order) == ("MR-1-T1in", "stem")
    assert (t1out.case_id, t1out.order) == ("MR-1-T1out", "position")
    assert (t2.case_id, t2.order) == ("MR-1-T2", "stem")
    assert [m.stem for m in t1in.mask_files] == [p.stem for p in t1in.image_files]
    assert t1out.mask_files == t1in.mask_files                       # shared T1DUAL/Ground


def test_stem_pairing_follows_image_order_not_mask_order(tmp_path):
    make_mr_patient(tmp_path / "Train_Sets", "3", n=3)
    gdir = tmp_path / "Train_Sets/MR/3/T1DUAL/Ground"
    cv2.imwrite(str(gdir / "IMG-0004-00099.png"), np.zeros((12, 10), np.uint8))   # an extra mask, no image
    (case,), _ = discover(tmp_path, "t1-in")
    assert case.order == "stem"
    assert [m.name for m in case.mask_files] == ["IMG-0004-00001.png", "IMG-0004-00003.png", "IMG-0004-00005.png"]
    assert any("no DICOM slice" in n for n in case.notes)


def test_count_mismatch_fails_with_both_counts(tmp_path):
    make_ct_patient(tmp_path, "7", n=5, masks=4)
    cases, failures = discover(tmp_path, "ct")
    assert cases == []
    (f,) = failures
    assert f.case_id == "CT-7" and f.subject == "CT-7"
    assert "5 DICOM files" in f.reason and "4 PNGs" in f.reason


def test_non_image_dicom_dropped_before_position_pairing(tmp_path):
    make_ct_patient(tmp_path, "8", n=4)
    write_sr(tmp_path / "CT/8/DICOM_anon/zz_report.dcm")
    (case,), failures = discover(tmp_path, "ct")
    assert failures == [] and case.order == "position" and len(case.image_files) == 4
    assert any("zz_report.dcm" in n for n in case.notes)


def test_missing_ground_and_empty_folder_fail_alone(tmp_path):
    make_ct_patient(tmp_path, "1", n=3)
    make_ct_patient(tmp_path, "2", n=3, ground_dir=False)
    (tmp_path / "CT/3/DICOM_anon").mkdir(parents=True)
    cases, failures = discover(tmp_path, "ct")
    assert [c.case_id for c in cases] == ["CT-1"]
    reasons = {f.case_id: f.reason for f in failures}
    assert reasons["CT-2"].startswith("missing Ground folder")
    assert reasons["CT-3"] == "no DICOM files in folder"


def test_unknown_layout_and_missing_src_are_usage_errors(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(UsageError, match="unknown layout"):
        discover(tmp_path, "ct")
    with pytest.raises(UsageError, match="no such folder"):
        discover(tmp_path / "nope", "ct")
    with pytest.raises(UsageError, match="--modality"):
        discover(tmp_path, "pet")
    make_ct_patient(tmp_path, "1", n=2)
    with pytest.raises(UsageError, match="no t1-in cases"):
        discover(tmp_path, "t1-in")
