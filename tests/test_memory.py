"""Loader memory: the budget's numbers, the job's limits (faked), scaled caches, refusals, a small /dev/shm."""

from __future__ import annotations

import pytest

from dlseg import memory
from dlseg.data import DataConfig, build_train_loader, build_val_loader, val_workers
from dlseg.memory import GB, MB, LoaderShape, MemoryBudgetError, fit_loaders, plan_loader_memory
from dlseg.train import main as train_main
from helpers import TINY_RUN

# 8 ranks × (3 train + 2 val workers) × 1 GiB: the 8-GPU, 32-core node of issue 11.
NODE = LoaderShape(ranks=8, train_workers=3, val_workers=2, cache_bytes=1024 * MB, case_bytes=100 * MB,
                   train_batch_bytes=8 * MB, val_batch_bytes=16 * MB, prefetch_factor=4)


def test_budget_numbers():
    assert NODE.caches_per_rank == 5
    assert NODE.shm_bytes == 8 * 4 * (3 * 8 + 2 * 16) * MB                      # 1792 MB of batches in flight
    one = LoaderShape(1, 0, 0, 1024 * MB, 10 * MB, MB, MB, 4)
    assert one.caches_per_rank == 2 and one.shm_bytes == 0                      # no workers: caches in the rank


def test_enough_memory_keeps_the_caches():
    budget = plan_loader_memory(NODE, {"MemAvailable": 200 * GB, "cgroup": 120 * GB}, shm=64 * GB)
    assert budget.cache_bytes == 1024 * MB
    assert budget.line == ("loader memory: 8 rank(s) × (3 train + 2 val caches) × 1024 MB + 1792 MB batches = "
                           "41.8 GiB of 60.0 GiB allowed (50% of 120.0 GiB, cgroup)")


def test_the_smallest_limit_scales_the_caches():
    budget = plan_loader_memory(NODE, {"MemAvailable": 200 * GB, "Slurm": 64 * GB}, shm=64 * GB)
    # (32 GiB allowed − 1792 MB of batches) / 40 caches
    assert budget.cache_bytes == (32 * GB - 1792 * MB) // 40 == int(774.4 * MB)
    assert "exceeds 32.0 GiB (50% of 64.0 GiB, Slurm): caches scaled to 774.4 MB per worker" in budget.line


def test_refused_when_one_case_per_cache_does_not_fit():
    with pytest.raises(MemoryBudgetError) as err:
        plan_loader_memory(NODE, {"cgroup": 8 * GB}, shm=64 * GB)
    assert err.value.exit_status == 2
    assert str(err.value) == (
        "loader memory: 8 rank(s) × (3 train + 2 val caches) × 1024 MB + 1792 MB batches = 41.8 GiB, but this job "
        "may use 8.0 GiB (cgroup; loaders get 50%) and even one case per cache (100 MB) needs 5.7 GiB: lower "
        "--loader.workers / --loader.val_workers or --loader.size, or ask for more memory (e.g. sbatch --mem)")


def test_small_dev_shm_is_refused_with_the_fix():
    with pytest.raises(MemoryBudgetError, match=r"^/dev/shm: 64 MB free, but 8 rank\(s\) × \(3 train \+ 2 val "
                                                r"workers\) × 4 batches in flight need 1792 MB: run the container "
                                                r"with a larger /dev/shm \(docker run --shm-size=4g\)"):
        plan_loader_memory(NODE, {}, shm=64 * MB)


def test_limits_from_cgroups_slurm_and_meminfo(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "job" / "memory.max").write_text("3221225472\n")
    (tmp_path / "cg2").write_text("0::/job\n")
    assert memory.cgroup_limit(tmp_path / "cg2", v2) == 3 * GB
    (v2 / "job" / "memory.max").write_text("max\n")
    assert memory.cgroup_limit(tmp_path / "cg2", v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("2147483648\n")              # the container's own cgroup as root
    (tmp_path / "cg1").write_text("5:cpu:/\n4:memory:/some/job\n")
    assert memory.cgroup_limit(tmp_path / "cg1", tmp_path / "v1") == 2 * GB
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory.cgroup_limit(tmp_path / "cg1", tmp_path / "v1") is None
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:    2048 kB\n")
    assert memory.mem_available(tmp_path / "meminfo") == 2 * MB
    assert memory.slurm_limit({"SLURM_MEM_PER_NODE": "4096"}) == 4 * GB
    assert memory.slurm_limit({"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "8"}) == 8000 * MB
    assert memory.slurm_limit({"SLURM_MEM_PER_NODE": "0"}) is None and memory.slurm_limit({}) is None


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_val_loader_has_few_workers_that_do_not_persist(synthetic_store):
    cfg = DataConfig(size=32, workers=3)
    assert val_workers(cfg) == 2 and val_workers(DataConfig(workers=0)) == 0
    assert val_workers(DataConfig(workers=6, val_workers=1)) == 1
    val = build_val_loader(synthetic_store, cfg)
    train = build_train_loader(synthetic_store, cfg, seed=0)
    assert (val.num_workers, val.persistent_workers) == (2, False)
    assert (train.num_workers, train.persistent_workers) == (3, True)


def test_scaled_caches_keep_the_epoch_order(synthetic_store, monkeypatch):
    cfg = DataConfig(size=32, workers=0, batch_size=4, cache_mb=1)
    train, val = build_train_loader(synthetic_store, cfg, seed=0), build_val_loader(synthetic_store, cfg)
    order = train.sampler.order(0).tolist()
    monkeypatch.setattr(memory, "job_limits", lambda env: {"MemAvailable": 4 * train.dataset.case_bytes()})
    budget = fit_loaders(cfg, [train.dataset, val.dataset], env={"LOCAL_WORLD_SIZE": "1"})
    assert budget.cache_bytes == train.dataset.cache.budget_bytes == val.dataset.cache.budget_bytes
    assert budget.cache_bytes == train.dataset.case_bytes() < MB and "caches scaled to" in budget.line
    assert train.sampler.order(0).tolist() == order


def test_trainer_refuses_before_training(synthetic_store, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "job_limits", lambda env: {"cgroup": 8 * MB})
    out = tmp_path / "run"
    assert train_main(["--data", str(synthetic_store), "--out", str(out), *TINY_RUN, "--epochs", "1",
                       "--loader.workers", "0", "--loader.size", "256"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "loader memory: 1 rank(s) × (1 train + 1 val caches) × 1024 MB + 0 MB batches = 2.0 GiB, but this job " \
           "may use 8 MB (cgroup; loaders get 50%) and even one case per cache (5 MB) needs 9 MB" in err
    assert not (out / "checkpoints").exists()
