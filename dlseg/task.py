"""What a training run trains on: the store (given, or the synthetic cohort built once) and the task it describes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dlseg.console import console
from dlseg.data import DataConfig
from dlseg.preprocessing.synthetic_store import synthetic_store
from dlseg.store import Store, StoreError
from dlseg.train_config import TrainConfig


def ensure_synthetic(cfg: TrainConfig) -> Path:
    """The synthetic cohort's store under ``<out>/../_synthetic/``: generated and preprocessed once, then reused."""
    s = cfg.synthetic
    final = Path(cfg.out).resolve().parent / "_synthetic" / f"mr-p{s.patients}-s{s.seed}-v{s.val_fraction:g}"
    return synthetic_store(final, s.patients, s.seed, s.val_fraction, workers=max(1, min(4, os.cpu_count() or 1)),
                           show_progress=True, log=console.print)


@dataclass(frozen=True)
class Task:
    """What the store says about the problem: classes, labels, modality, validation cases."""

    num_classes: int            # 1 = binary (one logit), else K classes incl. background
    labels: str                 # liver | organs
    label_names: list[str]      # foreground class names
    modality: str
    sequence: str
    fingerprint: str


def read_task(store: Store, cfg: DataConfig) -> Task:
    """Derive the task from the store's label map and its training cases."""
    names = [store.label_map[k] for k in sorted(store.label_map, key=int)]
    if len(names) < 2:
        raise StoreError(f"{store.path}: label map {store.label_map} has no foreground class")
    train_cases = store.split_cases(cfg.train_split)
    if not train_cases:
        raise StoreError(f"{store.path}: split {cfg.train_split!r} is empty")
    kinds = {(store.info(c).attrs.get("modality"), store.info(c).attrs.get("sequence")) for c in train_cases}
    if len(kinds) != 1:
        raise StoreError(f"{store.path}: training cases mix modalities/sequences {sorted(map(str, kinds))}")
    modality, sequence = kinds.pop()
    check_val_split(store, cfg.val_split)
    return Task(num_classes=1 if len(names) == 2 else len(names), labels="liver" if len(names) == 2 else "organs",
                label_names=names[1:], modality=str(modality), sequence=str(sequence), fingerprint=store.fingerprint)


VAL_FIX = ("validation picks the best model; re-run python -m preprocess with --val-fraction > 0 or a split file "
           "that lists val patients, or pass --loader.val_split NAME")


def check_val_split(store: Store, split: str) -> None:
    """Refuse, before any training, a validation split with no case or with unlabeled cases (one line + the fix)."""
    cases = store.split_cases(split)
    if not cases:
        raise StoreError(f"{store.path}: split {split!r} has no cases: {VAL_FIX}")
    unlabeled = [c for c in cases if not store.info(c).labeled]
    if len(unlabeled) == len(cases):
        raise StoreError(f"{store.path}: split {split!r} has no labeled cases: {VAL_FIX}")
    if unlabeled:
        raise StoreError(f"{store.path}: split {split!r}: case {unlabeled[0]!r} has no mask "
                         f"(validation needs labels)")
