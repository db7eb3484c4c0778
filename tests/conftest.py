"""Shared fixtures: the real CHAOS CT case from ../shared (skipped when absent) and a tiny synthetic cohort."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlseg.synthetic import generate
from preprocess.cli import main as preprocess_main

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CHAOS_CT3 = SHARED / "data" / "chaos_sample" / "Train_Sets" / "CT" / "3"


@pytest.fixture(scope="session")
def chaos_ct_case() -> Path:
    """Path of ``../shared/data/chaos_sample/Train_Sets/CT/3`` (skips when shared/ is absent)."""
    if not (CHAOS_CT3 / "DICOM_anon").is_dir():
        pytest.skip(f"real CHAOS sample not found at {CHAOS_CT3}")
    return CHAOS_CT3


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A tiny synthetic CHAOS tree (both modalities, 6 patients, small slices) shared by the session."""
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, patients=6, modality="both", seed=0, size_range=(48, 64), slices_range=(10, 14))
    return out


@pytest.fixture(scope="session")
def synthetic_store(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic tree preprocessed to a store (MR T1 in-phase, liver, 4 train / 2 val patients)."""
    out = tmp_path_factory.mktemp("store") / "t1in.zarr"
    code = preprocess_main([str(synthetic_root), str(out), "--modality", "t1-in", "--val-fraction", "0.34", "--workers", "1"])
    assert code == 0
    return out
