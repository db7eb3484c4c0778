"""python -m dlseg.gpu_check: its logic on the CPU with tiny sizes (the GPU run is launch/gpu_check.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlseg import gpu_check
from dlseg.gpu_check import RESUME_TOL, Result, relative_difference, write_report

REPO = Path(__file__).resolve().parents[1]


def test_relative_difference():
    a = {"w": torch.tensor([2.0, -4.0]), "n": torch.tensor([3])}
    assert relative_difference(a, {"w": torch.tensor([2.0, -4.0]), "n": torch.tensor([3])}) == 0.0
    assert relative_difference(a, {"w": torch.tensor([2.0, -3.0]), "n": torch.tensor([3])}) == 0.25
    assert relative_difference(a, {"w": torch.tensor([2.0, -4.0])}) == float("inf")


def test_report_fails_when_a_check_failed(tmp_path):
    results = [Result("a", "passed", "fine"), Result("b", "skipped", "needs 2 GPUs"), Result("c", "failed", "off")]
    json_path, md_path = write_report(tmp_path, results, {"device": "cpu"})
    doc = json.loads(json_path.read_text())
    assert doc["ok"] is False and [c["status"] for c in doc["checks"]] == ["passed", "skipped", "failed"]
    assert "| c | failed | off |" in md_path.read_text()
    assert write_report(tmp_path, results[:2], {})[0].read_text().startswith('{\n "ok": true')


def test_refuses_without_cuda_and_bad_names(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([str(tmp_path / "o")]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err
    assert gpu_check.main([str(tmp_path / "o"), "--device", "cpu", "--checks", "train,speed"]) == 2
    assert "unknown speed" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_quick_cpu_run_trains_resumes_and_predicts(synthetic_store, tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "dlseg.gpu_check", str(out), "--device", "cpu", "--quick", "--precisions", "no,fp16",
           "--data", str(synthetic_store)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    checks = {c["name"]: c for c in json.loads((out / "gpu-check.json").read_text())["checks"]}
    assert {n: c["status"] for n, c in checks.items()} == {
        "train + resume, no": "passed", "train + resume, fp16": "skipped", "DDP, 2 processes": "skipped",
        "prediction cpu vs cpu": "passed"}
    train = checks["train + resume, no"]["figures"]
    assert train["epochs"] == 2 and train["resume_max_rel_diff"] <= RESUME_TOL["no"]
    pred = checks["prediction cpu vs cpu"]["figures"]
    assert pred["voxels"] > 0 and pred["max_prob_diff"] < 1e-5 and pred["label_diff_fraction"] == 0.0
    assert (out / "gpu-check.md").read_text().startswith("# GPU check: passed")
