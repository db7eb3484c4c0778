"""Loader stage: samples/s of ``SliceDataset`` (read + normalize + resize, no augmentation) in one process.

Measured in sampler order (``EpochSampler``, epoch 0) over the training split, item by item through
``__getitem__`` (``workers=0``: one process, nothing hidden by parallelism), against per-sample baselines that
produce the same item (image (1,S,S) float32 tensor, mask (S,S) uint8 tensor):

* ``dicom``: the article's way: ``pydicom.dcmread`` the slice + rescale slope/intercept, ``cv2.imread`` its PNG,
  labels, normalize with the case's stored statistics, pad + resize;
* ``zarr_per_sample``: a naive store reader: one ``zarr`` call per array per sample, then the same normalize/resize;
* ``memory_floor``: copying the prepared slice and mask out of memory (what the cache hands back, minus the cache).

``SliceDataset`` is measured cold (a fresh dataset: every case read once, with one zarr call per array, and
prepared on first touch), warm (every case already in the per-process cache: the steady state of later epochs
with persistent workers) and with a cache bounded to two cases (a cohort larger than the budget).

``dataloader_*``: the trainer's own loader (``build_train_loader``: sampler, batches of ``--batch-size``, no CPU
augmentation, as with ``augment_on: device``) over warm caches, in the main process and with ``LOADER_WORKERS``
worker processes: what handing each batch over from a worker (shared memory) costs once every case is cached.
"""

from __future__ import annotations

import itertools
import math
import os
import time

import cv2
import numpy as np
import pydicom
import torch
from pydicom.pixels import apply_rescale

from dlseg.data import MB, DataConfig, EpochSampler, SliceDataset, build_train_loader
from dlseg.normalize import NormConfig, ResizeMapping, normalize
from dlseg.sources.layout import discover
from dlseg.sources.masks import lookup_table
from dlseg.store import Store

from .common import BenchConfig, BenchSkip, Cohort, Comparison, StageResult, Timing, measure

def prepare_slice(image: np.ndarray, mask: np.ndarray, stats: dict, modality: str, size: int,
                  norm: NormConfig) -> dict:
    """One raw slice + label slice → the dataset's item (normalize, pad with the slice minimum, resize)."""
    img = normalize(image, stats, modality, norm)
    mapping = ResizeMapping(int(img.shape[0]), int(img.shape[1]), size)
    x = mapping.forward(img, fill=float(img.min()))
    m = mapping.forward(mask, is_mask=True)
    return {"image": torch.from_numpy(x[None].copy()), "mask": torch.from_numpy(m.astype(np.uint8))}


class DicomPerSample:
    """The article's loader: decode the slice's DICOM file and ground-truth PNG for every sample."""

    def __init__(self, dataset: SliceDataset, chaos, size: int):
        store = dataset.cache.store()
        sources = {s.case_id: s for s in discover(chaos, "t1-in", "liver")[0]}
        missing = [c for c in dataset.case_ids if c not in sources]
        if missing:
            raise BenchSkip(f"{chaos}: no DICOM sources for {', '.join(missing[:3])}")
        self.files, self.attrs = [], []
        for cid in dataset.case_ids:
            attrs = store.info(cid).attrs
            root = sources[cid].root
            self.files.append(([root / f for f in attrs["source_files"]], [root / f for f in attrs["mask_files"]]))
            self.attrs.append(attrs)
        self.lut = lookup_table("MR", "liver")
        self.rows = dataset.index.tolist()
        self.size = size
        self.norm = NormConfig()

    def __call__(self, i: int) -> dict:
        c, z = self.rows[i]
        images, masks = self.files[c]
        ds = pydicom.dcmread(images[z])
        image = apply_rescale(ds.pixel_array, ds)
        labels = self.lut[cv2.imread(str(masks[z]), cv2.IMREAD_GRAYSCALE)]
        attrs = self.attrs[c]
        return prepare_slice(image, labels, attrs["stats"], attrs["modality"], self.size, self.norm)


class ZarrPerSample:
    """A naive store reader: one zarr call per array for every sample, then normalize and resize."""

    def __init__(self, dataset: SliceDataset, size: int):
        self.store = dataset.cache.store()
        self.case_ids = dataset.case_ids
        self.attrs = [self.store.info(c).attrs for c in self.case_ids]
        self.rows = dataset.index.tolist()
        self.size = size
        self.norm = NormConfig()

    def __call__(self, i: int) -> dict:
        c, z = self.rows[i]
        image, mask = self.store.read_slices(self.case_ids[c], z, z + 1)
        attrs = self.attrs[c]
        return prepare_slice(image[0], mask[0], attrs["stats"], attrs["modality"], self.size, self.norm)


class MemoryFloor:
    """The floor: the prepared slice and mask copied out of memory into the same tensors."""

    def __init__(self, dataset: SliceDataset):
        self.cases = [dataset.cache.get(c) for c in dataset.case_ids]
        self.rows = dataset.index.tolist()

    def __call__(self, i: int) -> dict:
        c, z = self.rows[i]
        case = self.cases[c]
        return {"image": torch.from_numpy(case.image[z:z + 1].copy()),
                "mask": torch.from_numpy(case.mask[z].copy())}


LOADER_WORKERS = 2   # worker processes in the DataLoader comparison


def dataloader_rate(store: str, size: int, batch_size: int, workers: int, seed: int, budget_s: float) -> Timing:
    """Samples/s of ``build_train_loader`` over warm caches: one epoch to fill them, then whole epochs for the budget."""
    cfg = DataConfig(size=size, batch_size=batch_size, workers=workers, cache_mb=1 << 16)
    loader = build_train_loader(store, cfg, seed)
    for _ in loader:                       # epoch 0: every worker's cache fills (persistent workers keep it)
        pass
    n, start = 0, time.perf_counter()
    epoch = 1
    while n == 0 or time.perf_counter() - start < budget_s:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            n += len(batch["image"])
        epoch += 1
    seconds = time.perf_counter() - start
    del loader                             # ends persistent workers
    return Timing(n, seconds)


def epoch_order(dataset: SliceDataset, seed: int, block_cases: int | None = None) -> list[int]:
    """Indices of epoch 0 as the training sampler orders them."""
    return EpochSampler(dataset, seed, block_cases=block_cases).order(0).tolist()


def run(cfg: BenchConfig, cohort: Cohort) -> StageResult:
    """Measure the loader and its baselines; see the module docstring."""
    res = StageResult("loader", "samples/s")
    cases = Store(cohort.store).split_cases("train")
    data_cfg = DataConfig(size=cfg.size, workers=0, cache_mb=1 << 16)
    dataset = SliceDataset(cohort.store, cases, data_cfg)
    order = epoch_order(dataset, cfg.seed)
    budget = cfg.scaled(cfg.budget_s)

    cold = measure(dataset.__getitem__, order, budget_s=float("inf"))          # a whole first epoch
    res.add("slicedataset_cold", cold)
    res.add("slicedataset_warm", measure(dataset.__getitem__, itertools.cycle(order), budget))
    floor = MemoryFloor(dataset)
    res.add("memory_floor", measure(floor, itertools.cycle(order), budget))
    res.add("zarr_per_sample", measure(ZarrPerSample(dataset, cfg.size), order, budget))
    if cohort.chaos is None:
        res.skipped["dicom"] = "no --source CHAOS tree for the given store"
    else:
        res.add("dicom", measure(DicomPerSample(dataset, cohort.chaos, cfg.size), order, budget))
    bounded = BoundedReader(cohort.store, cases, cfg.size, math.ceil(2 * dataset.case_bytes() / MB))
    res.add("slicedataset_bounded_cold", measure(bounded, epoch_order(bounded.dataset, cfg.seed), float("inf")))
    for workers in (0, LOADER_WORKERS):
        res.add(f"dataloader_{workers}_workers",
                dataloader_rate(str(cohort.store), cfg.size, cfg.batch_size, workers, cfg.seed, budget))
    add_comparisons(res)

    budget_bytes = bounded.dataset.cache.budget_bytes
    res.details.update({
        "cases": len(cases), "samples_per_epoch": len(dataset), "size": cfg.size, "batch_size": cfg.batch_size,
        "cache_reads_cold_epoch": dataset.cache.reads, "prepared_case_mb_max": dataset.case_bytes() / MB,
        "bounded_cache_budget_mb": budget_bytes / MB, "bounded_cache_peak_mb": bounded.peak / MB,
        "bounded_cache_reads": bounded.dataset.cache.reads,
    })
    res.memory_checks.append({
        "name": "bounded per-worker cache stays within its budget", "value_mb": bounded.peak / MB,
        "reference_mb": budget_bytes / MB, "ratio": bounded.peak / budget_bytes if budget_bytes else float("nan"),
        "goal_max": 1.0, "met": bool(bounded.peak <= budget_bytes),
        "meaning": "bytes of prepared cases held by the cache ÷ the configured budget (cache_mb)"})
    res.notes.append("one process, workers=0, items one by one through __getitem__ in the training sampler's "
                     "order; warm = every case already prepared in the per-process cache (epochs after the first "
                     "with persistent workers; the epoch order repeated for the time budget); cold = a fresh "
                     "dataset's first epoch")
    return res


class BoundedReader:
    """Items read through a cache of ``cache_mb`` (a cohort larger than the cache); the cache's peak is kept."""

    def __init__(self, store: str | os.PathLike, cases: list[str], size: int, cache_mb: int):
        self.dataset = SliceDataset(store, cases, DataConfig(size=size, workers=0, cache_mb=cache_mb))
        self.peak = 0

    def __call__(self, i: int) -> None:
        """Read item ``i``; note the bytes the cache holds afterwards."""
        self.dataset[i]
        self.peak = max(self.peak, self.dataset.cache.nbytes)


def add_comparisons(res: StageResult) -> None:
    """The loader's ratios against its baselines, with their goals."""
    res.compare(Comparison("SliceDataset (warm cache) vs DICOM+PNG per sample", "slicedataset_warm", "dicom",
                           "times faster than decoding the source files per sample (the article's loader)",
                           goal_min=10.0))
    res.compare(Comparison("SliceDataset (first epoch, cold) vs DICOM+PNG per sample", "slicedataset_cold", "dicom",
                           "the same, counting every case's first read and preparation", goal_min=10.0))
    res.compare(Comparison("SliceDataset (warm cache) vs one zarr call per sample", "slicedataset_warm",
                           "zarr_per_sample", "times faster than a naive per-sample store reader"))
    res.compare(Comparison("SliceDataset (warm cache) vs memory copy (floor)", "slicedataset_warm", "memory_floor",
                           "fraction of the floor reached; ≥ 0.33 means within 3× of copying from memory",
                           goal_min=1 / 3))
    res.compare(Comparison("SliceDataset, cache bounded to 2 cases (cold) vs DICOM per sample",
                           "slicedataset_bounded_cold", "dicom",
                           "a cohort larger than the cache budget: blocked epoch order, one read per case"))
    res.compare(Comparison(f"trainer's DataLoader, {LOADER_WORKERS} worker processes vs in the main process (warm)",
                           f"dataloader_{LOADER_WORKERS}_workers", "dataloader_0_workers",
                           "batches handed over from worker processes (shared memory) vs built in the training "
                           "process, every case cached, no CPU augmentation (as with augment_on: device)"))
