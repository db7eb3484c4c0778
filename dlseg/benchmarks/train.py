"""Train stage: images/s of the real trainer vs a bare PyTorch loop over the same model and batches in memory.

* ``trainer``: ``dlseg.trainer.Trainer`` built from a ``TrainConfig`` (Accelerate, the store loader with its
  workers and cache, augmentation on the configured side, mixed precision, optimizer, loss, per-step logging and
  progress bar), one training epoch timed from the first batch request to the last step, first epoch included
  (worker start-up and cache filling count against the trainer); with ``train_epochs`` > 1 the first epoch is
  warm-up and the others are timed (accelerators: kernel selection and a short epoch would hide the steady state);
* ``bare_loop``: a fresh model of the same architecture, the same optimizer and loss, forward/backward/step under
  the same autocast, over the same number of batches already on the device (no loader, no augmentation, no
  Accelerate, no logging), first step included as well.

Overhead = 1 − trainer / bare loop; goal ≤ 10 %.
"""

from __future__ import annotations

import contextlib
import shutil
import time

import torch

from .common import BenchConfig, Cohort, Comparison, StageResult, Timing, sync

AMP = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_config(cfg: BenchConfig, cohort: Cohort, out: str):
    """The ``TrainConfig`` the benchmark trains with (quick mode: the validation split, a shorter epoch)."""
    from dlseg.data import DataConfig
    from dlseg.model import ModelConfig
    from dlseg.trainer import TrainConfig

    loader = DataConfig(size=cfg.size, batch_size=cfg.batch_size, workers=cfg.workers,
                        train_split="val" if cfg.quick else "train")
    model = ModelConfig(base_width=cfg.base_width, depth=cfg.depth, channels_last=cfg.channels_last)
    return TrainConfig(data=str(cohort.store), out=out, seed=cfg.seed, epochs=1, mixed_precision=cfg.mixed_precision,
                       loader=loader, model=model, augment_on=cfg.augment_on)


def trainer_epoch(trainer, epoch: int) -> Timing:
    """Images and seconds of one training epoch of ``trainer`` (no validation, no checkpoint)."""
    trainer.state.step_in_epoch = 0   # as Trainer._end_epoch leaves it; no public one-epoch hook yet
    sync(str(trainer.accelerator.device))
    start = time.perf_counter()
    trainer._train_epoch(epoch)
    sync(str(trainer.accelerator.device))
    return Timing(trainer.stats.images, time.perf_counter() - start)


def memory_batches(cfg: BenchConfig, cohort: Cohort, split: str, n: int, device: str) -> list:
    """``n`` training batches (image, mask) prepared from the store and moved to ``device`` beforehand."""
    from dlseg.data import DataConfig, build_train_loader

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


def bare_loop(cfg: BenchConfig, arch: dict, num_classes: int, batches: list, device: str) -> Timing:
    """Forward/backward/step over in-memory batches with a fresh model, Adam and the focal loss.

    With ``train_epochs`` E > 1, one untimed pass over the batches, then E − 1 timed passes (like the trainer).
    """
    from dlseg.losses import LossConfig, build_loss
    from dlseg.model import build_model
    from dlseg.trainer import OptimConfig, build_optimizer

    torch.manual_seed(cfg.seed)
    model = build_model(arch).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(OptimConfig(), model.parameters())
    loss_fn = build_loss(LossConfig(), num_classes).to(device)
    dtype = AMP[cfg.mixed_precision]
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype is torch.float16)
    autocast = (torch.autocast(device_type=device.split(":")[0], dtype=dtype) if dtype is not None
                else contextlib.nullcontext())

    def step(image: torch.Tensor, mask: torch.Tensor) -> None:
        with autocast:
            loss = loss_fn(model(image), mask)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()

    passes = max(1, cfg.train_epochs - 1)
    if cfg.train_epochs > 1:
        for image, mask in batches:
            step(image, mask)
    sync(device)
    start = time.perf_counter()
    for _ in range(passes):
        for image, mask in batches:
            step(image, mask)
    sync(device)
    return Timing(passes * sum(len(b[0]) for b in batches), time.perf_counter() - start)


def run(cfg: BenchConfig, cohort: Cohort) -> StageResult:
    """Measure trainer epochs and the bare loop over as many batches."""
    from dlseg.trainer import Trainer

    res = StageResult("train", "images/s")
    out = cohort.root / "scratch-train"
    shutil.rmtree(out, ignore_errors=True)
    tcfg = train_config(cfg, cohort, str(out))
    trainer = Trainer(tcfg)
    device = str(trainer.accelerator.device)
    epochs = [trainer_epoch(trainer, e) for e in range(cfg.train_epochs)]
    timed = epochs[1:] if len(epochs) > 1 else epochs
    res.add("trainer", Timing(sum(t.items for t in timed), sum(t.seconds for t in timed)))
    stats = trainer.stats
    steps = len(trainer.train_dl)
    threads = torch.get_num_threads()   # the trainer sets them on CPU (cores its loader workers leave)
    arch, num_classes = trainer.arch, trainer.task.num_classes
    del trainer
    shutil.rmtree(out, ignore_errors=True)

    batches = memory_batches(cfg, cohort, tcfg.loader.train_split, steps, device)
    res.add("bare_loop", bare_loop(cfg, arch, num_classes, batches, device))
    res.compare(Comparison("real trainer vs bare PyTorch loop (same model, batches in memory)", "trainer",
                           "bare_loop", "fraction of the bare loop's speed; ≥ 0.9 = overhead ≤ 10 %", goal_min=0.9))
    res.details.update({
        "steps": steps, "epochs": cfg.train_epochs, "timed_epochs": len(timed),
        "first_epoch_images_per_s": epochs[0].rate, "batch_size": cfg.batch_size, "size": cfg.size,
        "base_width": cfg.base_width,
        "depth": cfg.depth, "device": device, "mixed_precision": cfg.mixed_precision,
        "channels_last": cfg.channels_last, "workers": cfg.workers, "augment_on": cfg.augment_on,
        "train_split": tcfg.loader.train_split, "torch_threads": threads,
        "trainer_data_wait_fraction": stats.wait_s / max(stats.step_s, 1e-9),
    })
    warm = "first epoch / first pass untimed" if cfg.train_epochs > 1 else "one epoch each, first step included"
    res.notes.append(f"bare loop at the trainer's compute threads ({threads}); {warm}; the trainer's loader, "
                     "augmentation, "
                     "Accelerate wrapping, loss sync and progress bar all count as overhead")
    return res
