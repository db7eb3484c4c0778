"""Prediction on several ranks: cases balanced by slices; the plan and results travel through files, so a slow
planner never holds the other ranks inside a collective."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from dlseg.inference import outputs
from dlseg.inference.config import DIST_TIMEOUT_S, PredictConfig
from dlseg.inference.inputs import CaseSpec
from dlseg.inference.planning import PLAN_DELAY_ENV, Exchange, Heartbeat, balance, my_cases, plan_from_json, plan_to_json
from dlseg.sources.layout import discover
from dlseg.train_config import TrainConfig
from test_predict import make_model, predict_on_two_cpu_ranks


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("ct_model"), "CT", "ct")


def test_balance_longest_first():
    slices = [10, 90, 30, 30, 40, 5]
    parts = balance(slices, 2)
    assert parts == [[0, 1, 5], [2, 3, 4]]            # 90 → r0; 40, 30, 30 → r1 (100); 10 → r0 (100); tie: 5 → r0
    assert [sum(slices[i] for i in p) for p in parts] == [105, 100]
    by_count = [sum(slices[i::2]) for i in range(2)]  # the old cases[rank::ranks]
    assert max(by_count) - min(by_count) == 45 > 15
    assert sorted(i for p in balance(slices, 4) for i in p) == list(range(6))
    assert balance([], 3) == [[], [], []] and balance([7], 3) == [[0], [], []]


def test_my_cases_cover_the_cohort_once():
    todo = [CaseSpec(f"c{i}", "dicom", "/r", files=("a", "b"), slices=s) for i, s in enumerate([3, 50, 8, 8, 20])]
    shares = [my_cases(todo, r, 3) for r in range(3)]
    assert sorted(s.case_id for share in shares for s in share) == [s.case_id for s in todo]
    assert [[s.case_id for s in share] for share in shares] == [["c1"], ["c4"], ["c0", "c2", "c3"]]


def test_plan_round_trips_through_json():
    spec = CaseSpec("CT-1", "dicom", "/r", files=("a.dcm", "b.dcm"), mask_files=("a.png", "b.png"), slices=2,
                    fingerprint="f")
    plan = {"kind": "chaos", "todo": [spec], "all": {"CT-1": "f"}, "reused": [], "early": [], "cohort_total": 1}
    assert plan_from_json(json.loads(json.dumps(plan_to_json(plan)))) == plan


def test_timeout_default_is_trainings():
    assert PredictConfig().dist_timeout_s == DIST_TIMEOUT_S == TrainConfig().dist_timeout_s


@pytest.mark.slow
def test_slow_planning_past_the_collective_timeout_completes_on_two_ranks(synthetic_root, ct_model, tmp_path):
    cases = [c.case_id for c in discover(synthetic_root, "ct", "liver")[0]]
    out = tmp_path / "out"
    proc = predict_on_two_cpu_ranks(ct_model, synthetic_root, out, "--workers", "0", "--batch-size", "8",
                                    "--dist-timeout-s", "3", env={PLAN_DELAY_ENV: "8"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(outputs.summary_files(out, None)[1].read_text())
    assert summary["world_size"] == 2 and summary["predicted"] == len(cases) and summary["failed"] == 0
    records = {r["case_id"]: outputs.read_record(out / r["case_id"]) for r in summary["cases"]}
    assert {r["rank"] for r in records.values()} == {0, 1}
    slices = [sum(r["slices"] for r in records.values() if r["rank"] == k) for k in (0, 1)]
    assert abs(slices[0] - slices[1]) <= max(r["slices"] for r in records.values())   # balanced by slices
    left = sorted(p.name for p in out.iterdir())                  # no exchange folder left behind
    assert left == sorted(cases + ["id-salt.json", "report.html", "summary.csv", "summary.json"])


def test_a_beating_rank_is_waited_for_past_the_timeout_a_silent_one_is_not(tmp_path):
    ex = Exchange(tmp_path, "t", rank=0, world=2, timeout_s=0.5)
    ex.dir.mkdir()
    assert ex.wait_for("rank-1", 1) is None                     # rank 1 never beat: given up
    beat = Heartbeat(ex.dir / "beat-1.json", 0.1)
    beat.start()
    late = threading.Timer(1.5, lambda: ex.publish("rank-1", {"slices": 7}))   # 3 timeouts later
    late.start()
    try:
        assert ex.wait_for("rank-1", 1) == {"slices": 7}
    finally:
        late.cancel()
        beat.stopped.set()
        beat.join()
