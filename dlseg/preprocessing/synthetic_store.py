"""The synthetic cohort as a store: generated in the CHAOS layout, preprocessed, installed once and reused.

The demo recipe and the benchmark both train and measure on it; a folder is published whole (built under a
temporary name, then renamed), so concurrent first runs never read a half-built cohort.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from dlseg.errors import StoreError
from dlseg.preprocessing.pipeline import PreprocessConfig, run
from dlseg.synthetic import generate

STORE_NAME = "t1in.zarr"
CHAOS_NAME = "chaos"


def synthetic_store(final: Path, patients: int, seed: int, val_fraction: float = 0.2,
                    size_range: tuple[int, int] | None = None, slices_range: tuple[int, int] | None = None,
                    workers: int = 1, show_progress: bool = False, log: Callable[[str], None] = lambda s: None,
                    ) -> Path:
    """``final/t1in.zarr`` (MR T1 in-phase, liver labels) beside its source tree ``final/chaos``; built if absent."""
    store = final / STORE_NAME
    if (store / "zarr.json").is_file() and (final / CHAOS_NAME).is_dir():
        return store
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"Generating the synthetic cohort ({patients} MR patients, T1 in-phase) in {final} (once) …")
    sizes = {"size_range": size_range} if size_range else {}
    slices = {"slices_range": slices_range} if slices_range else {}
    generate(tmp / CHAOS_NAME, patients=patients, modality="mr", seed=seed, sequences=("t1-in",), workers=workers,
             **sizes, **slices)
    report = run(PreprocessConfig(src=str(tmp / CHAOS_NAME), out=str(tmp / STORE_NAME), modality="t1-in",
                                  seed=seed, val_fraction=val_fraction, workers=workers), show_progress)
    if report.failures:
        raise StoreError(f"{tmp}: preprocessing the synthetic cohort failed for {len(report.failures)} case(s): "
                         f"{report.first_failures()}")
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return store
