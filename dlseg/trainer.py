"""The training loop: Accelerate, validation each epoch, checkpoints, exact resume and preemption.

One code path for one CPU, one GPU, N GPUs or many nodes (``accelerate launch``): a single ``prepare`` of model,
optimizer, both loaders and scheduler; ``accumulate`` / ``backward`` / ``clip_grad_norm_``; checkpoints without
pickle (:mod:`dlseg.checkpoint`) with the loop position in a :class:`~dlseg.checkpoint.TrainState`; the run folder's
lock, identity check and one resume choice for all ranks (:mod:`dlseg.runstart`); ``skip_first_batches`` for a
mid-epoch resume.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed

from dlseg import checkpoint as ckpt
from dlseg import curves, runstart
from dlseg.augment import BatchAugment, SampleTransform, for_store_labels, invariance_limits, invariances
from dlseg.config import save_yaml, to_dict
from dlseg.console import console, make_progress
from dlseg.data import build_train_loader, build_val_loader, norm_config
from dlseg.distributed import check_launch
from dlseg.errors import UserError
from dlseg.export import export_model, read_meta
from dlseg.losses import build_loss
from dlseg.memory import fit_loaders
from dlseg.model import arch_dict, build_model
from dlseg.optim import build_optimizer, build_scheduler
from dlseg.preemption import EXIT_PREEMPTED, PreemptFlag, clear_marker, write_marker
from dlseg.ranks import RankWatch, watch_ranks
from dlseg.runlog import (
    EpochStats, RunLog, RunTotals, data_wait_hint, epoch_line, epoch_table, flat_config, missed_class_warnings,
    tracker_values,
)
from dlseg.shard_debug import write_shard_record
from dlseg.store import Store
from dlseg.task import ensure_synthetic, read_task
from dlseg.train_config import TrainConfig, accelerator_kwargs, check_config, set_cpu_threads
from dlseg.validation import Scores, ValidationCounts, evaluate

EXIT_FAILED = 1               # training stopped (e.g. too many non-finite losses in a row)
THRESHOLD = 0.5               # probability above which the exported model predicts foreground


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss keeps being non-finite); one line saying why and what to try."""

    exit_status = EXIT_FAILED


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Seed of the device augmentation of one step on one rank (reproducible on resume)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, step, rank]).generate_state(1)[0])


def uneven_shards(loader) -> None:
    """Let each process take its own share of a prepared loader without the duplicates ``even_batches`` pads with.

    Validation runs the unwrapped model (no collective per batch), and padding would count slices twice.
    """
    sampler = loader.batch_sampler
    if hasattr(sampler, "even_batches"):
        sampler.even_batches = False


def sync_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics) before validation and export.

    DDP broadcasts buffers only at the start of each forward, so the other ranks hold their last batch's.
    """
    if accelerator.num_processes > 1:
        for buf in accelerator.unwrap_model(model).buffers():
            broadcast(buf, from_process=0)


class Trainer:
    """One training run: everything it holds is built here; :meth:`fit` runs it and returns an exit status."""

    def __init__(self, cfg: TrainConfig, watch: RankWatch | None = None):
        check_config(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.accelerator = acc = Accelerator(**accelerator_kwargs(cfg))
        check_launch(acc)
        if watch is not None:   # from here a hung peer is caught even where no collective would time out
            watch.start(cfg.dist_timeout_s)
        self.threads = set_cpu_threads(acc, cfg)
        with acc.local_main_process_first():
            self.store_path = Path(cfg.data) if cfg.data else ensure_synthetic(cfg)
        self.task = read_task(Store(self.store_path), cfg.loader)   # refuses an unusable store before any output
        augment = for_store_labels(cfg.augment, self.task.label_names)   # may refuse, before any output
        self.lock = runstart.hold_run_folder(acc, self.out)   # one job per run folder, before anything is written
        self.log = RunLog(acc.is_main_process, self.out / "train.log")
        set_seed(cfg.seed)
        self.arch = arch_dict(cfg.model, 2 * cfg.loader.context_slices + 1, self.task.num_classes)
        model = build_model(self.arch)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(cfg.loss, self.task.num_classes).to(acc.device)
        optimizer = build_optimizer(cfg.optim, model.parameters())
        scheduler = build_scheduler(cfg.sched, optimizer, cfg.epochs)
        transform = SampleTransform(augment, seed=cfg.seed) if cfg.augment_on == "cpu" and augment.enabled else None
        self.device_augment = BatchAugment(augment) if cfg.augment_on == "device" else None
        train_dl = build_train_loader(self.store_path, cfg.loader, seed=cfg.seed, transform=transform)
        val_dl = build_val_loader(self.store_path, cfg.loader)
        self.train_dataset, self.val_dataset = train_dl.dataset, val_dl.dataset
        self.log.write(fit_loaders(cfg.loader, [self.train_dataset, self.val_dataset]).line)  # may refuse (exit 2)
        self.model, self.optimizer, self.train_dl, self.val_dl, self.scheduler = acc.prepare(
            model, optimizer, train_dl, val_dl, scheduler)
        uneven_shards(self.val_dl)
        self.state = ckpt.TrainState()                 # loop position and best model, saved with each checkpoint
        self.parts = ckpt.Parts(self.model, self.optimizer, self.scheduler)
        self.identity = runstart.run_identity(cfg, self.task, self.arch, acc.num_processes)
        self.preempt = PreemptFlag()
        self.totals = RunTotals()                      # throughput over this session's epochs
        self.shard_log: list[list[str]] = []           # --debug_shards: slice ids of this epoch's batches
        self.warned_wait = False                       # the data-wait hint is given once per session

    # ---- the loop ----
    def fit(self) -> int:
        """Train until ``cfg.epochs``; 0 when done, EXIT_PREEMPTED after a signal."""
        if not self._start():
            return 0
        self.preempt.install()
        try:
            for epoch in range(self.state.epoch, self.cfg.epochs):
                stats = EpochStats()
                if self.train_one_epoch(epoch, stats):
                    return self._preempted()
                self.end_epoch(epoch, stats)
                if self._agree([float(self.preempt.requested)])[0] > 0:
                    return self._preempted()
        finally:
            self.preempt.uninstall()
            if self.cfg.trackers:
                self.accelerator.end_training()
        self.log.write(f"done: best mean val Dice {self.state.best_dice:.4f} at epoch {self.state.best_epoch + 1}; "
                       f"model in {self.out / 'model'}; {self.totals.summary()}")
        return 0

    def train_one_epoch(self, epoch: int, stats: EpochStats) -> bool:
        """One epoch (from the saved position when resuming) into ``stats``; True when preempted (state saved)."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        self.train_dl.set_epoch(epoch)
        skip = state.step_in_epoch
        loader = acc.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
        n_batches = len(self.train_dl)
        per_step_images = cfg.loader.batch_size * acc.num_processes
        self.model.train()
        with make_progress(unit="img", transient=True) as progress:
            bar = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=n_batches * per_step_images,
                                    completed=skip * per_step_images, info="")
            batches = iter(loader)
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    return False
                t1 = time.perf_counter()
                stop = self.train_step(epoch, batch, stats)
                stats.wait_s += t1 - t0
                stats.step_s += time.perf_counter() - t0
                stats.images += per_step_images
                progress.update(bar, advance=per_step_images, info=f"step {state.step_in_epoch}/{n_batches} "
                                f"loss {stats.last_loss:.4f} lr {self._lr():.2e}")
                if stop:
                    self._save("preempted")
                    return True
                if (cfg.checkpoint_every_steps and acc.sync_gradients and state.step_in_epoch < n_batches
                        and state.global_step % cfg.checkpoint_every_steps == 0):
                    self._save("periodic")

    def train_step(self, epoch: int, batch: dict[str, torch.Tensor], stats: EpochStats) -> bool:
        """Forward/backward/step on one batch; True when every rank should stop here (preemption agreed)."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        if cfg.debug_shards:
            names = self.train_dataset.case_ids
            self.shard_log.append([f"{names[int(c)]}:{int(z)}" for c, z in zip(batch["case"], batch["slice"])])
        with acc.accumulate(self.model):
            image, mask = self._inputs(epoch, batch)
            loss = self.loss_fn(self.model(image), mask)
            bad, stop = self._agree([float(not bool(torch.isfinite(loss.detach()))), float(self.preempt.requested)])
            if bad > 0:  # every rank skips (no backward: DDP would wait for the others)
                self.optimizer.zero_grad()
                state.nonfinite_run += 1
                state.nonfinite_total += 1
                stats.skipped += 1
                stats.last_loss = float("nan")
            else:
                acc.backward(loss)
                if cfg.clip_grad is not None and acc.sync_gradients:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad()
                state.nonfinite_run = 0
                stats.last_loss = float(loss.detach())
                stats.loss_sum += stats.last_loss
                stats.steps += 1
        state.step_in_epoch += 1
        if acc.sync_gradients:
            state.global_step += 1
        if state.nonfinite_run >= cfg.max_nonfinite:
            raise TrainingError(
                f"training stopped: {state.nonfinite_run} non-finite losses in a row (epoch {epoch + 1}, step "
                f"{state.global_step}); lower optim.lr, set clip_grad, or use bf16 instead of fp16")
        return stop > 0 and acc.sync_gradients

    def validate(self) -> Scores:
        """Dice per validation case and mean val loss, every slice counted once across processes."""
        acc = self.accelerator
        counts = ValidationCounts(len(self.val_dataset.case_ids), self.task.num_classes, acc.device)
        evaluate(acc.unwrap_model(self.model), self.val_dl, counts, self.loss_fn, self.cfg.model.channels_last,
                 acc.autocast)
        counts.reduce_from_all_processes(acc)
        counts.check_complete(self.val_dataset.depths)
        return counts.compute()

    def end_epoch(self, epoch: int, stats: EpochStats) -> None:
        """Sum the epoch's stats, validate, step the schedule, export a new best, checkpoint, record the epoch."""
        acc, state, n = self.accelerator, self.state, self.accelerator.num_processes
        loss_sum, steps, wait_s, step_s, skipped = self._agree(
            [stats.loss_sum, float(stats.steps), stats.wait_s, stats.step_s, float(stats.skipped)])
        lr = self._lr()
        sync_buffers(acc, self.model)
        scores = self.validate()
        mean_dice = scores.mean_dice()
        self.scheduler.step()
        state.epoch, state.step_in_epoch = epoch + 1, 0
        improved = mean_dice > state.best_dice
        if improved:
            state.best_dice, state.best_epoch = mean_dice, epoch
            state.best_checkpoint = ckpt.checkpoint_name(state.global_step)
        if improved or self.cfg.export_model == "last":
            self._export(epoch, mean_dice)
        self._save("epoch end")
        row = {
            "epoch": epoch, "global_step": state.global_step, "world_size": n,
            "train_loss": loss_sum / max(steps, 1.0), "val_loss": scores.loss, "lr": lr,
            "val_dice": dict(zip(self.val_dataset.case_ids, scores.dice)), "val_dice_mean": mean_dice,
            "val_dice_class": dict(zip(self.task.label_names, scores.class_means())),
            "best": improved, "epoch_time_s": time.perf_counter() - stats.started,
            "images_per_s": stats.images / max(step_s / n, 1e-9), "data_wait_fraction": wait_s / max(step_s, 1e-9),
            "nonfinite_skipped": int(skipped),
        }
        self.totals.wait_s += wait_s / n
        self.totals.step_s += step_s / n
        self.totals.images += stats.images
        self._record(epoch, row)

    # ---- around the loop ----
    def _start(self) -> bool:
        """Resume, save the config, start the trackers and say what runs where; False when nothing is left to do."""
        acc, cfg = self.accelerator, self.cfg
        self._resume()
        if acc.is_main_process:
            clear_marker(self.out)
        if self.state.epoch >= cfg.epochs:
            self._export_last_if_missing()
            self.log.write(f"nothing to train: this run has already trained {self.state.epoch} epoch(s) (--epochs "
                           f"{cfg.epochs}); its model is in {self.out / 'model'}; raise --epochs to train longer")
            return False
        if acc.is_main_process:
            save_yaml(cfg, self.out / "config.yaml")
        if cfg.trackers:
            acc.init_trackers(self.out.name, config=flat_config(to_dict(cfg)))
        self.log.write(
            f"world size {acc.num_processes} ({acc.distributed_type.value}, device {acc.device}, "
            f"mixed precision {acc.mixed_precision}, {self.threads} CPU threads/process); store {self.store_path}; "
            f"{len(self.train_dataset)} train / {len(self.val_dataset)} val slices; "
            f"{self.task.labels} ({self.task.num_classes} output(s))")
        return True

    def _inputs(self, epoch: int, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's image and mask as the model takes them (device augmentation, memory format)."""
        image, mask = batch["image"], batch["mask"]
        if self.device_augment is not None:
            gen = torch.Generator(device=image.device)
            gen.manual_seed(step_seed(self.cfg.seed, epoch, self.state.step_in_epoch, self.accelerator.process_index))
            image, mask = self.device_augment(image, mask, generator=gen)
        if self.cfg.model.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return image, mask

    def _record(self, epoch: int, row: dict[str, Any]) -> None:
        """Write the epoch to metrics.jsonl, curves.png, train.log, the console and the trackers."""
        acc, cfg = self.accelerator, self.cfg
        if cfg.debug_shards:
            self._write_debug(epoch)
        if acc.is_main_process:
            curves.append_metrics(self.out, row)
            curves.plot_curves(self.out)
            console.print(epoch_table(epoch, cfg.epochs, row))
        self.log.write(epoch_line(cfg.epochs, row), echo=False)
        if row["data_wait_fraction"] > cfg.wait_warn_fraction and not self.warned_wait:
            self.warned_wait = True
            self.log.write(data_wait_hint(row["data_wait_fraction"], cfg.augment_on, cfg.loader.workers))
        if epoch == cfg.epochs - 1:
            for warning in missed_class_warnings(row["val_dice_class"]):
                self.log.write(warning)
        if cfg.trackers:
            acc.log(tracker_values(row), step=epoch)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _agree(self, local_flags: list[float]) -> list[float]:
        """Sum small per-process values over all processes (every rank then takes the same decision)."""
        t = torch.tensor(local_flags, dtype=torch.float32, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def _resume(self) -> None:
        """Load the checkpoint ``--resume`` names (or the newest), and drop metric records it will redo."""
        acc = self.accelerator
        fresh = runstart.fresh_hyperparameters(self.parts)
        path, changed = runstart.choose_checkpoint(acc, self.cfg, self.identity, self.log.write)
        if path is None:
            if self.cfg.resume == "auto":
                self.log.write("resume auto: no checkpoint yet, starting fresh")
            if acc.is_main_process:
                curves.truncate_metrics(self.out, 0)
            return
        ckpt.load_checkpoint(acc, path, self.state, self.parts)
        if changed & {"optimizer", "schedule"}:
            runstart.apply_hyperparameters(self.parts, fresh, self.state.epoch)
        self.log.write(f"resumed from {path} (epoch {self.state.epoch + 1}, batch {self.state.step_in_epoch}, "
                       f"step {self.state.global_step})")
        if acc.is_main_process:
            curves.truncate_metrics(self.out, self.state.epoch)

    def _save(self, reason: str) -> Path:
        """Checkpoint now (all processes) and rotate old ones (main)."""
        path = ckpt.save_checkpoint(self.accelerator, self.out, self.state, self.identity, self.parts)
        if self.accelerator.is_main_process:
            ckpt.rotate(self.out, self.cfg.keep_last, keep=self.state.best_checkpoint)
        self.log.write(f"checkpoint {path.name} ({reason})", echo=False)
        return path

    def _export(self, epoch: int, mean_dice: float) -> None:
        """Replace ``<out>/model`` with the current weights (main process)."""
        if self.accelerator.is_main_process:
            export_model(self.accelerator.unwrap_model(self.model), self._meta(epoch, mean_dice), self.out / "model")

    def _export_last_if_missing(self) -> None:
        """A finished run asked for ``export_model: last`` whose model is another epoch's: validate the final
        weights (just resumed) and export them, so finished runs can be switched without training again."""
        if self.cfg.export_model != "last" or self.state.epoch == 0:
            return
        meta = read_meta(self.out / "model") if (self.out / "model" / "model.json").is_file() else {}
        if meta.get("selected") == "last" and meta.get("epoch") == self.state.epoch:
            return
        scores = self.validate()
        self._export(self.state.epoch - 1, scores.mean_dice())
        self.log.write(f"exported the last epoch's model ({self.state.epoch}) to {self.out / 'model'}")

    def _preempted(self) -> int:
        """Write the marker the launch scripts look for and return EXIT_PREEMPTED."""
        path = ckpt.list_checkpoints(self.out)[-1]
        if self.accelerator.is_main_process:
            write_marker(self.out, path.name)
        self.log.write(f"preempted ({self.preempt.signal or 'signal on another rank'}): state saved in {path}; "
                       f"exit {EXIT_PREEMPTED}, continue with --resume auto")
        return EXIT_PREEMPTED

    def _meta(self, epoch: int, val_dice: float) -> dict[str, Any]:
        """What prediction needs to use the exported model, plus provenance."""
        return {
            "arch": self.arch, "normalization": norm_config(self.cfg.loader).to_dict(),
            "train_size": self.cfg.loader.size, "context_slices": self.cfg.loader.context_slices,
            "labels": self.task.labels, "modality": self.task.modality, "sequence": self.task.sequence,
            "threshold": THRESHOLD, "channels_last": self.cfg.model.channels_last, "epoch": epoch + 1,
            "val_dice": val_dice, "selected": self.cfg.export_model, "store_fingerprint": self.task.fingerprint,
            "class_names": self.task.label_names, "invariances": invariances(self.cfg.augment),
            "invariance_limits": invariance_limits(self.cfg.augment),
        }

    def _write_debug(self, epoch: int) -> None:
        """This rank's ``--debug_shards`` record of the epoch; the batch log starts again."""
        acc = self.accelerator
        write_shard_record(self.out, epoch, acc.process_index, acc.num_processes, self.shard_log,
                           acc.unwrap_model(self.model))
        self.shard_log = []


def run(cfg: TrainConfig) -> int:
    """Train as configured; returns the exit status (0, EXIT_PREEMPTED); RankLostError when another rank died."""
    with watch_ranks(int(os.environ.get("RANK", 0) or 0), int(os.environ.get("WORLD_SIZE", 1) or 1),
                     Path(cfg.out) / "train.log") as watch:
        trainer = Trainer(cfg, watch)
        try:
            return trainer.fit()
        finally:
            if trainer.lock is not None:
                trainer.lock.release()
