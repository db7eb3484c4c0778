"""Training and validation data over the store: 2D / 2.5D slices, a per-worker case cache, an epoch sampler.

Reading costs one zarr call per array per *case* (``Store.read_case``), never per sample: a zarr call costs far
more than copying a prepared slice from memory. Each DataLoader worker therefore keeps a bounded LRU of *prepared*
cases (``normalize.prepare_volume`` / ``prepare_mask`` output at training size), and the :class:`EpochSampler`
orders an epoch so that a worker touches only a few cases at a time:

* cases are shuffled and cut into blocks of ``block_cases`` (by default as many as fit the per-worker cache,
  at least 2); slices are shuffled within each block; blocks follow each other. With a cache big enough for
  the whole split there is one block, i.e. a plain shuffle.
* the order is a pure function of (seed, epoch); ``set_epoch`` selects the epoch (Accelerate calls it,
  and shards the batches across processes with ``BatchSamplerShard``: each process takes every N-th batch).
  The epoch lives in the dataset (in shared memory, so persistent workers see it): Accelerate reaches it
  through ``dataset.set_epoch`` when ``skip_first_batches`` hides the sampler one level deeper.
* ``oversample_foreground=p > 0`` makes a fraction p of the epoch's draws slices with foreground (each such
  slice drawn ``floor``/``ceil`` of its share), the rest slices without; the epoch length stays ``len(dataset)``.

Augmentation randomness: when the transform has ``set_random_seed(seed)`` (albumentations ``Compose`` does),
the dataset calls it before each sample with :func:`sample_seed` of (seed, epoch, index). Augmentations then
do not depend on the number of workers, on sharding or on where a run was resumed.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dlseg.config import option
from dlseg.cache import PREPARED_BYTES_PER_VOXEL, CaseCache
from dlseg.normalize import NormConfig
from dlseg.store import Store, StoreError
from dlseg.workers import before_fork, one_core

MB = 1 << 20

Transform = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]


@dataclass
class DataConfig:
    """Data pipeline settings (the ``data`` section of the training config).

    Memory per process: about ``(train workers + val workers) × cache_mb`` for the case caches (``cache_mb``
    in the main process when ``workers == 0``), plus ``prefetch_factor`` batches per worker in flight
    (``dlseg.memory`` checks the sum against the job's limit and scales the caches down).
    """

    size: int = option("square training size (pixels)", 256)
    context_slices: int = option("2.5D: k neighbours on each side as channels (C = 2k+1); edges replicate", 0)
    batch_size: int = option("training batch size per process", 8)
    val_batch_size: int = option("validation batch size per process", 16)
    workers: int = option("DataLoader workers per process", 2)
    val_workers: int | None = option("validation workers per process, started for each validation (not kept); "
                                     "unset = min(workers, 2)", None)
    prefetch_factor: int = option("batches prefetched per worker", 4)
    pin_memory: bool = option("pin batches in memory (used only when CUDA is available)", True)
    persistent_workers: bool = option("keep workers (and their caches) between epochs", True)
    cache_mb: int = option("per-worker budget for prepared cases (MB)", 1024)
    oversample_foreground: float = option("0 = uniform; p > 0 = fraction of draws from slices with foreground", 0.0)
    train_split: str = option("store split trained on", "train")
    val_split: str = option("store split validated on", "val")
    ct_window: tuple[float, float] = option("CT HU window mapped to [-1, 1]", (-150.0, 250.0))


def norm_config(cfg: DataConfig) -> NormConfig:
    """The normalization settings implied by a data config (saved with the exported model)."""
    return NormConfig(ct_window=(float(cfg.ct_window[0]), float(cfg.ct_window[1])))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample: a pure function of (run seed, epoch, dataset index), 32 bits.

    Python's hash of a tuple of ints is fixed (no hash randomization for ints) and far cheaper than a
    SeedSequence; the transform's generator mixes the seed again.
    """
    return hash((int(seed), int(epoch), int(index))) & 0xFFFFFFFF


@runtime_checkable
class SeededTransform(Protocol):
    """A transform whose randomness can be reset from a seed (e.g. ``albumentations.Compose``)."""

    def set_random_seed(self, seed: int | None) -> None: ...


class SliceDataset(Dataset):
    """Slices of labeled store cases at training size: 2D (C=1) or 2.5D (C=2k+1 neighbouring slices).

    Items: ``image`` float32 (C,S,S), ``mask`` uint8 (S,S), ``case`` (index into ``case_ids``), ``slice``. Masks
    travel as uint8 (the losses and metrics take any integer labels): an eighth of int64's bytes through worker
    shared memory, pinning and the host-to-device copy.
    The index is built from store attributes only; arrays are read lazily through the per-process cache.
    """

    def __init__(self, store_path: str | os.PathLike, case_ids: list[str], cfg: DataConfig,
                 transform: Transform | None = None, seed: int = 0):
        self.store_path = str(store_path)
        self.cfg = cfg
        self.case_ids = list(case_ids)
        self.transform = transform
        self._seeded = isinstance(transform, SeededTransform)
        self.seed = int(seed)
        self.depths, self.index, self.foreground = _slice_index(Store(store_path), self.case_ids)
        self._rows = self.index.tolist()  # per-item (case, z) as Python ints: cheaper than numpy row access
        self.cache = CaseCache(store_path, cfg.size, norm_config(cfg), cfg.cache_mb * MB)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by persistent workers

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for augmentation seeds (shared with worker processes)."""
        self._epoch.fill_(int(epoch))

    def case_bytes(self) -> int:
        """Bytes of the largest prepared case (what the cache must hold per case)."""
        deepest = int(self.depths.max()) if len(self.depths) else 0
        return deepest * self.cfg.size * self.cfg.size * PREPARED_BYTES_PER_VOXEL

    def cases_per_cache(self) -> int:
        """How many of the largest prepared cases fit in one worker's cache budget."""
        return int(self.cache.budget_bytes // max(self.case_bytes(), 1))

    def __getitem__(self, i: int) -> dict[str, Any]:
        c, z = self._rows[i]
        case = self.cache.get(self.case_ids[c])
        image = self._channels(case.image, z)
        mask = case.mask[z]
        if self.transform is not None:
            image, mask = self._augment(image, mask, int(i))
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(np.array(mask, dtype=np.uint8)),   # a copy: never a view of the cache
            "case": c,
            "slice": z,
        }

    def _channels(self, volume: np.ndarray, z: int) -> np.ndarray:
        """(C,S,S) copy of slice z and its k neighbours on each side (edge slices replicate)."""
        k = self.cfg.context_slices
        if k == 0:
            return volume[z:z + 1].copy()
        return volume[np.clip(np.arange(z - k, z + k + 1), 0, volume.shape[0] - 1)]

    def _augment(self, image: np.ndarray, mask: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Apply the transform on (S,S) / (S,S,C) and return (C,S,S) float32 and (S,S) mask."""
        if self._seeded:
            self.transform.set_random_seed(sample_seed(self.seed, self.epoch, i))
        hwc = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
        out_img, out_mask = self.transform(hwc, mask.copy())
        out_img = np.asarray(out_img, dtype=np.float32)
        out_img = out_img[None] if out_img.ndim == 2 else out_img.transpose(2, 0, 1)
        if out_img.shape != image.shape or np.shape(out_mask) != mask.shape:
            raise ValueError(
                f"transform changed the sample shape: image {image.shape}→{out_img.shape}, "
                f"mask {mask.shape}→{np.shape(out_mask)} (augmentations must keep the training size)"
            )
        return np.ascontiguousarray(out_img), np.asarray(out_mask)


def _slice_index(store: Store, case_ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depth per case, (N,2) [case_idx, z] index, foreground per item) from store attributes only."""
    depths, foreground = [], []
    for cid in case_ids:
        info = store.info(cid)
        if not info.labeled:
            raise StoreError(f"{store.path}: case {cid!r} has no mask (training and validation need labels)")
        fg = info.attrs["foreground"]
        if len(fg) != info.shape[0]:
            raise StoreError(f"{store.path}: case {cid!r} has {len(fg)} foreground flags for {info.shape[0]} slices")
        depths.append(int(info.shape[0]))
        foreground.extend(bool(f) for f in fg)
    depths_arr = np.asarray(depths, dtype=np.int64)
    case_idx = np.repeat(np.arange(len(depths_arr), dtype=np.int64), depths_arr)
    z = np.concatenate([np.arange(d, dtype=np.int64) for d in depths]) if depths else np.zeros(0, np.int64)
    return depths_arr, np.stack([case_idx, z], axis=1), np.asarray(foreground, dtype=bool)


class EpochSampler(Sampler[int]):
    """Deterministic, cache-friendly epoch order over a :class:`SliceDataset` (see the module docstring)."""

    def __init__(self, dataset: SliceDataset, seed: int, shuffle: bool = True,
                 oversample_foreground: float = 0.0, block_cases: int | None = None):
        if not 0.0 <= oversample_foreground <= 1.0:
            raise ValueError(f"oversample_foreground must be in [0, 1], got {oversample_foreground}")
        if block_cases is not None and block_cases < 1:
            raise ValueError(f"block_cases must be >= 1, got {block_cases}")
        self.dataset = dataset
        self.seed = int(seed)
        self.shuffle = shuffle
        self.oversample_foreground = float(oversample_foreground)
        self.block_cases = block_cases if block_cases is not None else max(2, dataset.cases_per_cache())
        self.case_of = dataset.index[:, 0]
        self.foreground = np.asarray(dataset.foreground, dtype=bool)
        self._check_oversampling()

    def _check_oversampling(self) -> None:
        """Refuse a foreground fraction the data cannot provide."""
        if self.oversample_foreground == 0:
            return
        n_fg = self._n_foreground_draws()
        if n_fg > 0 and not self.foreground.any():
            raise ValueError(f"oversample_foreground={self.oversample_foreground}: no slice has foreground")
        if len(self) - n_fg > 0 and self.foreground.all():
            raise ValueError(f"oversample_foreground={self.oversample_foreground}: every slice has foreground")

    def _n_foreground_draws(self) -> int:
        return int(round(self.oversample_foreground * len(self))) if self.oversample_foreground > 0 else 0

    @property
    def epoch(self) -> int:
        """The epoch ``__iter__`` yields: the dataset's (one value for order and augmentation seeds)."""
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (Accelerate calls this, or ``dataset.set_epoch`` when it wraps the sampler deeper)."""
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.case_of)

    def __iter__(self):
        return iter(self.order(self.epoch).tolist())

    def order(self, epoch: int) -> np.ndarray:
        """Dataset indices of one epoch, a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, int(epoch)])
        draws = self._draws(rng)
        if not self.shuffle:
            return np.sort(draws)
        n_cases = len(self.dataset.case_ids)
        rank = np.empty(n_cases, dtype=np.int64)
        rank[rng.permutation(n_cases)] = np.arange(n_cases)
        block = rank[self.case_of[draws]] // self.block_cases
        return draws[np.lexsort((rng.random(len(draws)), block))]

    def _draws(self, rng: np.random.Generator) -> np.ndarray:
        """The multiset of indices drawn this epoch (all of them once when not oversampling)."""
        if self.oversample_foreground == 0:
            return np.arange(len(self), dtype=np.int64)
        n_fg = self._n_foreground_draws()
        fg, bg = np.flatnonzero(self.foreground), np.flatnonzero(~self.foreground)
        return np.concatenate([_balanced_draw(rng, fg, n_fg), _balanced_draw(rng, bg, len(self) - n_fg)])


def _balanced_draw(rng: np.random.Generator, items: np.ndarray, k: int) -> np.ndarray:
    """k draws from items: each item floor(k/n) times, plus a random subset for the remainder."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    full, rest = divmod(k, len(items))
    return np.concatenate([np.tile(items, full), rng.choice(items, size=rest, replace=False)]).astype(np.int64)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and random from torch's per-worker seed; one thread per worker."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    one_core()


def val_workers(cfg: DataConfig) -> int:
    """Validation workers per process: few, since each holds its own case cache."""
    return min(cfg.workers, 2) if cfg.val_workers is None else cfg.val_workers


def _loader_kwargs(cfg: DataConfig, workers: int, persistent: bool) -> dict[str, Any]:
    """Worker, prefetch and pinning options shared by both loaders."""
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": bool(cfg.pin_memory and torch.cuda.is_available()),
    }
    if workers > 0:
        before_fork()
        kwargs.update(persistent_workers=persistent, prefetch_factor=cfg.prefetch_factor, worker_init_fn=seed_worker)
    return kwargs


def build_train_loader(store_path: str | os.PathLike, cfg: DataConfig, seed: int,
                       transform: Transform | None = None) -> DataLoader:
    """Shuffled training loader over ``cfg.train_split`` (drop_last; order from seed and epoch)."""
    dataset = SliceDataset(store_path, Store(store_path).split_cases(cfg.train_split), cfg, transform, seed)
    if len(dataset) < cfg.batch_size:
        raise StoreError(
            f"{store_path}: split {cfg.train_split!r} has {len(dataset)} slices, fewer than one batch of "
            f"{cfg.batch_size}"
        )
    sampler = EpochSampler(dataset, seed, oversample_foreground=cfg.oversample_foreground)
    if cfg.workers == 0:
        cv2.setNumThreads(1)  # samples are small: OpenCV's pool would only fight torch's threads
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                      generator=torch.Generator().manual_seed(int(seed)),
                      **_loader_kwargs(cfg, cfg.workers, cfg.persistent_workers))


def build_val_loader(store_path: str | os.PathLike, cfg: DataConfig) -> DataLoader:
    """Sequential validation loader over ``cfg.val_split``: every slice exactly once, case by case."""
    dataset = SliceDataset(store_path, Store(store_path).split_cases(cfg.val_split), cfg)
    return DataLoader(dataset, batch_size=cfg.val_batch_size, shuffle=False, drop_last=False,
                      **_loader_kwargs(cfg, val_workers(cfg), persistent=False))
