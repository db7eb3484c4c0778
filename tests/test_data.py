"""dlseg.data: items equal the shared normalization path, 2.5D edges, the cache budget, the epoch sampler
(determinism, blocks, oversampling, Accelerate sharding) and loaders that agree across worker counts."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import zarr
from accelerate.data_loader import BatchSamplerShard, prepare_data_loader, skip_first_batches

from dlseg.data import (
    CaseCache, DataConfig, EpochSampler, SliceDataset, build_train_loader, build_val_loader, norm_config,
    sample_seed,
)
from dlseg.normalize import STATS_MAX_VOXELS, NormConfig, intensity_stats, normalize, prepare_mask, prepare_volume
from dlseg.store import CaseData, Store, StoreError, StoreWriter, chunk_slices
from helpers import write_store

SIZE = 32
# (case id, modality, (Z, H, W)); non-square slices exercise the padding in prepare_volume
CASES = [
    ("MR-1-T1in", "MR", (7, 40, 48)),
    ("MR-2-T1in", "MR", (9, 44, 36)),
    ("MR-3-T1in", "MR", (6, 40, 40)),
    ("CT-4", "CT", (8, 48, 40)),
    ("MR-5-T1in", "MR", (5, 36, 44)),
    ("MR-6-T1in", "MR", (10, 40, 44)),
]
TRAIN = ["MR-1-T1in", "MR-2-T1in", "MR-3-T1in", "CT-4"]
VAL = ["MR-5-T1in", "MR-6-T1in"]


def _case(cid: str, modality: str, shape: tuple[int, int, int], rng: np.random.Generator) -> CaseData:
    """Random volume with a blob of 'liver' on the middle slices (first and last slices empty)."""
    z, h, w = shape
    if modality == "CT":
        image = rng.integers(-1000, 400, size=shape).astype(np.int16)
    else:
        image = rng.gamma(2.0, 150.0, size=shape).astype(np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for k in range(1, z - 2):
        r = 4 + k
        mask[k][(yy - h // 2) ** 2 + (xx - w // 3) ** 2 < r * r] = 1
    attrs = {"patient": cid.split("-")[1], "modality": modality, "sequence": "ct" if modality == "CT" else "t1-in",
             "group": "train", "spacing": [1.0, 1.0, 1.0], "stats": intensity_stats(image, modality),
             "fingerprint": cid}
    return CaseData(cid, image, mask, attrs)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A small store written with StoreWriter: 4 train + 2 val labeled cases (MR and CT), 1 unlabeled."""
    rng = np.random.default_rng(0)
    cases = [_case(cid, modality, shape, rng) for cid, modality, shape in CASES]
    unlabeled = _case("MR-test-7-T1in", "MR", (4, 32, 32), rng)
    cases.append(CaseData(unlabeled.case_id, unlabeled.image, None, unlabeled.attrs))
    return write_store(tmp_path_factory.mktemp("data") / "tiny.zarr", cases,
                       {"train": TRAIN, "val": VAL, "unlabeled": ["MR-test-7-T1in"], "seed": 0, "method": "fixed"},
                       {"1": "liver"})


def _cfg(**kw) -> DataConfig:
    base = dict(size=SIZE, workers=0, batch_size=4, val_batch_size=5, cache_mb=64)
    base.update(kw)
    return DataConfig(**base)


def _expected(store_path: Path, case_id: str, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The prepared case straight from the shared normalization functions."""
    store = Store(store_path)
    attrs = store.info(case_id).attrs
    image, mask = store.read_case(case_id)
    vol, mapping = prepare_volume(image, attrs["stats"], attrs["modality"], cfg.size, norm_config(cfg))
    return vol, prepare_mask(mask, mapping)


class CountingStore(Store):
    """A Store that counts whole-case reads (each is one zarr call per array)."""

    reads = 0

    def read_case(self, case_id, mask=True):
        CountingStore.reads += 1
        return super().read_case(case_id, mask)


class RandomFlipNoise:
    """A seeded random transform (flip + noise) with albumentations' ``set_random_seed`` hook."""

    def __init__(self):
        self.rng = np.random.default_rng()

    def set_random_seed(self, seed):
        self.rng = np.random.default_rng(seed)

    def __call__(self, image, mask):
        if self.rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return image + self.rng.normal(0, 0.1, size=image.shape).astype(np.float32), mask


# ---- items ----

def test_items_equal_prepared_case(tiny_store):
    cfg = _cfg()
    ds = SliceDataset(tiny_store, TRAIN, cfg)
    assert len(ds) == sum(s[0] for c, _, s in CASES if c in TRAIN)
    for c, cid in enumerate(TRAIN):
        vol, mask = _expected(tiny_store, cid, cfg)
        for i in np.flatnonzero(ds.index[:, 0] == c):
            item = ds[int(i)]
            z = int(ds.index[i, 1])
            assert item["case"] == c and item["slice"] == z
            assert item["image"].dtype == torch.float32 and item["image"].shape == (1, SIZE, SIZE)
            assert item["mask"].dtype == torch.uint8 and item["mask"].shape == (SIZE, SIZE)
            np.testing.assert_array_equal(item["image"][0].numpy(), vol[z])
            np.testing.assert_array_equal(item["mask"].numpy(), mask[z])


def test_ct_window_comes_from_config(tiny_store):
    cfg = _cfg(ct_window=(-100.0, 200.0))
    ds = SliceDataset(tiny_store, ["CT-4"], cfg)
    vol, _ = _expected(tiny_store, "CT-4", cfg)
    np.testing.assert_array_equal(ds[3]["image"][0].numpy(), vol[3])
    assert vol.min() == -1.0 and vol.max() == 1.0


def test_context_slices_replicate_edges(tiny_store):
    cfg = _cfg(context_slices=2)
    ds = SliceDataset(tiny_store, ["MR-3-T1in"], cfg)
    vol, _ = _expected(tiny_store, "MR-3-T1in", cfg)
    depth = vol.shape[0]
    for z in range(depth):
        image = ds[z]["image"].numpy()
        assert image.shape == (5, SIZE, SIZE)
        for j, dz in enumerate(range(-2, 3)):
            np.testing.assert_array_equal(image[j], vol[min(max(z + dz, 0), depth - 1)])
    np.testing.assert_array_equal(ds[0]["image"][0].numpy(), vol[0])  # z-2 → 0
    np.testing.assert_array_equal(ds[depth - 1]["image"][4].numpy(), vol[depth - 1])


def test_index_from_attributes_without_reads(tiny_store):
    ds = SliceDataset(tiny_store, TRAIN, _cfg())
    assert ds.cache.reads == 0 and ds.cache.nbytes == 0
    store = Store(tiny_store)
    assert ds.index.shape == (len(ds), 2)
    for c, cid in enumerate(TRAIN):
        attrs = store.info(cid).attrs
        rows = ds.index[ds.index[:, 0] == c]
        np.testing.assert_array_equal(rows[:, 1], np.arange(attrs["shape"][0]))
        np.testing.assert_array_equal(ds.foreground[ds.index[:, 0] == c], attrs["foreground"])
    assert 0 < ds.foreground.mean() < 1


def test_unlabeled_case_is_refused(tiny_store):
    with pytest.raises(StoreError, match="MR-test-7-T1in.*no mask"):
        SliceDataset(tiny_store, ["MR-test-7-T1in"], _cfg())


def test_damaged_case_names_itself(tiny_store, tmp_path):
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(tiny_store, copy)
    shard = copy / "MR-2-T1in" / "image" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:100])
    ds = SliceDataset(copy, TRAIN, _cfg())
    ds[0]  # other cases still read
    with pytest.raises(StoreError, match=r"case 'MR-2-T1in' is unreadable"):
        ds[int(np.flatnonzero(ds.index[:, 0] == 1)[0])]


def test_transform_sees_hwc_and_must_keep_size(tiny_store):
    seen = []

    def record(image, mask):
        seen.append((image.shape, mask.shape, image.dtype, mask.dtype))
        return image[::-1], mask[::-1]

    ds = SliceDataset(tiny_store, ["MR-1-T1in"], _cfg(context_slices=1), transform=record)
    plain = SliceDataset(tiny_store, ["MR-1-T1in"], _cfg(context_slices=1))
    item, ref = ds[2], plain[2]
    assert seen == [((SIZE, SIZE, 3), (SIZE, SIZE), np.float32, np.uint8)]
    np.testing.assert_array_equal(item["image"].numpy(), ref["image"].numpy()[:, ::-1])
    np.testing.assert_array_equal(item["mask"].numpy(), ref["mask"].numpy()[::-1])
    SliceDataset(tiny_store, ["MR-1-T1in"], _cfg(), transform=record)[0]
    assert seen[-1][0] == (SIZE, SIZE)

    crop = SliceDataset(tiny_store, ["MR-1-T1in"], _cfg(), transform=lambda im, m: (im[1:], m[1:]))
    with pytest.raises(ValueError, match="training size"):
        crop[0]


def test_transform_cannot_corrupt_the_cache(tiny_store):
    def scribble(image, mask):
        image[...] = 7.0
        mask[...] = 9
        return image, mask

    ds = SliceDataset(tiny_store, ["MR-1-T1in"], _cfg(), transform=scribble)
    ds[1]
    case = ds.cache.get("MR-1-T1in")
    vol, mask = _expected(tiny_store, "MR-1-T1in", _cfg())
    np.testing.assert_array_equal(case.image, vol)
    np.testing.assert_array_equal(case.mask, mask)


def test_items_are_copies_not_views_of_the_cache(tiny_store):
    ds = SliceDataset(tiny_store, ["MR-1-T1in"], _cfg())
    item = ds[2]
    item["image"][...] = 7.0          # a training step may write into its batch (in-place augmentation)
    item["mask"][...] = 9
    vol, mask = _expected(tiny_store, "MR-1-T1in", _cfg())
    np.testing.assert_array_equal(ds.cache.get("MR-1-T1in").image, vol)
    np.testing.assert_array_equal(ds.cache.get("MR-1-T1in").mask, mask)
    again = ds[2]
    assert again["mask"].dtype == torch.uint8 and np.array_equal(again["mask"].numpy(), mask[2])


def test_seeded_transform_follows_seed_epoch_index(tiny_store):
    ds = SliceDataset(tiny_store, TRAIN, _cfg(), transform=RandomFlipNoise(), seed=3)
    a, b = ds[5]["image"], ds[5]["image"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ds.set_epoch(1)
    assert not torch.equal(ds[5]["image"], a)
    assert sample_seed(3, 0, 5) != sample_seed(3, 1, 5) != sample_seed(4, 1, 5)


def test_sample_seed_does_not_depend_on_the_interpreters_hash_seed():
    code = "print(hash((3, 1, 5)) & 0xFFFFFFFF)"
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert int(out.stdout) == sample_seed(3, 1, 5)


def test_albumentations_compose_is_seeded_per_sample(tiny_store):
    class Flips:
        def __init__(self):
            self.compose = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])

        def set_random_seed(self, seed):  # one generator pair shared by all children
            self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

        def __call__(self, image, mask):
            out = self.compose(image=image, mask=mask)
            return out["image"], out["mask"]

    ds = SliceDataset(tiny_store, ["MR-2-T1in"], _cfg(), transform=Flips())
    first = [ds[i]["mask"] for i in range(len(ds))]
    again = [ds[i]["mask"] for i in range(len(ds))]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    ds.set_epoch(1)
    later = [ds[i]["mask"] for i in range(len(ds))]
    assert not all(torch.equal(x, y) for x, y in zip(first, later))


def test_dataset_pickles_without_cache_or_store(tiny_store):
    ds = SliceDataset(tiny_store, TRAIN, _cfg())
    ds[0]
    assert ds.cache.nbytes > 0 and ds.cache._store is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.cache.nbytes == 0 and clone.cache._store is None and clone.cache.reads == 0
    torch.testing.assert_close(clone[0]["image"], ds[0]["image"], rtol=0, atol=0)


# ---- cache ----

def test_cache_respects_budget_and_serves_repeats_from_memory(tiny_store):
    cfg = _cfg()
    one_case = 10 * SIZE * SIZE * 5  # the deepest case (MR-6: 10 slices) image float32 + mask uint8
    cache = CaseCache(tiny_store, SIZE, norm_config(cfg), budget_bytes=int(2.5 * one_case), opener=CountingStore)
    CountingStore.reads = 0
    for cid in ["MR-1-T1in", "MR-2-T1in", "MR-1-T1in", "MR-1-T1in", "MR-2-T1in"]:
        cache.get(cid)
    assert CountingStore.reads == 2 and cache.reads == 2 and cache.hits == 3
    cache.get("MR-6-T1in")  # 7+9+10 slices do not fit 25 slices' worth: evicts the LRU (MR-1)
    assert CountingStore.reads == 3 and cache.nbytes <= cache.budget_bytes
    assert cache.nbytes == sum(cache.get(c).nbytes for c in ["MR-2-T1in", "MR-6-T1in"])   # both kept: hits
    assert CountingStore.reads == 3 and cache.hits == 5
    cache.get("MR-1-T1in")                                  # evicted: read again
    assert CountingStore.reads == 4 and cache.nbytes <= cache.budget_bytes


def test_cache_smaller_than_one_case_still_serves_it(tiny_store):
    cache = CaseCache(tiny_store, SIZE, norm_config(_cfg()), budget_bytes=1, opener=CountingStore)
    CountingStore.reads = 0
    cache.get("MR-1-T1in"), cache.get("MR-1-T1in"), cache.get("MR-2-T1in")
    assert CountingStore.reads == 2 and cache.nbytes == cache.get("MR-2-T1in").nbytes   # MR-2 alone


# ---- sampler ----

def test_sampler_order_is_deterministic_and_a_permutation(tiny_store):
    ds = SliceDataset(tiny_store, TRAIN, _cfg())
    s1, s2 = EpochSampler(ds, seed=7), EpochSampler(ds, seed=7)
    s1.set_epoch(2), s2.set_epoch(2)
    a = list(s1)
    assert a == list(s2) and len(a) == len(s1) == len(ds)
    assert sorted(a) == list(range(len(ds)))
    s2.set_epoch(3)
    assert list(s2) != a
    other = EpochSampler(ds, seed=8)
    other.set_epoch(2)
    assert list(other) != a
    assert list(EpochSampler(ds, seed=7, shuffle=False)) == list(range(len(ds)))


def test_sampler_blocks_bound_the_cases_in_flight(tiny_store):
    ds = SliceDataset(tiny_store, TRAIN, _cfg())
    sampler = EpochSampler(ds, seed=1, block_cases=2)
    for epoch in range(3):
        order = sampler.order(epoch)
        cases = ds.index[order, 0]
        assert set(cases.tolist()) == set(range(len(TRAIN)))
        assert max(_live_cases(cases)) == 2  # cases between their first and last use, at any position
    whole = EpochSampler(ds, seed=1, block_cases=len(TRAIN)).order(0)
    assert max(_live_cases(ds.index[whole, 0])) > 2  # one block: a plain shuffle
    # an LRU that holds two cases reads each case exactly once per epoch in this order
    cache = CaseCache(tiny_store, SIZE, norm_config(_cfg()), budget_bytes=2 * ds.case_bytes())
    ds.cache = cache
    for i in sampler.order(4):
        ds[int(i)]
    assert cache.reads == len(TRAIN)


def _live_cases(cases: np.ndarray) -> list[int]:
    """For each position, how many cases have been started and are not finished yet."""
    first = {c: int(np.argmax(cases == c)) for c in set(cases.tolist())}
    last = {c: len(cases) - 1 - int(np.argmax(cases[::-1] == c)) for c in first}
    return [sum(first[c] <= t <= last[c] for c in first) for t in range(len(cases))]


def test_sampler_default_block_follows_cache(tiny_store):
    big = SliceDataset(tiny_store, TRAIN, _cfg(cache_mb=64))
    assert big.cases_per_cache() >= len(TRAIN)
    assert EpochSampler(big, seed=0).block_cases == big.cases_per_cache()
    small = SliceDataset(tiny_store, TRAIN, _cfg(cache_mb=0))
    assert EpochSampler(small, seed=0).block_cases == 2


def test_oversampling_reaches_configured_fraction(tiny_store):
    ds = SliceDataset(tiny_store, TRAIN, _cfg())
    natural = ds.foreground.mean()
    p = 0.85
    assert natural < p - 0.1
    sampler = EpochSampler(ds, seed=0, oversample_foreground=p)
    order = sampler.order(0)
    assert len(order) == len(ds)
    assert abs(ds.foreground[order].mean() - p) <= 1.0 / len(ds)
    counts = np.bincount(order[ds.foreground[order]], minlength=len(ds))[ds.foreground]
    assert counts.max() - counts.min() <= 1  # each foreground slice drawn floor or ceil of its share
    assert not np.array_equal(sampler.order(1), order)


def test_oversampling_refuses_what_the_data_cannot_give(tiny_store):
    ds = SliceDataset(tiny_store, ["MR-1-T1in"], _cfg())
    ds.foreground = np.zeros_like(ds.foreground)
    with pytest.raises(ValueError, match="no slice has foreground"):
        EpochSampler(ds, 0, oversample_foreground=0.5)
    ds.foreground = np.ones_like(ds.foreground)
    with pytest.raises(ValueError, match="every slice has foreground"):
        EpochSampler(ds, 0, oversample_foreground=0.5)
    assert len(EpochSampler(ds, 0, oversample_foreground=1.0).order(0)) == len(ds)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        EpochSampler(ds, 0, oversample_foreground=1.5)


def test_accelerate_shards_are_disjoint_and_cover_each_epoch(tiny_store):
    cfg = _cfg(batch_size=3)
    loader = build_train_loader(tiny_store, cfg, seed=5)
    ds, sampler = loader.dataset, loader.sampler
    n_batches = len(ds) // cfg.batch_size
    n_used = (n_batches // 2) * 2 * cfg.batch_size  # drop_last: whole rounds of 2 batches
    shards = [prepare_data_loader(loader, num_processes=2, process_index=r, put_on_device=False) for r in range(2)]
    for epoch in range(2):
        got = []
        for shard in shards:
            items = []
            for batch in shard:  # DataLoaderShard calls set_epoch(iteration) on our sampler
                items += [int(k) for k in _item_ids(ds, batch)]
            got.append(items)
        assert not set(got[0]) & set(got[1])
        expected = sampler.order(epoch)[:n_used]
        assert sorted(got[0] + got[1]) == sorted(expected.tolist())
        assert got[0] == [i for b in range(0, n_used // cfg.batch_size, 2)
                          for i in expected[b * 3:(b + 1) * 3].tolist()]
    assert sampler.epoch == 1
    # resuming mid-epoch: skip_first_batches still selects the epoch (through dataset.set_epoch)
    sampler.set_epoch(5)
    skipped = skip_first_batches(shards[0], 1)
    skipped.set_epoch(1)
    resumed = [int(k) for batch in skipped for k in _item_ids(ds, batch)]
    assert resumed == got[0][cfg.batch_size:]
    shard_sampler = BatchSamplerShard(shards[0].batch_sampler.batch_sampler, num_processes=2, process_index=1)
    assert len(shard_sampler) == n_batches // 2


def _item_ids(ds: SliceDataset, batch) -> np.ndarray:
    """Dataset indices of a batch, from its (case, slice) fields."""
    lookup = {(int(c), int(z)): i for i, (c, z) in enumerate(ds.index)}
    return np.array([lookup[(int(c), int(z))] for c, z in zip(batch["case"], batch["slice"])])


# ---- loaders ----

def test_train_loaders_with_0_and_2_workers_agree(tiny_store):
    runs = []
    for workers in (0, 2):
        loader = build_train_loader(tiny_store, _cfg(workers=workers, context_slices=1, prefetch_factor=2),
                                    seed=11, transform=RandomFlipNoise())
        epochs = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            epochs.append([(b["image"].clone(), b["mask"].clone(), b["case"].clone(), b["slice"].clone())
                           for b in loader])
        runs.append(epochs)
        assert loader.drop_last and (loader.num_workers > 0) == loader.persistent_workers
        assert not loader.pin_memory or torch.cuda.is_available()
    for e0, e2 in zip(*runs):
        assert len(e0) == len(e2) == len(SliceDataset(tiny_store, TRAIN, _cfg())) // 4
        for b0, b2 in zip(e0, e2):
            for x, y in zip(b0, b2):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])  # epochs differ


@pytest.mark.parametrize("workers", [0, 2])
def test_val_loader_yields_every_slice_once_in_order(tiny_store, workers):
    cfg = _cfg(workers=workers)
    loader = build_val_loader(tiny_store, cfg)
    pairs = [(int(c), int(z)) for b in loader for c, z in zip(b["case"], b["slice"])]
    ds = loader.dataset
    assert ds.case_ids == VAL
    assert pairs == [tuple(r) for r in ds.index.tolist()]
    assert len(loader) == -(-len(ds) // cfg.val_batch_size)
    vol, mask = _expected(tiny_store, VAL[1], cfg)
    last = list(loader)[-1]
    np.testing.assert_array_equal(last["image"][-1, 0].numpy(), vol[-1])
    np.testing.assert_array_equal(last["mask"][-1].numpy(), mask[-1])


def test_train_loader_refuses_a_split_smaller_than_a_batch(tiny_store):
    with pytest.raises(StoreError, match="fewer than one batch"):
        build_train_loader(tiny_store, _cfg(batch_size=1000), seed=0)
    with pytest.raises(StoreError, match="no split named 'nope'"):
        build_train_loader(tiny_store, _cfg(train_split="nope"), seed=0)


def test_items_match_on_the_synthetic_store(request):
    store_path = request.getfixturevalue("synthetic_store")
    cfg = _cfg(context_slices=1)
    store = Store(store_path)
    cid = store.split_cases("train")[0]
    ds = SliceDataset(store_path, [cid], cfg)
    vol, mask = _expected(store_path, cid, cfg)
    for z in range(len(ds)):
        item = ds[z]
        np.testing.assert_array_equal(item["image"][1].numpy(), vol[z])
        np.testing.assert_array_equal(item["mask"].numpy(), mask[z])


def global_rng_noise(image, mask):
    """A transform on numpy's global RNG (no seeding hook): relies on the loader's worker seeding."""
    return np.full_like(image, np.random.random()), mask


def test_workers_seed_global_rngs_from_the_loader_seed(tiny_store):
    def draws(seed):
        loader = build_train_loader(tiny_store, _cfg(workers=2, persistent_workers=False, prefetch_factor=1),
                                    seed=seed, transform=global_rng_noise)
        return [float(b["image"][0, 0, 0, 0]) for b in loader][:2]  # batch 0 from worker 0, batch 1 from worker 1

    a = draws(3)
    assert a == draws(3)
    assert a[0] != a[1] and a != draws(4)


def test_store_chunks_blocks_of_whole_slices_in_one_file(tmp_path):
    assert chunk_slices((100, 512, 512), 2) == 8             # 4 MB of 512x512 int16
    assert chunk_slices((30, 256, 256), 2) == 30             # a whole MR case fits one block
    assert chunk_slices((5, 4096, 4096), 4) == 1             # never less than a slice
    case = _case("CT-9", "CT", (20, 512, 512), np.random.default_rng(1))
    StoreWriter(tmp_path / "s.zarr").write_case(case)
    folder = tmp_path / "s.zarr" / "CT-9"
    image = zarr.open_array(folder / "image", mode="r")
    mask = zarr.open_array(folder / "mask", mode="r")
    assert image.chunks == (8, 512, 512) and image.shards == (24, 512, 512)   # 3 blocks of 8 slices, one shard
    assert mask.chunks == (16, 512, 512) and mask.shards == (32, 512, 512)    # uint8: 16 slices per 4 MB
    for arr in ("image", "mask"):
        assert len([p for p in (folder / arr).rglob("*") if p.is_file() and p.name != "zarr.json"]) == 1
    np.testing.assert_array_equal(image[...], case.image)
    np.testing.assert_array_equal(image[7:9], case.image[7:9])                # a slab across two blocks
    np.testing.assert_array_equal(mask[...], case.mask)


def _stats_reference(image: np.ndarray, modality: str) -> list[float]:
    """intensity_stats spelled out with np.percentile on every (strided) voxel: the definition."""
    flat = image.reshape(-1)
    sample = flat[::max(1, int(np.ceil(flat.size / STATS_MAX_VOXELS)))].astype(np.float64)
    thr = -500.0 if modality == "CT" else 0.1 * np.percentile(sample, 99.0)
    body = sample[sample > thr]
    body = body if body.size >= 16 else sample
    p = np.percentile(body, [0.5, 1, 50, 99, 99.5])
    clipped = np.clip(body, p[0], p[4])
    return [*p, clipped.mean(), clipped.std(), body.size / sample.size, image.min(), image.max()]


@pytest.mark.parametrize("dtype, modality, shape, values", [
    (np.int16, "CT", (6, 40, 30), (-1024, 1500)),          # histogram path
    (np.int16, "CT", (4, 20, 20), (-32768, 32767)),         # the whole int16 range (padding at -32768)
    (np.int16, "MR", (5, 33, 31), (0, 900)),
    (np.uint16, "MR", (700, 64, 64), (0, 4000)),            # strided sample (> STATS_MAX_VOXELS voxels)
    (np.int16, "CT", (2, 3, 3), (-1024, -900)),             # no body voxel: the whole sample
    (np.int32, "CT", (4, 20, 20), (-3_000_000, 3_000_000)),  # too many levels for a histogram: numpy path
    (np.float32, "MR", (5, 33, 31), (0, 900)),              # numpy path
])
def test_intensity_stats_match_numpy_percentiles(dtype, modality, shape, values):
    rng = np.random.default_rng(3)
    image = rng.integers(*values, size=shape).astype(dtype)
    image[:, :4] = values[0]                                 # some air
    s = intensity_stats(image, modality)
    got = [s[k] for k in ("p0_5", "p1", "p50", "p99", "p99_5", "mean", "std", "body_fraction", "min", "max")]
    np.testing.assert_allclose(got, _stats_reference(image, modality), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_normalize_is_the_documented_formula_and_leaves_its_input(dtype, modality):
    rng = np.random.default_rng(5)
    image = (rng.integers(-1000, 2000, size=(3, 16, 16))).astype(dtype)
    before = image.copy()
    stats = {"p0_5": -900.5, "p99_5": 1700.25, "mean": 321.125, "std": 400.5}
    got = normalize(image, stats, modality)
    x = image.astype(np.float32)
    if modality == "CT":
        lo, hi = NormConfig().ct_window
        want = (np.clip(x, lo, hi) - np.float32((lo + hi) / 2)) / np.float32((hi - lo) / 2)
    else:
        want = (np.clip(x, np.float32(-900.5), np.float32(1700.25)) - np.float32(321.125)) / np.float32(400.5)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert np.array_equal(image, before)
