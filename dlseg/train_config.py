"""``TrainConfig``: every key of a training run with its flag help, its checks, and what it sets up on the machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import InitProcessGroupKwargs, LoggerType

from dlseg.augment import AugmentConfig
from dlseg.augment import check_config as check_augment
from dlseg.config import option
from dlseg.data import DataConfig
from dlseg.errors import ConfigError
from dlseg.losses import LossConfig
from dlseg.model import ModelConfig
from dlseg.optim import OptimConfig, SchedConfig

# What a checkpoint records of its run; a resume that differs in one is refused unless ``allow_change`` names it.
IDENTITY_FIELDS = ("store_fingerprint", "labels", "architecture", "loss", "optimizer", "schedule", "effective_batch")


@dataclass
class SyntheticConfig:
    """The built-in synthetic cohort used when no ``--data`` is given."""

    patients: int = option("synthetic cohort: number of MR patients", 10)
    seed: int = option("synthetic cohort: generator seed", 0)
    val_fraction: float = option("synthetic cohort: fraction of patients in the val split", 0.2)


@dataclass
class TrainConfig:
    """Everything one training run needs (defaults → YAML recipe → ``--key value``)."""

    data: str | None = option("store path; unset = the synthetic cohort under <out>/../_synthetic", None)
    out: str = option("run folder: config.yaml, train.log, metrics.jsonl, curves.png, checkpoints/, model/",
                      "runs/default")
    seed: int = option("seed of weight initialization, data order and augmentation", 0)
    epochs: int = option("epochs to train (a resumed run continues up to this many)", 20)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(
        "no, fp16 or bf16; unset = the launcher's (accelerate config / environment)", None)
    dist_timeout_s: int = option("collective timeout (s): a dead or stuck rank makes the others exit", 1800)
    resume: str | None = option("auto (the newest checkpoint in --out, else a fresh start) or a checkpoint folder",
                                None)
    allow_change: list[str] = option(
        "resume even though these fields of the run's identity changed (comma-separated: store_fingerprint, labels, "
        "architecture, loss, optimizer, schedule, effective_batch, or a key such as optimizer.lr)", default_factory=list)
    loader: DataConfig = option("data pipeline", default_factory=DataConfig)
    model: ModelConfig = option("model architecture", default_factory=ModelConfig)
    loss: LossConfig = option("training loss", default_factory=LossConfig)
    augment: AugmentConfig = option("training augmentation", default_factory=AugmentConfig)
    augment_on: Literal["cpu", "device"] = option(
        "cpu: per sample in the loader workers; device: per batch on the training device", "cpu")
    optim: OptimConfig = option("optimizer", default_factory=OptimConfig)
    sched: SchedConfig = option("learning-rate schedule", default_factory=SchedConfig)
    grad_accum: int = option("batches per optimizer step (gradient accumulation)", 1)
    clip_grad: float | None = option("max gradient norm; unset = no clipping", None)
    checkpoint_every_steps: int = option("also checkpoint every N optimizer steps (0 = at epoch ends only)", 0)
    keep_last: int = option("checkpoints kept besides the best one", 2)
    export_model: Literal["best", "last"] = option(
        "the model <out>/model holds: best = highest mean validation Dice; last = the final epoch's, no choice made "
        "on the validation patients (what cross-validation scores)", "best")
    max_nonfinite: int = option("stop (exit 1) after this many non-finite losses in a row", 20)
    trackers: list[str] = option("Accelerate trackers (log_with), e.g. tensorboard or wandb", default_factory=list)
    wait_warn_fraction: float = option("hint once when an epoch waits for data more than this fraction of its "
                                       "step time", 0.3)
    synthetic: SyntheticConfig = option("built-in synthetic cohort", default_factory=SyntheticConfig)
    debug_shards: bool = option("write <out>/debug/: slice ids each rank trained on, weight digests", False)
    cpu_threads: int = option("CPU training: torch threads per process (0 = the cores the loader workers leave)", 0)


def check_config(cfg: TrainConfig) -> None:
    """Values the type system cannot check; ConfigError naming the key."""
    positive = {"epochs": cfg.epochs, "grad_accum": cfg.grad_accum, "keep_last": cfg.keep_last,
                "max_nonfinite": cfg.max_nonfinite, "loader.batch_size": cfg.loader.batch_size,
                "loader.val_batch_size": cfg.loader.val_batch_size, "loader.size": cfg.loader.size,
                "sched.step_size": cfg.sched.step_size, "synthetic.patients": cfg.synthetic.patients,
                "dist_timeout_s": cfg.dist_timeout_s}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    if cfg.clip_grad is not None and not cfg.clip_grad > 0:
        raise ConfigError(f"clip_grad: must be > 0 or null, got {cfg.clip_grad}")
    for key, value in {"checkpoint_every_steps": cfg.checkpoint_every_steps, "cpu_threads": cfg.cpu_threads,
                       "sched.warmup_epochs": cfg.sched.warmup_epochs, "loader.workers": cfg.loader.workers,
                       "loader.val_workers": cfg.loader.val_workers or 0}.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    try:
        check_augment(cfg.augment)       # the augmentation's own checks, as a one-line config error
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_trackers(cfg.trackers)
    for name in cfg.allow_change:
        if name.split(".")[0] not in IDENTITY_FIELDS:
            raise ConfigError(f"allow_change: {name!r} is not a field of the run's identity "
                              f"({', '.join(IDENTITY_FIELDS)})")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"resume: {cfg.resume}: no checkpoint folder here (or use 'auto')")
    if cfg.data is not None and not Path(cfg.data).exists():
        raise ConfigError(f"data: {cfg.data}: no such store")


def check_trackers(names: list[str]) -> None:
    """Each ``trackers`` entry must be an Accelerate tracker whose package is installed (else Accelerate only warns)."""
    known = {t.value for t in LoggerType}
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError(f"trackers: unknown tracker {name!r} (known: {', '.join(sorted(known))})")
        if name != "all" and name not in available:
            raise ConfigError(f"trackers: {name!r} is not installed (pip install {name})")


def accelerator_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """``Accelerator`` arguments: precision (None lets Accelerate take the launcher's), collective timeout, logging."""
    return {
        "mixed_precision": cfg.mixed_precision, "gradient_accumulation_steps": cfg.grad_accum,
        "log_with": list(cfg.trackers) or None, "project_dir": str(cfg.out), "step_scheduler_with_optimizer": False,
        "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout_s))],
    }


def set_cpu_threads(accelerator: Accelerator, cfg: TrainConfig) -> int:
    """On CPU, give each process the cores its loader workers leave (OMP_NUM_THREADS, when set, wins).

    Torch's OpenMP threads spin while they wait, so more runnable threads than cores starve the loader.
    """
    if accelerator.device.type != "cpu" or ("OMP_NUM_THREADS" in os.environ and not cfg.cpu_threads):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = cfg.cpu_threads or max(1, cores // local - cfg.loader.workers)
    torch.set_num_threads(threads)
    return threads
