"""Patient-level train/val split: a seeded fraction, k-fold, or a user's JSON file.

The unit is the subject ``<MODALITY>-<patient>`` (``MR-5``, ``CT-3``): CHAOS numbers its CT and MR patients
independently, and a patient's sequences (T1 in/out, T2) always land on the same side. Unlabeled
(Test_Sets) cases are never split. The assignment depends only on the sorted subjects and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlseg.errors import UsageError
from dlseg.fileio import read_json_object
from dlseg.sources.files import natural_key


@dataclass(frozen=True)
class SplitConfig:
    """How labeled patients are divided into train and val."""

    seed: int = 0
    val_fraction: float = 0.2
    folds: int | None = None
    fold: int | None = None
    split_file: str | None = None

    def method(self) -> str:
        """A short description stored with the split."""
        if self.split_file:
            return f"file:{Path(self.split_file).name}"
        if self.folds:
            return f"kfold:{self.folds}:{self.fold}"
        return f"fraction:{self.val_fraction:g}"


def validate(cfg: SplitConfig) -> None:
    """Reject contradictory or out-of-range options (exit 2)."""
    if cfg.split_file and cfg.folds:
        raise UsageError("--split-file and --folds are mutually exclusive")
    if cfg.folds is not None or cfg.fold is not None:
        if cfg.folds is None or cfg.fold is None:
            raise UsageError("--folds K needs --fold I (and vice versa)")
        if cfg.folds < 2:
            raise UsageError(f"--folds {cfg.folds}: need at least 2 folds")
        if not 0 <= cfg.fold < cfg.folds:
            raise UsageError(f"--fold {cfg.fold}: must be in 0..{cfg.folds - 1}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UsageError(f"--val-fraction {cfg.val_fraction}: must be in [0, 1)")


def split_patients(patients: list[str], cfg: SplitConfig) -> tuple[list[str], list[str]]:
    """(train patients, val patients), each naturally sorted."""
    validate(cfg)
    patients = sorted(set(patients), key=natural_key)
    if cfg.split_file:
        train, val = read_split_file(Path(cfg.split_file), patients)
    else:
        order = [patients[i] for i in np.random.default_rng(cfg.seed).permutation(len(patients))]
        if cfg.folds:
            if cfg.folds > len(patients):
                raise UsageError(f"--folds {cfg.folds}: only {len(patients)} labeled patients")
            val = list(np.array_split(np.array(order, dtype=object), cfg.folds)[cfg.fold])
        else:
            val = order[:val_count(len(patients), cfg.val_fraction)]
        train = [p for p in patients if p not in set(val)]
    return sorted(train, key=natural_key), sorted(val, key=natural_key)


def val_count(n: int, fraction: float) -> int:
    """Number of val patients: round(n·f), at least one (and one train patient left) when f > 0."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(int(round(n * fraction)), 1), n - 1)


def read_split_file(path: Path, subjects: list[str]) -> tuple[list[str], list[str]]:
    """``{"train": [...], "val": [...]}`` of patients (``"5"``: that number in every modality, or ``"MR-5"``).

    Every labeled subject must end up on exactly one side.
    """
    data = read_json_object(path, "split file")
    if not all(isinstance(data.get(k), list) for k in ("train", "val")):
        raise UsageError(f'{path}: expected {{"train": [patient ids], "val": [patient ids]}}')
    sides = {name: resolve_subjects(path, [str(p) for p in data[name]], subjects) for name in ("train", "val")}
    both = sorted(set(sides["train"]) & set(sides["val"]), key=natural_key)
    if both:
        raise UsageError(f"{path}: patients in both train and val: {', '.join(both)}")
    missing = [s for s in subjects if s not in set(sides["train"] + sides["val"])]
    if missing:
        raise UsageError(f"{path}: patients in neither train nor val: {', '.join(missing)}")
    return sides["train"], sides["val"]


def resolve_subjects(path: Path, entries: list[str], subjects: list[str]) -> list[str]:
    """Split-file entries → subjects: exact (``MR-5``) or by patient number in any modality (``5``)."""
    out: list[str] = []
    for entry in entries:
        hits = [s for s in subjects if s == entry or s.split("-", 1)[1] == entry]
        if not hits:
            raise UsageError(f"{path}: unknown patient {entry!r} (have: {', '.join(subjects)})")
        out.extend(h for h in hits if h not in out)
    return out


def build_split(cases: dict[str, dict[str, Any]], sides: tuple[list[str], list[str]], cfg: SplitConfig) -> dict[str, Any]:
    """The split stored in the root: case ids per side, plus patients, seed and method.

    ``cases`` maps case id → ``subject`` and ``labeled``; ``sides`` is the ``split_patients`` result over
    all labeled subjects found (so a failed case shifts no one).
    """
    train_p, val_p = sides
    side = {p: "train" for p in train_p} | {p: "val" for p in val_p}
    out: dict[str, Any] = {"train": [], "val": [], "unlabeled": []}
    for cid in sorted(cases, key=natural_key):
        info = cases[cid]
        if not info.get("labeled"):
            out["unlabeled"].append(cid)
        elif info.get("subject") in side:
            out[side[info["subject"]]].append(cid)
    out.update(seed=cfg.seed, method=cfg.method(), patients={"train": list(train_p), "val": list(val_p)})
    return out


def split_warnings(split: dict[str, Any]) -> list[str]:
    """What the run's report warns about a finished split (not errors: a store may be made for prediction only)."""
    if split.get("val"):
        return []
    return ["the split has no val cases: training will refuse this store until it has some (validation picks "
            "the best model; re-run with --val-fraction > 0 or a split file that lists val patients)"]
