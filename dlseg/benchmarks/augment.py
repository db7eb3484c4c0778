"""Augment stage: the article's transform set per sample (albumentations) vs on whole batches (``BatchAugment``).

Both start from the same prepared training slices in memory and end with an augmented batch as tensors:

* per sample: for each slice, seed the albumentations ``Compose`` the way the dataset does (one generator pair
  from the sample's seed), transform image and mask, then stack the batch (what the DataLoader's collate does);
* batched: ``BatchAugment`` on the (N,1,S,S) image and (N,S,S) mask batch, on the benchmark's device (on an
  accelerator the batch is already there: the trainer moves it before augmenting).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from dlseg.augment import AugmentConfig, BatchAugment, build_cpu_transform, seed_transform
from dlseg.data import DataConfig, SliceDataset, sample_seed
from dlseg.store import Store

from .common import BenchConfig, Cohort, Comparison, Contender, StageResult, interleaved

N_BATCHES = 64          # distinct batches cycled through (inputs stay the same between the two paths)


def input_batches(cfg: BenchConfig, cohort: Cohort) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``N_BATCHES`` batches of prepared training slices: image (N,S,S) float32, mask (N,S,S) uint8."""
    cases = Store(cohort.store).split_cases("train")
    dataset = SliceDataset(cohort.store, cases, DataConfig(size=cfg.size, workers=0, cache_mb=1 << 16))
    prepared = [dataset.cache.get(c) for c in cases]
    images = np.concatenate([p.image for p in prepared])
    masks = np.concatenate([p.mask for p in prepared])
    b = cfg.batch_size
    n = min(N_BATCHES, len(images) // b)
    perm = np.random.default_rng(cfg.seed).permutation(len(images))
    return [(images[perm[i * b:(i + 1) * b]], masks[perm[i * b:(i + 1) * b]]) for i in range(n)]


class PerSample:
    """albumentations, one sample at a time, seeded per sample, then collated into a batch."""

    def __init__(self, aug: AugmentConfig, seed: int):
        self.transform = build_cpu_transform(aug, seed=seed)
        self.seed = seed
        self.index = 0

    def __call__(self, batch: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = batch
        out_i, out_m = [], []
        for img, m in zip(images, masks):
            seed_transform(self.transform, sample_seed(self.seed, 0, self.index))
            self.index += 1
            out = self.transform(image=img, mask=m)
            out_i.append(out["image"][None])
            out_m.append(out["mask"].astype(np.uint8, copy=False))
        return torch.from_numpy(np.stack(out_i)), torch.from_numpy(np.stack(out_m))


class Batched:
    """``BatchAugment`` on whole batches already on the device."""

    def __init__(self, aug: AugmentConfig, seed: int, device: str):
        self.augment = BatchAugment(aug)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment(batch[0], batch[1], generator=self.generator)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the duration (as in a loader worker or on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(cfg: BenchConfig, cohort: Cohort) -> StageResult:
    """Measure both augmentation paths on the same batches."""
    res = StageResult("augment", "samples/s")
    aug = AugmentConfig()
    batches = input_batches(cfg, cohort)
    device = cfg.device
    on_device = [(torch.from_numpy(i[:, None].copy()).to(device), torch.from_numpy(m.copy()).to(device))
                 for i, m in batches]
    budget = cfg.scaled(cfg.budget_s)
    per_sample, batched = PerSample(aug, cfg.seed), Batched(aug, cfg.seed, device)
    size = lambda b: len(b[0])  # noqa: E731
    for b in on_device[:2]:     # warm-up (kernel selection, allocator)
        batched(b)
    threads = torch.get_num_threads()
    contenders = {"albumentations_per_sample": Contender(per_sample, itertools.cycle(batches), size),
                  "batch_augment": Contender(batched, itertools.cycle(on_device), size)}
    if device == "cpu" and threads > 1:
        contenders["batch_augment_1_thread"] = Contender(batched, itertools.cycle(on_device), size, one_thread)
    for key, timing in interleaved(contenders, budget, rounds=2 if cfg.quick else 6, device=device).items():
        res.add(key, timing)
    res.compare(Comparison(f"BatchAugment on {device} vs albumentations per sample", "batch_augment",
                           "albumentations_per_sample", "times faster than the per-sample CPU transform",
                           goal_min=3.0))
    if "batch_augment_1_thread" in res.rates:
        res.compare(Comparison("BatchAugment on cpu, 1 torch thread, vs albumentations per sample",
                               "batch_augment_1_thread", "albumentations_per_sample",
                               "the same with one intra-op thread (as in a loader worker or a busy machine)"))
    res.details.update({"batch_size": cfg.batch_size, "size": cfg.size, "device": device,
                        "transforms": "hflip, vflip, transpose, zoom ±10 %, rot90, brightness/contrast (article's p)",
                        "torch_threads": threads})
    res.notes.append("both paths from the same prepared slices in memory to an augmented batch of tensors; "
                     "per sample includes per-sample seeding and collation, as in the DataLoader; the paths take "
                     "turns (6 rounds, order reversed each round) so that a drifting load weighs on all of them")
    return res
