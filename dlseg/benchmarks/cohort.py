"""The benchmark's data: a given store, or the synthetic cohort generated and preprocessed once and reused."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dlseg.benchmarks.common import BenchConfig, Cohort
from dlseg.preprocessing.synthetic_store import CHAOS_NAME, STORE_NAME, synthetic_store
from dlseg.store import CHUNK_BYTES


def cohort_name(cfg: BenchConfig) -> str:
    """Folder name of the synthetic cohort for these settings (and the store's chunk size: a cohort written with
    another layout is not reused, or the loader would be timed on it)."""
    return (f"mr-p{cfg.patients}-s{cfg.seed}-px{cfg.synth_size[0]}-{cfg.synth_size[1]}"
            f"-z{cfg.synth_slices[0]}-{cfg.synth_slices[1]}-c{CHUNK_BYTES >> 10}k")


def ensure_cohort(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> Cohort:
    """The given store, or the synthetic cohort generated and preprocessed once under ``cfg.cache_dir``."""
    if cfg.store:
        store = Path(cfg.store)
        root = Path(cfg.cache_dir) / "given"
        root.mkdir(parents=True, exist_ok=True)
        return Cohort(Path(cfg.source) if cfg.source else None, store, root)
    final = Path(cfg.cache_dir) / cohort_name(cfg)
    synthetic_store(final, cfg.patients, cfg.seed, 0.2, size_range=cfg.synth_size, slices_range=cfg.synth_slices,
                    log=log)
    return Cohort(final / CHAOS_NAME, final / STORE_NAME, final)
