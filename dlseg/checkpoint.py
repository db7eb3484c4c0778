"""Training checkpoints: the folder format (written and read without pickle), its manifest, rotation and lookup.

Layout under ``runs/NAME/checkpoints/``::

    step_0000420/          one checkpoint, visible only once complete (see docs/training.md for every file)
    .tmp-step_0000420/     being written; never resumed from, removed by the next run

Every file is written once, by one process: the main process writes the model, optimizer, scheduler, AMP scaler,
loop state and identity; each process writes its own RNG state (``rng_<rank>``). Each file is fsynced; after all
processes are done the main process writes ``manifest.json`` (size and SHA-256 of every file) last, fsyncs the
folder, renames it into place and fsyncs ``checkpoints/``. A checkpoint is used only when its manifest matches its
files and every file parses as JSON / safetensors (:func:`verify`); nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from dlseg.errors import ResumeError
from dlseg.fileio import hash_file, install_dir, write_synced
from dlseg.statefile import (
    check_safetensors, load_model_file, read_json, read_state, save_model_file, state_files, write_state,
)

CHECKPOINTS = "checkpoints"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)$")
FORMAT, VERSION = "dlseg-checkpoint", 1
MANIFEST = "manifest.json"
MODEL = "model.safetensors"
OPTIMIZER, SCHEDULER, SCALER = "optimizer", "scheduler", "scaler"   # each a .json + .safetensors pair
TRAIN_STATE = "train_state.json"
IDENTITY = "identity.json"
# Test hooks (fault injection): pause a save mid-way / log every file write / hide the newest checkpoint from a rank.
PAUSE_ENV, WRITE_LOG_ENV, HIDE_ENV = "DLSEG_TEST_SAVE_PAUSE", "DLSEG_TEST_WRITE_LOG", "DLSEG_TEST_HIDE_NEWEST_RANK"


@dataclass
class TrainState:
    """Loop position and bookkeeping saved with every checkpoint (``train_state.json``)."""

    epoch: int = 0            # epoch in progress (== epochs completed when step_in_epoch is 0)
    step_in_epoch: int = 0    # training batches of ``epoch`` already consumed (per process)
    global_step: int = 0      # optimizer steps so far
    best_dice: float = -1.0   # best mean validation Dice so far
    best_epoch: int = -1
    best_checkpoint: str = ""  # folder name of the checkpoint written with the best model (kept by rotation)
    nonfinite_run: int = 0    # consecutive non-finite steps
    nonfinite_total: int = 0  # skipped non-finite steps in the whole run

    def update(self, saved: dict[str, Any]) -> None:
        """Take the saved values (unknown keys ignored, so older checkpoints lacking a field still load)."""
        for f in fields(self):
            if f.name in saved:
                setattr(self, f.name, type(getattr(self, f.name))(saved[f.name]))


@dataclass
class Parts:
    """The prepared objects a checkpoint saves and restores besides the loop state."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any


def rng_name(rank: int) -> str:
    return f"rng_{rank}"


def checkpoint_name(global_step: int) -> str:
    """Folder name of the checkpoint taken after ``global_step`` optimizer steps."""
    return f"{PREFIX}{global_step:07d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run (complete by name; :func:`verify` checks the contents), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME_RE.match(p.name))]
    paths = [p for _, p in sorted(found)]
    hide = os.environ.get(HIDE_ENV)
    if hide and int(hide) == int(os.environ.get("RANK", "0")):
        return paths[:-1]
    return paths


def clean_incomplete(run_dir: str | os.PathLike) -> None:
    """Remove ``.tmp-`` folders left by a run killed while saving (main process, holding the run's lock)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def rotate(run_dir: str | os.PathLike, keep_last: int, keep: str = "") -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and the one named ``keep``; return what was removed."""
    found = list_checkpoints(run_dir)
    doomed = [p for p in found[:max(len(found) - max(keep_last, 1), 0)] if p.name != keep]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ---- saving ----
def save_checkpoint(acc: Accelerator, run_dir: str | os.PathLike, state: TrainState, identity: dict[str, Any],
                    parts: Parts) -> Path:
    """Write the checkpoint of ``state.global_step`` (every process takes part) and make it visible whole."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(state.global_step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    acc.wait_for_everyone()
    write = _writer(acc.process_index, final.name)
    if acc.is_main_process:
        _write_shared(tmp, acc, state, identity, parts, write)
    write_state(tmp, rng_name(acc.process_index), rng_state(acc), write)
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_manifest(tmp, acc.num_processes, write)
        install_dir(tmp, final, root / f"{TMP_PREFIX}{final.name}-old", fsync=True)
    acc.wait_for_everyone()
    return final


def _write_shared(tmp: Path, acc: Accelerator, state: TrainState, identity: dict[str, Any], parts: Parts,
                  write) -> None:
    """The files of the main process: model, optimizer, scheduler, AMP scaler, loop state, identity."""
    save_model_file(tmp / MODEL, acc.unwrap_model(parts.model), write)
    write_state(tmp, OPTIMIZER, parts.optimizer.state_dict(), write)
    write_state(tmp, SCHEDULER, parts.scheduler.state_dict(), write)
    if acc.scaler is not None:
        write_state(tmp, SCALER, acc.scaler.state_dict(), write)
    write(tmp / TRAIN_STATE, _json(asdict(state)))
    write(tmp / IDENTITY, _json(identity))


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def _writer(rank: int, name: str):
    """``write(path, data)``: one fsynced file; the test hooks log the write and pause after the first file."""
    log, pause = os.environ.get(WRITE_LOG_ENV), os.environ.get(PAUSE_ENV, "")

    def write(path: Path, data: bytes) -> None:
        write_synced(path, data)
        if log:
            with open(Path(log) / f"rank{rank}.txt", "a") as f:
                f.write(f"{name}/{path.name}\n")
        when, _, signal_file = pause.partition(":")
        if when == name and signal_file and not Path(signal_file).exists():
            Path(signal_file).touch()          # the test kills this process now
            time.sleep(600)
    return write


def write_manifest(folder: Path, world_size: int, write) -> None:
    """``manifest.json``: every other file's size and SHA-256 (written last: its presence means complete)."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name != MANIFEST:
            h = hashlib.sha256()
            hash_file(h, p)
            files[p.name] = {"bytes": p.stat().st_size, "sha256": h.hexdigest()}
    write(folder / MANIFEST, _json({"format": FORMAT, "version": VERSION, "world_size": world_size,
                                    "files": files}))


def rng_state(acc: Accelerator) -> dict[str, Any]:
    """This process's random generators and Accelerate's accumulation counter."""
    return {"accelerator_step": acc.step, "python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


# ---- checking and loading ----
def verify(path: Path) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint; ValueError with the one-line reason otherwise."""
    try:
        manifest = read_json(path / MANIFEST)
    except ValueError:
        raise ValueError(f"no readable {MANIFEST} (incomplete or not a dlseg checkpoint)") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{MANIFEST}: not a {FORMAT} version {VERSION}")
    files = manifest.get("files", {})
    required = [MODEL, TRAIN_STATE, IDENTITY, *state_files(OPTIMIZER), *state_files(SCHEDULER),
                *[f for r in range(int(manifest.get("world_size", 1))) for f in state_files(rng_name(r))]]
    for name in required:
        if name not in files:
            raise ValueError(f"{name}: missing from the manifest")
    for name, info in files.items():
        _check_file(path, name, info)
    return manifest


def _check_file(folder: Path, name: str, info: dict[str, Any]) -> None:
    """One file against its manifest entry, then parsed (JSON) or its header opened (safetensors)."""
    p = folder / name
    if "/" in name or not p.is_file():
        raise ValueError(f"{name}: missing")
    size = p.stat().st_size
    if size != info.get("bytes"):
        raise ValueError(f"{name}: {size} bytes, the manifest says {info.get('bytes')} (truncated or rewritten)")
    h = hashlib.sha256()
    hash_file(h, p)
    if h.hexdigest() != info.get("sha256"):
        raise ValueError(f"{name}: contents differ from the manifest's SHA-256 (corrupted)")
    if name.endswith(".json"):
        read_json(p)
    elif name.endswith(".safetensors"):
        check_safetensors(p)


def read_identity(path: Path) -> dict[str, Any]:
    return read_json(path / IDENTITY)


def load_checkpoint(acc: Accelerator, path: Path, state: TrainState, parts: Parts) -> None:
    """Restore a verified checkpoint on this process; ResumeError naming the file when one does not load."""
    try:
        load_model_file(path / MODEL, acc.unwrap_model(parts.model))
        parts.optimizer.load_state_dict(read_state(path, OPTIMIZER))
        parts.scheduler.load_state_dict(read_state(path, SCHEDULER))
        if acc.scaler is not None and (path / state_files(SCALER)[0]).is_file():
            acc.scaler.load_state_dict(read_state(path, SCALER))
        state.update(read_json(path / TRAIN_STATE))
        rank_file = state_files(rng_name(acc.process_index))[0]
        if (path / rank_file).is_file():      # a rank the saving run did not have keeps its seeded generators
            set_rng_state(acc, read_state(path, rng_name(acc.process_index)))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ResumeError(f"{path}: cannot be loaded: {e}") from None


def set_rng_state(acc: Accelerator, saved: dict[str, Any]) -> None:
    acc.step = int(saved["accelerator_step"])
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])

