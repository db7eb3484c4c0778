"""Patient-level split: seeded fraction, k-fold, split file; subjects never straddle."""

from __future__ import annotations

import json

import pytest

from dlseg.errors import UsageError
from dlseg.preprocessing.split import SplitConfig, build_split, split_patients, split_warnings, val_count

SUBJECTS = [f"MR-{p}" for p in (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)]


def test_default_is_16_train_4_val_and_seeded():
    train, val = split_patients(SUBJECTS, SplitConfig())
    assert (len(train), len(val)) == (16, 4) and set(train).isdisjoint(val) and set(train + val) == set(SUBJECTS)
    assert split_patients(list(reversed(SUBJECTS)), SplitConfig()) == (train, val)   # input order irrelevant
    assert split_patients(SUBJECTS, SplitConfig(seed=1)) != (train, val)


def test_val_count_edges():
    assert [val_count(n, 0.2) for n in (0, 1, 2, 3, 6, 20)] == [0, 0, 1, 1, 1, 4]
    assert val_count(6, 0.34) == 2 and val_count(5, 0.0) == 0 and val_count(3, 0.99) == 2


def test_kfold_covers_every_subject_once():
    vals = [split_patients(SUBJECTS, SplitConfig(folds=5, fold=i))[1] for i in range(5)]
    assert sorted(v for fold in vals for v in fold) == sorted(SUBJECTS) and all(len(v) == 4 for v in vals)


def test_split_file_accepts_numbers_or_subjects(tmp_path):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"train": ["1", "MR-2"], "val": [5]}))
    subjects = ["CT-1", "MR-1", "MR-2", "CT-5", "MR-5"]
    assert split_patients(subjects, SplitConfig(split_file=str(spec))) == (["CT-1", "MR-1", "MR-2"], ["CT-5", "MR-5"])
    for data, message in [({"train": ["1"], "val": ["1"]}, "both train and val"),
                          ({"train": ["1", "2"], "val": ["9"]}, "unknown patient '9'"),
                          ({"train": ["1"], "val": ["2"]}, "neither train nor val: CT-5, MR-5"),
                          ({"train": "1"}, "expected")]:
        spec.write_text(json.dumps(data))
        with pytest.raises(UsageError, match=message):
            split_patients(subjects, SplitConfig(split_file=str(spec)))


def test_build_split_keeps_sequences_together_and_unlabeled_apart():
    cases = {f"MR-{p}-{s}": {"subject": f"MR-{p}", "labeled": True} for p in (1, 2, 3) for s in ("T1in", "T2")}
    cases["MR-test-4-T1in"] = {"subject": "MR-test-4", "labeled": False}
    split = build_split(cases, (["MR-1", "MR-3"], ["MR-2"]), SplitConfig(seed=7))
    assert split["val"] == ["MR-2-T1in", "MR-2-T2"] and split["unlabeled"] == ["MR-test-4-T1in"]
    assert split["train"] == ["MR-1-T1in", "MR-1-T2", "MR-3-T1in", "MR-3-T2"]
    assert (split["seed"], split["method"]) == (7, "fraction:0.2")


def test_a_split_without_val_cases_is_warned_about():
    cases = {f"MR-{p}-T2": {"subject": f"MR-{p}", "labeled": True} for p in (1, 2, 3)}
    for cfg in (SplitConfig(val_fraction=0.0), SplitConfig(val_fraction=0.5)):
        split = build_split(cases, split_patients(["MR-1", "MR-2", "MR-3"], cfg), cfg)
        warnings = split_warnings(split)
        if cfg.val_fraction:
            assert split["val"] and warnings == []
        else:
            assert split["val"] == [] and len(warnings) == 1
            assert warnings[0].startswith("the split has no val cases: training will refuse this store")


@pytest.mark.parametrize("cfg, message", [
    (SplitConfig(folds=3), "needs --fold"), (SplitConfig(folds=1, fold=0), "at least 2"),
    (SplitConfig(folds=3, fold=3), "0..2"), (SplitConfig(val_fraction=-0.1), "must be in"),
])
def test_bad_options(cfg, message):
    with pytest.raises(UsageError, match=message):
        split_patients(SUBJECTS, cfg)
