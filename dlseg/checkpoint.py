"""Training checkpoints: the trainer's own resumable state, atomic ``save_state`` folders, rotation, lookup.

Layout under ``runs/NAME/checkpoints/``::

    step_0000420/          one ``accelerator.save_state`` folder (model, optimizer, scheduler, scaler, RNG,
                           and ``TrainState`` as a registered custom object), visible only once complete
    .tmp-step_0000420/     being written; never resumed from, removed by the next run

A folder is written under its ``.tmp-`` name by every process and renamed by the main process after all
processes have finished writing, so a run killed at any moment leaves nothing that ``--resume auto`` takes
for a checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from dlseg.errors import ResumeError

CHECKPOINTS = "checkpoints"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass
class TrainState:
    """Loop position and bookkeeping saved with every checkpoint (registered for checkpointing)."""

    epoch: int = 0            # epoch in progress (== epochs completed when step_in_epoch is 0)
    step_in_epoch: int = 0    # training batches of ``epoch`` already consumed (per process)
    global_step: int = 0      # optimizer steps so far
    best_dice: float = -1.0   # best mean validation Dice so far
    best_epoch: int = -1
    best_checkpoint: str = ""  # folder name of the checkpoint written with the best model (kept by rotation)
    nonfinite_run: int = 0    # consecutive non-finite steps
    nonfinite_total: int = 0  # skipped non-finite steps in the whole run

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, value)


def checkpoint_name(global_step: int) -> str:
    """Folder name of the checkpoint taken after ``global_step`` optimizer steps."""
    return f"{PREFIX}{global_step:07d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def find_resume(run_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """The checkpoint ``--resume`` asks for: None (fresh), ``auto`` (newest complete one, or fresh), or a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise ResumeError(f"{path}: no checkpoint folder here (use --resume auto to pick the newest in --out)")
    if path.name.startswith(TMP_PREFIX):
        raise ResumeError(f"{path}: an incomplete checkpoint (written when the run stopped); use another one")
    return path


def clean_incomplete(run_dir: str | os.PathLike) -> None:
    """Remove ``.tmp-`` folders left by a run killed while saving (main process, before training)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, run_dir: str | os.PathLike, global_step: int) -> Path:
    """``save_state`` into a temporary folder on every process, then rename it into place on the main one."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(global_step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # same step saved again (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def rotate(run_dir: str | os.PathLike, keep_last: int, keep: str = "") -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and the one named ``keep``; return what was removed."""
    found = list_checkpoints(run_dir)
    doomed = [p for p in found[:max(len(found) - max(keep_last, 1), 0)] if p.name != keep]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
