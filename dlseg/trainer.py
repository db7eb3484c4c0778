"""Training: ``TrainConfig`` and the Accelerate loop with validation, checkpoints, exact resume and preemption.

One code path for one CPU, one GPU, N GPUs or many nodes (``accelerate launch``). The loop is the idiomatic
Accelerate one: a single ``prepare`` of model, optimizer, both loaders and scheduler; ``accumulate`` /
``backward`` / ``clip_grad_norm_``; ``save_state`` / ``load_state`` with the loop position held in a small
:class:`~dlseg.checkpoint.TrainState` registered for checkpointing; ``skip_first_batches`` for a mid-epoch resume.

Validation Dice is computed per case from true/false positive and false negative counts summed over the case's
slices on the *training grid* (size × size): that is the training metric that picks the best model. Dice in the
original geometry is what ``dlseg.evaluate`` reports on predictions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast, set_seed

from dlseg import checkpoint as ckpt
from dlseg import curves
from dlseg.augment import AugmentConfig, BatchAugment, SampleTransform
from dlseg.config import ConfigError, save_yaml, to_dict
from dlseg.console import console, make_progress
from dlseg.data import DataConfig, build_train_loader, build_val_loader, norm_config
from dlseg.distributed import check_launch
from dlseg.export import export_model
from dlseg.losses import LossConfig, build_loss
from dlseg.model import ModelConfig, arch_dict, build_model
from dlseg.errors import UserError
from dlseg.preprocessing.synthetic_store import synthetic_store
from dlseg.store import Store, StoreError

EXIT_PREEMPTED = 75           # state saved after SIGTERM/SIGUSR1; requeue and pass --resume auto
EXIT_FAILED = 1               # training stopped (e.g. too many non-finite losses in a row)
PREEMPTED_MARKER = "PREEMPTED"  # written into the run folder with the exit code above (launchers may lose it)
THRESHOLD = 0.5


# ------------------------------------------------------------------------------------------------ config

@dataclass
class OptimConfig:
    """Optimizer."""

    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0


@dataclass
class SchedConfig:
    """Learning-rate schedule, stepped once per epoch."""

    name: Literal["step", "cosine", "poly"] = "step"
    step_size: int = 4          # step: multiply by gamma every step_size epochs
    gamma: float = 0.1
    warmup_epochs: int = 0      # linear warm-up (from lr/(warmup+1)) before the schedule proper
    power: float = 0.9          # poly: (1 - t)**power
    min_lr_ratio: float = 0.0   # cosine/poly: floor as a fraction of optim.lr


@dataclass
class SyntheticConfig:
    """The built-in synthetic cohort used when no ``--data`` is given."""

    patients: int = 10
    seed: int = 0
    val_fraction: float = 0.2


@dataclass
class TrainConfig:
    """Everything one training run needs (defaults → YAML recipe → ``--key value``)."""

    data: str | None = None               # store path; None = the synthetic cohort under <out>/../_synthetic
    out: str = "runs/default"
    seed: int = 0
    epochs: int = 20
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # None = the launcher's (accelerate config/env)
    dist_timeout_s: int = 1800            # collective timeout: a dead or stuck rank makes the others exit
    resume: str | None = None             # None | "auto" | checkpoint folder
    loader: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    augment_on: Literal["cpu", "device"] = "cpu"
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    grad_accum: int = 1
    clip_grad: float | None = None        # max gradient norm; None = no clipping
    checkpoint_every_steps: int = 0       # also save every N optimizer steps (0 = at epoch ends only)
    keep_last: int = 2                    # checkpoints kept besides the best one
    max_nonfinite: int = 20               # stop after this many non-finite losses in a row
    trackers: list[str] = field(default_factory=list)  # Accelerate log_with, e.g. [tensorboard] or [wandb]
    wait_warn_fraction: float = 0.3       # hint once when the data-wait fraction of an epoch exceeds this
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    debug_shards: bool = False            # write <out>/debug/: slice ids each rank trained on, weight digests
    cpu_threads: int = 0                  # CPU training: torch threads per process (0 = cores left by the workers)


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss keeps being non-finite); one line saying why and what to try."""

    exit_status = EXIT_FAILED


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
                       "sched.warmup_epochs": cfg.sched.warmup_epochs, "loader.workers": cfg.loader.workers}.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    check_trackers(cfg.trackers)
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"resume: {cfg.resume}: no checkpoint folder here (or use 'auto')")
    if cfg.data is not None and not Path(cfg.data).exists():
        raise ConfigError(f"data: {cfg.data}: no such store")


def check_trackers(names: list[str]) -> None:
    """Each ``trackers`` entry must be an Accelerate tracker whose package is installed (else Accelerate only warns)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = {t.value for t in LoggerType}
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError(f"trackers: unknown tracker {name!r} (known: {', '.join(sorted(known))})")
        if name != "all" and name not in available:
            raise ConfigError(f"trackers: {name!r} is not installed (pip install {name})")


# ------------------------------------------------------------------------------------------------ setup

def accelerator_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """``Accelerator`` arguments: precision (None lets Accelerate take the launcher's), collective timeout, logging."""
    return {
        "mixed_precision": cfg.mixed_precision, "gradient_accumulation_steps": cfg.grad_accum,
        "log_with": list(cfg.trackers) or None, "project_dir": str(cfg.out), "step_scheduler_with_optimizer": False,
        "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout_s))],
    }


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
    return Task(num_classes=1 if len(names) == 2 else len(names), labels="liver" if len(names) == 2 else "organs",
                label_names=names[1:], modality=str(modality), sequence=str(sequence), fingerprint=store.fingerprint)


def set_cpu_threads(accelerator: Accelerator, cfg: TrainConfig) -> int:
    """On CPU, give each process the cores its loader workers leave (OMP_NUM_THREADS, when set, wins).

    Torch's OpenMP threads spin while they wait; more runnable threads than cores (compute threads plus busy
    loader workers) slowed a 2-core demo epoch from 10 s to 90 s.
    """
    if accelerator.device.type != "cpu" or ("OMP_NUM_THREADS" in os.environ and not cfg.cpu_threads):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = cfg.cpu_threads or max(1, cores // local - cfg.loader.workers)
    torch.set_num_threads(threads)
    return threads


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """Adam or AdamW."""
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: SchedConfig, epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based)."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    e = epoch - cfg.warmup_epochs
    if cfg.name == "step":
        return cfg.gamma ** (e // cfg.step_size)
    t = min(e / max(epochs - cfg.warmup_epochs, 1), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.name == "cosine" else (1 - t) ** cfg.power
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: int):
    """StepLR (the article's), or a LambdaLR for warm-up / cosine / poly; stepped once per epoch."""
    if cfg.name == "step" and cfg.warmup_epochs == 0:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg, e, epochs))


class PreemptFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM's warning signal); the loop agrees on it across ranks at each step."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.requested = False
        self.signal = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name

    def install(self) -> "PreemptFlag":
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Seed of the device augmentation of one step on one rank (reproducible on resume)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, step, rank]).generate_state(1)[0])


def uneven_shards(loader) -> None:
    """Let each process take its own share of a prepared loader without the duplicates ``even_batches`` pads with.

    For validation: the unwrapped model runs no collective per batch, so processes may see one batch more or
    less; the padding would count slices twice. (``Accelerator.join_uneven_inputs`` does the same but only for
    GPU types; one process has a plain batch sampler with nothing to pad.)
    """
    sampler = loader.batch_sampler
    if hasattr(sampler, "even_batches"):
        sampler.even_batches = False


def sync_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts buffers from rank 0 at the start of each forward, so after the last training step the other
    ranks hold statistics of their own last batch; validation and the exported model use rank 0's.
    """
    if accelerator.num_processes > 1:
        for buf in accelerator.unwrap_model(model).buffers():
            broadcast(buf, from_process=0)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the names and bytes of a model's state dict (to compare ranks and runs)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ validation

def data_wait_hint(fraction: float, augment_on: str, workers: int) -> str:
    """The one-time hint when an epoch waited for data more than ``wait_warn_fraction`` of its step time.

    The likely cure depends on where the loader's time goes (``python -m dlseg.bench loader``): per-sample CPU
    augmentation wants more worker processes or the device path; with device augmentation, handing batches over
    from workers costs more than building them from cached cases (1.2k vs 12.6k samples/s at 256 px on 2 cores).
    """
    head = f"hint: {100 * fraction:.0f} % of step time was spent waiting for data; "
    if augment_on == "cpu":
        return head + f"raise loader.workers (now {workers}) or use --augment_on device"
    if workers > 0:
        return head + (f"augmentation already runs on the device, so the {workers} loader worker(s) only copy cached "
                       "slices, and handing batches over from them costs more than building them: try "
                       "--loader.workers 0 (with loader.cache_mb holding this process's share of the split)")
    return head + ("the first epoch reads and prepares every case in this process; if later epochs wait too, raise "
                   "loader.cache_mb so that the split stays cached, or loader.workers for reads that cannot be")


def confusion_counts(logits: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-slice (N, F, 3) TP/FP/FN for each foreground class (F = 1 for binary) from logits."""
    if num_classes == 1:
        pred = (logits[:, 0] > 0).unsqueeze(1)           # sigmoid(x) > 0.5
        truth = (mask > 0).unsqueeze(1)
    else:
        labels = logits.argmax(1)
        classes = torch.arange(1, num_classes, device=logits.device).view(1, -1, 1, 1)
        pred, truth = labels.unsqueeze(1) == classes, mask.unsqueeze(1) == classes
    dims = (2, 3)
    tp = (pred & truth).sum(dims)
    fp = (pred & ~truth).sum(dims)
    fn = (~pred & truth).sum(dims)
    return torch.stack([tp, fp, fn], dim=-1).long()


@torch.no_grad()
def case_counts(model: torch.nn.Module, loader, num_classes: int, n_cases: int, loss_fn=None,
                channels_last: bool = False, autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of validation: per case [slices, TP, FP, FN per class] and [loss sum, slices].

    Works on a plain DataLoader (tests, single process) as on a prepared one.
    """
    device = next(model.parameters()).device
    n_fg = 1 if num_classes == 1 else num_classes - 1
    counts = torch.zeros(n_cases, 1 + 3 * n_fg, dtype=torch.long, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for batch in loader:
        image = batch["image"].to(device)
        mask = batch["mask"].to(device)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            logits = model(image)
            if loss_fn is not None:
                loss_sum[0] += float(loss_fn(logits, mask)) * image.shape[0]
        loss_sum[1] += image.shape[0]
        per_slice = confusion_counts(logits.float(), mask, num_classes).flatten(1)
        case = batch["case"].to(device).long()
        counts[:, 0].index_add_(0, case, torch.ones_like(case))
        counts[:, 1:].index_add_(0, case, per_slice)
    model.train(was_training)
    return counts, loss_sum


def dice_per_case(counts: torch.Tensor) -> list[float]:
    """Dice per case (mean over foreground classes present in truth or prediction; 1.0 when both empty)."""
    out = []
    for row in counts[:, 1:].view(counts.shape[0], -1, 3).double().cpu():
        tp, fp, fn = row[:, 0], row[:, 1], row[:, 2]
        denom = 2 * tp + fp + fn
        dice = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.ones_like(denom))
        out.append(float(dice.mean()))
    return out


# ------------------------------------------------------------------------------------------------ run

class RunLog:
    """``train.log`` in the run folder plus console lines, main process only."""

    def __init__(self, accelerator: Accelerator, path: Path):
        self.enabled = accelerator.is_main_process
        self.path = path

    def write(self, message: str, echo: bool = True) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if echo:
            console.print(message, highlight=False)


@dataclass
class EpochStats:
    """What one process measured during one training epoch."""

    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0
    wait_s: float = 0.0
    step_s: float = 0.0
    skipped: int = 0


def _epoch_table(epoch: int, epochs: int, row: dict[str, Any]):
    """The end-of-epoch table."""
    from rich.table import Table

    table = Table(title=f"epoch {epoch + 1}/{epochs}", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("train loss", f"{row['train_loss']:.4f}")
    table.add_row("val loss", f"{row['val_loss']:.4f}")
    for case, dice in row["val_dice"].items():
        table.add_row(f"val Dice {case}", f"{dice:.4f}")
    table.add_row("[bold]val Dice mean", f"[bold]{row['val_dice_mean']:.4f}")
    table.add_row("lr", f"{row['lr']:.3g}")
    table.add_row("images/s", f"{row['images_per_s']:.1f}")
    table.add_row("data wait", f"{100 * row['data_wait_fraction']:.1f} %")
    table.add_row("time", f"{row['epoch_time_s']:.1f} s")
    if row["nonfinite_skipped"]:
        table.add_row("non-finite steps skipped", str(row["nonfinite_skipped"]))
    return table


class Trainer:
    """One training run; :meth:`fit` returns an exit status."""

    def __init__(self, cfg: TrainConfig):
        check_config(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.accelerator = Accelerator(**accelerator_kwargs(cfg))
        check_launch(self.accelerator)
        acc = self.accelerator
        self.threads = set_cpu_threads(acc, cfg)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self.log = RunLog(acc, self.out / "train.log")
        with acc.local_main_process_first():
            self.store_path = Path(cfg.data) if cfg.data else ensure_synthetic(cfg)
        store = Store(self.store_path)
        self.task = read_task(store, cfg.loader)
        set_seed(cfg.seed)
        self.in_channels = 2 * cfg.loader.context_slices + 1
        self.arch = arch_dict(cfg.model, self.in_channels, self.task.num_classes)
        model = build_model(self.arch)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(cfg.loss, self.task.num_classes).to(self.accelerator.device)
        optimizer = build_optimizer(cfg.optim, model.parameters())
        scheduler = build_scheduler(cfg.sched, optimizer, cfg.epochs)
        transform = (SampleTransform(cfg.augment, seed=cfg.seed)
                     if cfg.augment_on == "cpu" and cfg.augment.enabled else None)
        self.device_augment = BatchAugment(cfg.augment) if cfg.augment_on == "device" else None
        train_dl = build_train_loader(self.store_path, cfg.loader, seed=cfg.seed, transform=transform)
        val_dl = build_val_loader(self.store_path, cfg.loader)
        self.train_dataset, self.val_dataset = train_dl.dataset, val_dl.dataset
        self.model, self.optimizer, self.train_dl, self.val_dl, self.scheduler = acc.prepare(
            model, optimizer, train_dl, val_dl, scheduler)
        uneven_shards(self.val_dl)
        self.state = ckpt.TrainState()
        acc.register_for_checkpointing(self.state)
        self.preempt = PreemptFlag()
        self.shard_log: list[list[str]] = []

    # ---- helpers ----
    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _resume(self) -> None:
        """Load the checkpoint ``--resume`` names (or the newest), and drop metric records it will redo."""
        acc = self.accelerator
        if acc.is_main_process:
            ckpt.clean_incomplete(self.out)
        acc.wait_for_everyone()
        path = ckpt.find_resume(self.out, self.cfg.resume)
        if path is None:
            if self.cfg.resume == "auto":
                self.log.write("resume auto: no checkpoint yet, starting fresh")
            if acc.is_main_process:
                curves.truncate_metrics(self.out, 0)
            return
        acc.load_state(str(path))
        self.log.write(f"resumed from {path} (epoch {self.state.epoch + 1}, batch {self.state.step_in_epoch}, "
                       f"step {self.state.global_step})")
        if acc.is_main_process:
            curves.truncate_metrics(self.out, self.state.epoch)

    def _save(self, reason: str) -> Path:
        """Checkpoint now (all processes) and rotate old ones (main)."""
        path = ckpt.save_checkpoint(self.accelerator, self.out, self.state.global_step)
        if self.accelerator.is_main_process:
            ckpt.rotate(self.out, self.cfg.keep_last, keep=self.state.best_checkpoint)
        self.log.write(f"checkpoint {path.name} ({reason})", echo=False)
        return path

    def _agree(self, local_flags: list[float]) -> list[float]:
        """Sum small per-process flags over all processes (every rank then takes the same decision)."""
        t = torch.tensor(local_flags, dtype=torch.float32, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def _preempted(self) -> int:
        """Write the marker the launch scripts look for and return EXIT_PREEMPTED."""
        path = ckpt.list_checkpoints(self.out)[-1]
        if self.accelerator.is_main_process:
            (self.out / PREEMPTED_MARKER).write_text(json.dumps({"checkpoint": path.name, "exit": EXIT_PREEMPTED}))
        self.log.write(f"preempted ({self.preempt.signal or 'signal on another rank'}): state saved in {path}; "
                       f"exit {EXIT_PREEMPTED}, continue with --resume auto")
        return EXIT_PREEMPTED

    # ---- loop ----
    def fit(self) -> int:
        """Train until ``cfg.epochs``; 0 when done, EXIT_PREEMPTED after a signal."""
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            save_yaml(cfg, self.out / "config.yaml")
            (self.out / PREEMPTED_MARKER).unlink(missing_ok=True)
        self._resume()
        if cfg.trackers:
            acc.init_trackers(self.out.name, config=_flat(to_dict(cfg)))
        self.log.write(
            f"world size {acc.num_processes} ({acc.distributed_type.value}, device {acc.device}, "
            f"mixed precision {acc.mixed_precision}, {self.threads} CPU threads/process); store {self.store_path}; {len(self.train_dataset)} train / "
            f"{len(self.val_dataset)} val slices; {self.task.labels} ({self.task.num_classes} output(s))")
        self.preempt.install()
        self.warned_wait = False
        self.totals = [0.0, 0.0, 0]  # data wait s, step s (per process), images (all processes)
        try:
            for epoch in range(self.state.epoch, cfg.epochs):
                if self._train_epoch(epoch):
                    return self._preempted()
                self._end_epoch(epoch)
                if self._agree([float(self.preempt.requested)])[0] > 0:
                    return self._preempted()
        finally:
            self.preempt.uninstall()
            if cfg.trackers:
                acc.end_training()
        wait, step, images = self.totals
        self.log.write(f"done: best mean val Dice {self.state.best_dice:.4f} at epoch {self.state.best_epoch + 1}; "
                       f"model in {self.out / 'model'}; this session {images / max(step, 1e-9):.1f} images/s, "
                       f"{100 * wait / max(step, 1e-9):.1f} % of step time waiting for data")
        return 0

    def _train_epoch(self, epoch: int) -> bool:
        """One epoch (from the saved position when resuming); True when preempted (state already saved)."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        self.train_dl.set_epoch(epoch)
        skip = state.step_in_epoch
        loader = acc.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
        n_batches = len(self.train_dl)
        self.stats = EpochStats()
        self.epoch_start = time.perf_counter()
        per_step_images = cfg.loader.batch_size * acc.num_processes
        self.model.train()
        with make_progress(unit="img", transient=True) as progress:
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=n_batches * per_step_images,
                                     completed=skip * per_step_images, info="")
            batches = iter(loader)
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                t1 = time.perf_counter()
                stop = self._train_step(epoch, batch)
                t2 = time.perf_counter()
                self.stats.wait_s += t1 - t0
                self.stats.step_s += t2 - t0
                self.stats.images += per_step_images
                progress.update(task, advance=per_step_images,
                                info=f"step {state.step_in_epoch}/{n_batches} loss {self._last_loss:.4f} "
                                     f"lr {self._lr():.2e}")
                if stop:
                    self._save("preempted")
                    return True
                if (cfg.checkpoint_every_steps and acc.sync_gradients and state.step_in_epoch < n_batches
                        and state.global_step % cfg.checkpoint_every_steps == 0):
                    self._save("periodic")
        return False

    def _train_step(self, epoch: int, batch: dict[str, torch.Tensor]) -> bool:
        """Forward/backward/step on one batch; True when every rank should stop here (preemption agreed)."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        image, mask = batch["image"], batch["mask"]
        if cfg.debug_shards:
            names = self.train_dataset.case_ids
            self.shard_log.append([f"{names[int(c)]}:{int(z)}" for c, z in zip(batch["case"], batch["slice"])])
        with acc.accumulate(self.model):
            if self.device_augment is not None:
                gen = torch.Generator(device=image.device)
                gen.manual_seed(step_seed(cfg.seed, epoch, state.step_in_epoch, acc.process_index))
                image, mask = self.device_augment(image, mask, generator=gen)
            if cfg.model.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            logits = self.model(image)
            loss = self.loss_fn(logits, mask)
            finite = bool(torch.isfinite(loss.detach()))
            bad, stop = self._agree([float(not finite), float(self.preempt.requested)])
            if bad > 0:  # every rank skips (no backward: DDP would wait for the others)
                self.optimizer.zero_grad()
                state.nonfinite_run += 1
                state.nonfinite_total += 1
                self.stats.skipped += 1
                self._last_loss = float("nan")
            else:
                acc.backward(loss)
                if cfg.clip_grad is not None and acc.sync_gradients:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad()
                state.nonfinite_run = 0
                self._last_loss = float(loss.detach())
                self.stats.loss_sum += self._last_loss
                self.stats.steps += 1
        state.step_in_epoch += 1
        if acc.sync_gradients:
            state.global_step += 1
        if state.nonfinite_run >= cfg.max_nonfinite:
            raise TrainingError(
                f"training stopped: {state.nonfinite_run} non-finite losses in a row (epoch {epoch + 1}, step "
                f"{state.global_step}); lower optim.lr, set clip_grad, or use bf16 instead of fp16")
        return stop > 0 and acc.sync_gradients

    def _validate(self) -> tuple[list[float], float]:
        """Dice per validation case and mean val loss, every slice counted once across processes."""
        acc = self.accelerator
        n_cases = len(self.val_dataset.case_ids)
        counts, loss_sum = case_counts(acc.unwrap_model(self.model), self.val_dl, self.task.num_classes, n_cases,
                                       self.loss_fn, self.cfg.model.channels_last, acc.autocast)
        counts = acc.reduce(counts, reduction="sum")
        loss_sum = acc.reduce(loss_sum, reduction="sum")
        expected = torch.as_tensor(self.val_dataset.depths, device=counts.device)
        if not torch.equal(counts[:, 0], expected):
            raise RuntimeError(f"validation saw {counts[:, 0].tolist()} slices per case, expected {expected.tolist()}")
        return dice_per_case(counts), float(loss_sum[0] / loss_sum[1].clamp_min(1))

    def _end_epoch(self, epoch: int) -> None:
        """Reduce epoch stats, validate, export a new best, checkpoint, record and show the epoch."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        s = self.stats
        loss_sum, steps, wait_s, step_s, skipped = self._agree(
            [s.loss_sum, float(s.steps), s.wait_s, s.step_s, float(s.skipped)])
        lr = self._lr()
        sync_buffers(acc, self.model)
        dice, val_loss = self._validate()
        mean_dice = float(np.mean(dice)) if dice else 0.0
        self.scheduler.step()
        state.epoch, state.step_in_epoch = epoch + 1, 0
        name = ckpt.checkpoint_name(state.global_step)
        improved = mean_dice > state.best_dice
        if improved:
            state.best_dice, state.best_epoch, state.best_checkpoint = mean_dice, epoch, name
            if acc.is_main_process:
                export_model(acc.unwrap_model(self.model), self._meta(epoch, mean_dice), self.out / "model")
        self._save("epoch end")
        elapsed = time.perf_counter() - self.epoch_start
        row = {
            "epoch": epoch, "global_step": state.global_step, "world_size": acc.num_processes,
            "train_loss": loss_sum / max(steps, 1.0), "val_loss": val_loss, "lr": lr,
            "val_dice": dict(zip(self.val_dataset.case_ids, dice)), "val_dice_mean": mean_dice,
            "best": improved, "epoch_time_s": elapsed, "images_per_s": s.images / max(step_s / acc.num_processes, 1e-9),
            "data_wait_fraction": wait_s / max(step_s, 1e-9), "nonfinite_skipped": int(skipped),
        }
        self.totals = [self.totals[0] + wait_s / acc.num_processes, self.totals[1] + step_s / acc.num_processes,
                       self.totals[2] + s.images]
        if cfg.debug_shards:
            self._write_debug(epoch)
        if acc.is_main_process:
            curves.append_metrics(self.out, row)
            curves.plot_curves(self.out)
            console.print(_epoch_table(epoch, cfg.epochs, row))
        self.log.write(
            f"epoch {epoch + 1}/{cfg.epochs} train_loss {row['train_loss']:.4f} val_loss {val_loss:.4f} "
            f"val_dice_mean {mean_dice:.4f} " + " ".join(f"{c}={d:.4f}" for c, d in row["val_dice"].items())
            + f" data_wait {row['data_wait_fraction']:.2f} images/s {row['images_per_s']:.1f}"
            + (" best" if improved else ""), echo=False)
        if row["data_wait_fraction"] > cfg.wait_warn_fraction and not self.warned_wait:
            self.warned_wait = True
            self.log.write(data_wait_hint(row["data_wait_fraction"], cfg.augment_on, cfg.loader.workers))
        if cfg.trackers:
            acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}
                    | {f"val_dice/{c}": d for c, d in row["val_dice"].items()}, step=epoch)

    def _meta(self, epoch: int, val_dice: float) -> dict[str, Any]:
        """What prediction needs to use the exported model, plus provenance."""
        return {
            "arch": self.arch, "normalization": norm_config(self.cfg.loader).to_dict(),
            "train_size": self.cfg.loader.size, "context_slices": self.cfg.loader.context_slices,
            "labels": self.task.labels, "modality": self.task.modality, "sequence": self.task.sequence,
            "threshold": THRESHOLD, "channels_last": self.cfg.model.channels_last, "epoch": epoch + 1,
            "val_dice": val_dice, "store_fingerprint": self.task.fingerprint,
        }

    def _write_debug(self, epoch: int) -> None:
        """Slice ids this rank trained on this epoch and its weight digest (for the distributed tests)."""
        debug = self.out / "debug"
        debug.mkdir(parents=True, exist_ok=True)
        rank = self.accelerator.process_index
        record = {"epoch": epoch, "rank": rank, "world_size": self.accelerator.num_processes,
                  "batches": self.shard_log, "weights": weights_digest(self.accelerator.unwrap_model(self.model))}
        with open(debug / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.shard_log = []


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → flat ``a.b`` keys with scalar values (what trackers accept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def run(cfg: TrainConfig) -> int:
    """Train as configured; returns the exit status (0, EXIT_PREEMPTED)."""
    return Trainer(cfg).fit()
