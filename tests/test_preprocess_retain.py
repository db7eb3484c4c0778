"""A case that converted before and fails now keeps its previous version; only vanished sources are removed."""

from __future__ import annotations

import shutil

import numpy as np
from pydicom.data import get_testdata_file

from dlseg.config import parse_args
from dlseg.errors import Failure
from dlseg.preprocessing.pipeline import PreprocessConfig, run
from dlseg.preprocessing.retain import KEPT, reconcile
from dlseg.store import Store
from helpers import make_mr_patient
from preprocess.cli import main


def test_reconcile_removes_only_vanished_cases():
    failures = [Failure("MR-1-T1in", "a.dcm", "cannot decode"), Failure("MR-9-T1in", "b.dcm", "bad")]
    rec = reconcile(["MR-1-T1in", "MR-2-T1in", "MR-3-T1in"], ["MR-2-T1in"], failures)
    assert rec.removed == ["MR-3-T1in"] and rec.kept == ["MR-1-T1in"]
    assert [f.reason for f in rec.failures] == [f"cannot decode ({KEPT})", "bad"]


def test_transient_failure_keeps_previous_version(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "s.zarr"
    for k, p in enumerate(["1", "2", "3"]):
        make_mr_patient(src, p, n=3, seed=k)
    args = [str(src), str(out), "--modality", "t1-in", "--workers", "1", "--val-fraction", "0.34"]
    assert main(args) == 0
    before = Store(out)
    old_image, old_mask = before.read_case("MR-2-T1in")
    old_split = {k: before.split[k] for k in ("train", "val")}
    capsys.readouterr()

    victim = sorted((src / "MR/2/T1DUAL/DICOM_anon/InPhase").iterdir())[1]
    shutil.copy(get_testdata_file("MR_truncated.dcm"), victim)      # a half-copied file: cannot decode
    assert main(args) == 1
    assert "1 failed (1 kept their previous version)" in capsys.readouterr().out
    report = run(parse_args(PreprocessConfig, args, "preprocess", ""), show_progress=False)
    assert report.exit_code == 1 and report.kept == ["MR-2-T1in"] and report.removed == []
    assert [(f.case_id, f.reason.endswith(f"({KEPT})")) for f in report.failures] == [("MR-2-T1in", True)]
    after = Store(out)
    assert after.cases == ["MR-1-T1in", "MR-2-T1in", "MR-3-T1in"]
    image, mask = after.read_case("MR-2-T1in")
    np.testing.assert_array_equal(image, old_image)
    np.testing.assert_array_equal(mask, old_mask)
    assert {k: after.split[k] for k in ("train", "val")} == old_split

    shutil.rmtree(src / "MR/2")                                       # sources gone: the case goes too
    assert main(args) == 0
    assert "1 removed" in capsys.readouterr().out
    assert Store(out).cases == ["MR-1-T1in", "MR-3-T1in"]
