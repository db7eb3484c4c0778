"""Before a run's first step: one job per run folder (its lock), the run's identity, one checkpoint for all ranks.

The main process decides (takes the lock, picks and verifies the checkpoint, compares identities) and every other
process receives its decision as a short text broadcast, so ranks never act on their own view of the file system
and a refusal on the main process stops every rank at once instead of leaving them in a collective.

A run's *identity* is what makes its checkpoints its own: store fingerprint, labels, architecture, loss,
optimizer, schedule, effective batch. Resuming with a different identity is refused with every differing field
(old → new); ``--allow_change FIELD[,FIELD]`` accepts named changes (``optimizer`` or ``optimizer.lr``). Raising
``--epochs`` is not a change of identity.
"""

from __future__ import annotations

import atexit
import copy
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from dlseg.checkpoint import Parts, clean_incomplete, list_checkpoints, read_identity, verify
from dlseg.config import to_dict
from dlseg.errors import ResumeError, UserError
from dlseg.locks import FolderLock, short_command
from dlseg.task import Task
from dlseg.train_config import IDENTITY_FIELDS, TrainConfig

TEXT_BYTES = 4200      # longest decision text broadcast to the other ranks ("ok:" + a path up to PATH_MAX)


def broadcast_text(acc: Accelerator, text: str) -> str:
    """The main process's ``text`` on every process (UTF-8 in a fixed-size tensor; no pickle)."""
    if acc.num_processes == 1:
        return text
    buf = torch.zeros(TEXT_BYTES, dtype=torch.uint8, device=acc.device)
    if acc.is_main_process and text:
        data = text.encode()[:TEXT_BYTES]
        buf[:len(data)] = torch.tensor(list(data), dtype=torch.uint8, device=acc.device)
    buf = broadcast(buf, from_process=0)
    return bytes(buf.cpu().numpy()).rstrip(b"\0").decode()


def main_decides(acc: Accelerator, decide: Callable[[], str]) -> str:
    """``decide()`` on the main process, its result on all; its error stops every process (UserError: exit 2)."""
    text, error = "", None
    if acc.is_main_process:
        try:
            text = "ok:" + decide()
        except Exception as e:   # the others must hear of any failure, or they wait in the broadcast below
            error, text = e, "refused"
    text = broadcast_text(acc, text)
    if error is not None:
        raise error
    if not text.startswith("ok:"):
        raise UserError("stopped: the main process refused to start (its message says why)")
    return text[3:]


def slurm_run() -> tuple[str, int] | None:
    """(job tag, restart count) inside a Slurm job: the tag is ``JOBID`` or ``ARRAYJOBID_TASKID``."""
    env = os.environ
    job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
           if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID") else env.get("SLURM_JOB_ID"))
    return (job, int(env.get("SLURM_RESTART_COUNT") or 0)) if job else None


class RunLock(FolderLock):
    """The run folder's lock; inside Slurm it also takes over the lock of an earlier run of this very job (a
    requeue may land on another host, and Slurm never runs two incarnations of one job at once)."""

    def __init__(self, folder: Path):
        self.slurm = slurm_run()
        tag = f" [slurm job {self.slurm[0]} restart {self.slurm[1]}]" if self.slurm else ""
        super().__init__(folder, short_command().split(" ")[0] + tag)   # + the option names (locks.short_command)

    def _stale_reason(self, holder, st):
        m = re.search(r"\[slurm job (\S+) restart (\d+)\]", str((holder or {}).get("command", "")))
        if self.slurm and m and m.group(1) == self.slurm[0] and int(m.group(2)) < self.slurm[1]:
            return (f"left by restart {m.group(2)} of this Slurm job {m.group(1)} (pid {holder['pid']} on "
                    f"{holder['host']}); this is restart {self.slurm[1]}")
        return super()._stale_reason(holder, st)


def hold_run_folder(acc: Accelerator, out: Path) -> RunLock | None:
    """Create the run folder and take its lock (main process; the others wait for its verdict). The caller
    releases it when the run ends; a process that dies holding it leaves a stale lock the next run takes over."""
    lock = RunLock(out) if acc.is_main_process else None

    def take() -> str:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        atexit.register(lock.release)   # also on an error before the run starts
        return ""
    main_decides(acc, take)
    return lock


def run_identity(cfg: TrainConfig, task: Task, arch: dict[str, Any], num_processes: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it."""
    identity = {"store_fingerprint": task.fingerprint, "labels": task.labels, "architecture": arch,
            "loss": to_dict(cfg.loss), "optimizer": to_dict(cfg.optim), "schedule": to_dict(cfg.sched),
            "effective_batch": cfg.loader.batch_size * num_processes * cfg.grad_accum}
    assert tuple(identity) == IDENTITY_FIELDS
    return identity


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted field → (old, new) for every field that differs (a missing field counts as None)."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_identity(path: Path, new: dict[str, Any], allowed: list[str]) -> dict[str, tuple[Any, Any]]:
    """The changes the run may make (``allowed``); ResumeError listing the others, old → new."""
    changes = identity_changes(read_identity(path), new)
    refused = {k: v for k, v in changes.items() if not any(k == a or k.startswith(a + ".") for a in allowed)}
    if refused:
        listed = ", ".join(f"{k} {o!r} → {n!r}" for k, (o, n) in refused.items())
        raise ResumeError(f"{path}: this run differs from the one that wrote the checkpoint: {listed}; use a new "
                          f"--out, or accept with --allow_change {','.join(sorted({k.split('.')[0] for k in refused}))}")
    return changes


def pick_checkpoint(out: Path, resume: str) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint ``--resume`` allows, and one line for each damaged one passed over."""
    candidates = list(reversed(list_checkpoints(out))) if resume == "auto" else [Path(resume)]
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            verify(path)
        except ValueError as e:
            skipped.append((path, str(e)))
            continue
        return path, [f"checkpoint {p} not used: {why}; resuming from {path.name} instead" for p, why in skipped]
    if skipped and resume != "auto":
        raise ResumeError(f"{resume}: not a usable checkpoint: {skipped[0][1]}")
    if skipped:
        raise ResumeError(f"{out / 'checkpoints'}: no usable checkpoint ({len(skipped)} damaged; newest "
                          f"{skipped[0][0].name}: {skipped[0][1]}); move them aside to start afresh")
    return None, []


def choose_checkpoint(acc: Accelerator, cfg: TrainConfig, identity: dict[str, Any],
                      say: Callable[[str], None]) -> tuple[Path | None, set[str]]:
    """The checkpoint every process resumes from (None: fresh start) and the identity fields it changes."""
    out, changed = Path(cfg.out), set()

    def decide() -> str:
        clean_incomplete(out)
        if cfg.resume is None:
            if found := list_checkpoints(out):
                raise ResumeError(f"{out}: already holds the checkpoints of a run (newest {found[-1].name}); "
                                  "continue it with --resume auto, or train into a new --out")
            return ""
        path, notes = pick_checkpoint(out, cfg.resume)
        for note in notes:
            say(note)
        if path is None:
            return ""
        for key, (old, new) in check_identity(path, identity, cfg.allow_change).items():
            say(f"resume: {key} changed {old!r} → {new!r} (--allow_change)")
        return str(path)

    chosen = main_decides(acc, decide)
    if chosen:
        changed = set(identity_changes(read_identity(Path(chosen)), identity))
    return (Path(chosen) if chosen else None), {k.split(".")[0] for k in changed}


def fresh_hyperparameters(parts: Parts) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The new run's optimizer hyperparameters and scheduler state (taken before a checkpoint overwrites them)."""
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in parts.optimizer.param_groups]
    return groups, copy.deepcopy(_inner(parts.scheduler).state_dict())


def apply_hyperparameters(parts: Parts, fresh: tuple[list[dict[str, Any]], dict[str, Any]], epochs_done: int) -> None:
    """After an allowed optimizer/schedule change: the new hyperparameters, the new schedule replayed to the epoch."""
    groups, sched_state = fresh
    for group, new in zip(parts.optimizer.param_groups, groups):
        group.update(copy.deepcopy(new))
    inner = _inner(parts.scheduler)
    inner.load_state_dict(copy.deepcopy(sched_state))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "scheduler.step() before optimizer.step()": a replay, not training
        for _ in range(epochs_done):
            inner.step()


def _inner(scheduler: Any) -> Any:
    return getattr(scheduler, "scheduler", scheduler)
