"""Train stage: images/s of the real trainer vs a bare PyTorch loop over the same model and batches in memory.

* ``trainer``: ``dlseg.trainer.Trainer`` built from a ``TrainConfig`` (Accelerate, the store loader with its
  workers and cache, augmentation on the configured side, mixed precision, optimizer, loss, per-step logging and
  progress bar), one training epoch timed from the first batch request to the last step, first epoch included
  (worker start-up and cache filling count against the trainer unless ``warmup_epochs`` excludes them:
  accelerators, where kernel selection and short epochs would hide the steady state);
* ``bare_loop``: a fresh model of the same architecture, the same optimizer and loss, forward/backward/step under
  the same autocast, over the same number of batches already on the device (no loader, no augmentation, no
  Accelerate, no logging).

``train_epochs`` epochs and as many passes of the bare loop alternate (trainer epoch, bare pass, …), so that a
machine load that drifts during the stage weighs on both; the first ``warmup_epochs`` of each are not timed.

Overhead = 1 − trainer / bare loop; goal ≤ 10 %.
"""

from __future__ import annotations

import contextlib
import shutil
import time

import torch

from dlseg.data import DataConfig, build_train_loader
from dlseg.losses import LossConfig, build_loss
from dlseg.model import ModelConfig, build_model
from dlseg.optim import OptimConfig, build_optimizer
from dlseg.runlog import EpochStats
from dlseg.train_config import TrainConfig
from dlseg.trainer import Trainer

from .common import BenchConfig, Cohort, Comparison, StageResult, Timing, sync

AMP = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_config(cfg: BenchConfig, cohort: Cohort, out: str):
    """The ``TrainConfig`` the benchmark trains with (quick mode: the validation split, a shorter epoch)."""
    loader = DataConfig(size=cfg.size, batch_size=cfg.batch_size, workers=cfg.workers,
                        train_split="val" if cfg.quick else "train")
    model = ModelConfig(base_width=cfg.base_width, depth=cfg.depth, channels_last=cfg.channels_last)
    return TrainConfig(data=str(cohort.store), out=out, seed=cfg.seed, epochs=1, mixed_precision=cfg.mixed_precision,
                       loader=loader, model=model, augment_on=cfg.augment_on)


def trainer_epoch(trainer: Trainer, epoch: int, stats: EpochStats) -> Timing:
    """Images and seconds of one training epoch of ``trainer`` into ``stats`` (no validation, no checkpoint)."""
    trainer.state.step_in_epoch = 0   # as Trainer.end_epoch leaves it
    sync(str(trainer.accelerator.device))
    start = time.perf_counter()
    trainer.train_one_epoch(epoch, stats)
    sync(str(trainer.accelerator.device))
    return Timing(stats.images, time.perf_counter() - start)


def memory_batches(cfg: BenchConfig, cohort: Cohort, split: str, n: int, device: str) -> list:
    """``n`` training batches (image, mask) prepared from the store and moved to ``device`` beforehand."""
    loader = build_train_loader(cohort.store, DataConfig(size=cfg.size, batch_size=cfg.batch_size, workers=0,
                                                         train_split=split), seed=cfg.seed)
    batches = []
    for batch in loader:
        image = batch["image"].to(device)
        if cfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        batches.append((image, batch["mask"].to(device)))
        if len(batches) == n:
            break
    return batches


class BareLoop:
    """Forward/backward/step over in-memory batches: a fresh model, Adam and the focal loss, the same autocast."""

    def __init__(self, cfg: BenchConfig, arch: dict, num_classes: int, device: str):
        torch.manual_seed(cfg.seed)
        self.device = device
        self.model = build_model(arch).to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = build_optimizer(OptimConfig(), self.model.parameters())
        self.loss_fn = build_loss(LossConfig(), num_classes).to(device)
        self.dtype = AMP[cfg.mixed_precision]
        self.scaler = torch.amp.GradScaler(device.split(":")[0], enabled=self.dtype is torch.float16)

    def autocast(self):
        """The mixed-precision context (none for full precision)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.dtype)

    def step(self, image: torch.Tensor, mask: torch.Tensor) -> None:
        """One optimizer step."""
        with self.autocast():
            loss = self.loss_fn(self.model(image), mask)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()

    def run(self, batches: list) -> Timing:
        """One timed pass over the batches."""
        sync(self.device)
        start = time.perf_counter()
        for image, mask in batches:
            self.step(image, mask)
        sync(self.device)
        return Timing(sum(len(b[0]) for b in batches), time.perf_counter() - start)


def total(timings: list[Timing]) -> Timing:
    """Items and seconds summed."""
    return Timing(sum(t.items for t in timings), sum(t.seconds for t in timings))


def run(cfg: BenchConfig, cohort: Cohort) -> StageResult:
    """Measure trainer epochs and the bare loop over as many batches."""
    res = StageResult("train", "images/s")
    out = cohort.root / "scratch-train"
    shutil.rmtree(out, ignore_errors=True)
    tcfg = train_config(cfg, cohort, str(out))
    trainer = Trainer(tcfg)
    device = str(trainer.accelerator.device)
    threads = torch.get_num_threads()   # the trainer sets them on CPU (cores its loader workers leave)
    steps = len(trainer.train_dl)
    batches = memory_batches(cfg, cohort, tcfg.loader.train_split, steps, device)
    bare = BareLoop(cfg, trainer.arch, trainer.task.num_classes, device)
    epochs, passes = [], []
    for epoch in range(cfg.train_epochs):      # interleaved: a drifting machine load hits both sides alike
        stats = EpochStats()
        epochs.append(trainer_epoch(trainer, epoch, stats))
        passes.append(bare.run(batches))
    del trainer, bare
    shutil.rmtree(out, ignore_errors=True)
    res.add("trainer", total(epochs[cfg.warmup_epochs:]))
    res.add("bare_loop", total(passes[cfg.warmup_epochs:]))
    res.compare(Comparison("real trainer vs bare PyTorch loop (same model, batches in memory)", "trainer",
                           "bare_loop", "fraction of the bare loop's speed; ≥ 0.9 = overhead ≤ 10 %", goal_min=0.9))
    res.details.update({
        "steps": steps, "epochs": cfg.train_epochs, "timed_epochs": cfg.train_epochs - cfg.warmup_epochs,
        "first_epoch_images_per_s": epochs[0].rate, "batch_size": cfg.batch_size, "size": cfg.size,
        "base_width": cfg.base_width,
        "depth": cfg.depth, "device": device, "mixed_precision": cfg.mixed_precision,
        "channels_last": cfg.channels_last, "workers": cfg.workers, "augment_on": cfg.augment_on,
        "train_split": tcfg.loader.train_split, "torch_threads": threads,
        "trainer_data_wait_fraction": stats.wait_s / max(stats.step_s, 1e-9),
    })
    warm = (f"{cfg.warmup_epochs} warm-up epoch(s) untimed on both sides" if cfg.warmup_epochs
            else "every epoch timed, first step included on both sides")
    res.notes.append(f"bare loop at the trainer's compute threads ({threads}); {warm}; the trainer's loader, "
                     "augmentation, "
                     "Accelerate wrapping, loss sync and progress bar all count as overhead")
    return res
