"""Smoke test of ``python -m dlseg.bench``: every stage at the tiniest size, in this process.

No timing assertions (speed is what the benchmark prints): the JSON has its keys, every rate and memory figure is
a positive finite number, and each ratio is computed from the two rates it names.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

import dlseg.preprocessing.synthetic_store as synthetic_store_module
from dlseg.benchmarks.cli import main
from dlseg.benchmarks.cohort import ensure_cohort
from dlseg.benchmarks.common import STAGES, BenchConfig, run_stage
from dlseg.benchmarks.preprocess import convert_all
from dlseg.errors import StoreError
from dlseg.preprocessing.synthetic_store import synthetic_store
from helpers import make_mr_patient

TINY = dict(size=32, base_width=4, depth=2, batch_size=4, predict_batch_size=8, predict_workers=0,
            preprocess_workers=2, patients=3, memory_cases=(1, 2), slicewise_cases=1, synth_size=(40, 48),
            synth_slices=(6, 8), budget_s=0.05, quick=True, isolate=False, train_epochs=2,
            warmup_epochs=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny config and its synthetic cohort (generated and preprocessed once for the module)."""
    cfg = BenchConfig(cache_dir=str(tmp_path_factory.mktemp("bench")), **TINY)
    return cfg, ensure_cohort(cfg)


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_result(res: dict) -> None:
    """Keys present, figures positive and finite, ratios consistent with their rates."""
    for key in ("stage", "unit", "rates", "timings", "comparisons", "memory_mb", "memory_checks", "details",
                "wall_s"):
        assert key in res, key
    assert res["rates"] and not res["skipped"]
    for key, rate in res["rates"].items():
        assert finite_positive(rate), (key, rate)
        t = res["timings"][key]
        assert t["items"] > 0 and t["seconds"] > 0
        assert rate == pytest.approx(t["items"] / t["seconds"])
    assert res["comparisons"]
    for row in res["comparisons"]:
        assert row["ours_rate"] == res["rates"][row["ours"]]
        assert row["baseline_rate"] == pytest.approx(res["rates"][row["baseline"]] * row["baseline_scale"])
        assert finite_positive(row["ratio"])
        assert row["ratio"] == pytest.approx(row["ours_rate"] / row["baseline_rate"])
        if row["goal_min"] is not None:
            assert row["met"] == (row["ratio"] >= row["goal_min"])
    for key, value in res["memory_mb"].items():
        assert math.isfinite(value) and value >= 0, (key, value)
    for row in res["memory_checks"]:
        assert finite_positive(row["ratio"]) and row["ratio"] == pytest.approx(row["value_mb"] / row["reference_mb"])


@pytest.mark.parametrize("stage", STAGES)
def test_stage_smoke(tiny, stage):
    cfg, cohort = tiny
    res = json.loads(json.dumps(run_stage(stage, cfg, cohort)))   # JSON-serializable as written
    assert res["stage"] == stage
    check_result(res)
    expected = {
        "loader": {"slicedataset_warm", "slicedataset_cold", "dicom", "zarr_per_sample", "memory_floor"},
        "augment": {"albumentations_per_sample", "batch_augment"},
        "preprocess": {"decode_only", "workers_1", "workers_2"},
        "predict": {"end_to_end", "end_to_end_wall", "end_to_end_2_cases", "forward_ceiling", "slice_by_slice"},
        "train": {"trainer", "bare_loop"},
    }[stage]
    assert expected <= set(res["rates"])
    if stage == "loader":
        assert res["details"]["cache_reads_cold_epoch"] == res["details"]["cases"]   # one read per case
        assert res["memory_checks"][0]["met"] is True                                 # bounded cache
    if stage == "train":   # two epochs: the first is warm-up, the second timed; the bare loop runs as many images
        d = res["details"]
        assert d["epochs"] == 2 and d["timed_epochs"] == 1
        assert res["timings"]["trainer"]["items"] == d["steps"] * d["batch_size"]
        assert res["timings"]["bare_loop"]["items"] == res["timings"]["trainer"]["items"]


def test_cli_writes_json(tiny, tmp_path):
    cfg, _ = tiny
    out = tmp_path / "bench.json"
    code = main(["augment", "--no-isolate", "--quick", "--cache-dir", cfg.cache_dir, "--json", str(out),
                 "--size", "32", "--base-width", "4", "--depth", "2", "--batch-size", "4", "--patients", "3",
                 "--synth-size", "40", "48", "--synth-slices", "6", "8"])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "dlseg-bench" and set(doc["stages"]) == {"augment"}
    for key in ("cpu", "cpu_cores", "torch", "device_name"):
        assert doc["machine"][key]
    assert doc["config"]["size"] == 32
    check_result(doc["stages"]["augment"])


@pytest.mark.parametrize("argv, message", [
    (["--size", "30"], "--size 30"),
    (["--memory-cases", "4", "2"], "--memory-cases"),
    (["--store", "/nonexistent/store.zarr"], "--store"),
])
def test_cli_bad_arguments(argv, message, capsys):
    assert main(["loader", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cohort_is_reused(tiny):
    cfg, cohort = tiny
    stamp = (Path(cohort.store) / "zarr.json").stat().st_mtime_ns
    again = ensure_cohort(cfg)
    assert again == cohort and (Path(again.store) / "zarr.json").stat().st_mtime_ns == stamp



# ------------------------------------------------------------------------------------------------ failure reasons

def broken_tree(root: Path) -> Path:
    """Two MR patients (T1 in-phase); patient 2's first in-phase file is a truncated DICOM."""
    for k, p in enumerate(["1", "2"]):
        make_mr_patient(root / "Train_Sets", p, n=3, seed=k)
    bad = sorted((root / "Train_Sets/MR/2/T1DUAL/DICOM_anon/InPhase").iterdir())[0]
    shutil.copy(get_testdata_file("MR_truncated.dcm"), bad)
    return bad


def test_convert_all_names_the_failed_case_file_and_reason(tmp_path):
    bad = broken_tree(tmp_path / "chaos")
    with pytest.raises(RuntimeError) as err:
        convert_all(str(tmp_path / "chaos"), str(tmp_path / "o.zarr"), 1)
    msg = str(err.value)
    assert "1 case(s) failed to convert: MR-2-T1in: " in msg
    assert f"MR/2/T1DUAL/DICOM_anon/InPhase/{bad.name}: cannot decode pixel data" in msg


def test_synthetic_store_names_the_failed_case_file_and_reason(tmp_path, monkeypatch):
    made = {}

    def generate(out, **kwargs):
        made["bad"] = broken_tree(out)
    monkeypatch.setattr(synthetic_store_module, "generate", generate)
    with pytest.raises(StoreError) as err:
        synthetic_store(tmp_path / "synth", patients=2, seed=0)
    msg = str(err.value)
    assert "failed for 1 case(s): MR-2-T1in: " in msg
    assert f"InPhase/{made['bad'].name}: cannot decode pixel data" in msg
