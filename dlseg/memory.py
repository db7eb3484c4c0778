"""What the data loaders may hold in memory, checked against what the job may use, before training starts.

Each loader worker keeps its own case cache (``loader.cache_mb``), so a node holds
``ranks × (train workers + val workers) × cache_mb`` of caches, plus the batches in flight in shared memory
(``/dev/shm``: ``prefetch_factor`` batches per worker). The job may use the smallest of: the cgroup limit
(v2 ``memory.max``, v1 ``memory.limit_in_bytes``), Slurm's ``SLURM_MEM_PER_NODE`` / ``SLURM_MEM_PER_CPU``, and
``MemAvailable``. The loaders get at most :data:`LOADER_SHARE` of it (the rest is for the model, the optimizer,
the CUDA context and the page cache): the per-worker caches are scaled down to fit, and a job where even one case
per cache does not fit, or whose ``/dev/shm`` cannot hold the batches in flight, is refused (exit 2) with the
numbers. The scaled caches change how often cases are re-read, never the epoch order (the sampler keeps the
configured ``cache_mb``), so a resumed run trains the same batches on a node with less memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from dlseg.data import DataConfig, SliceDataset, val_workers
from dlseg.errors import UserError

MB = 1 << 20
GB = 1 << 30
LOADER_SHARE = 0.5          # of the job's memory, for the loaders' caches and batches in flight
UNLIMITED = 1 << 60         # cgroup v1 reports "no limit" as a number near 2**63


class MemoryBudgetError(UserError):
    """The loaders cannot fit the job's memory or /dev/shm; one line with the numbers and the fix."""


@dataclass(frozen=True)
class LoaderShape:
    """What one rank's loaders hold: workers (0 = the rank itself loads), per-worker cache, batches in flight."""

    ranks: int                  # training processes on this node
    train_workers: int
    val_workers: int
    cache_bytes: int            # per worker, as configured
    case_bytes: int             # largest prepared case (a cache always holds the case in use)
    train_batch_bytes: int
    val_batch_bytes: int
    prefetch_factor: int

    @property
    def caches_per_rank(self) -> int:
        # a loader without workers keeps its cache in the rank's own process
        return max(self.train_workers, 1) + max(self.val_workers, 1)

    @property
    def shm_bytes(self) -> int:
        """Batches in flight in shared memory on this node (only worker processes pass batches through it)."""
        per_rank = self.prefetch_factor * (self.train_workers * self.train_batch_bytes
                                           + self.val_workers * self.val_batch_bytes)
        return self.ranks * per_rank


@dataclass(frozen=True)
class LoaderBudget:
    """The check's outcome: the per-worker cache to use and the one line that says why."""

    cache_bytes: int
    line: str


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < UNLIMITED else None


def cgroup_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """This process's cgroup memory limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``), None if unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":           # v2 unified hierarchy
            candidates = [root / rel / "memory.max", root / "memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [root / "memory" / rel / "memory.limit_in_bytes", root / "memory" / "memory.limit_in_bytes"]
        else:
            continue
        for candidate in candidates:    # inside a container the job's own cgroup is mounted as the root
            if candidate.exists():
                limit = _read_int(candidate)
                if limit is not None:
                    return limit
                break
    return None


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable`` of the node in bytes."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def slurm_limit(env: Mapping[str, str]) -> int | None:
    """The node's memory under Slurm: ``SLURM_MEM_PER_NODE``, or ``SLURM_MEM_PER_CPU`` × CPUs on the node (MB)."""
    try:
        if env.get("SLURM_MEM_PER_NODE"):
            return int(env["SLURM_MEM_PER_NODE"]) * MB or None    # --mem=0 means "all of the node"
        if env.get("SLURM_MEM_PER_CPU"):
            cpus = int(env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_CPUS_PER_TASK") or 1)
            return int(env["SLURM_MEM_PER_CPU"]) * cpus * MB
    except ValueError:
        return None
    return None


def job_limits(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """Every memory limit that applies to this job, by name (bytes)."""
    env = os.environ if env is None else env
    found = {"cgroup": cgroup_limit(), "Slurm": slurm_limit(env), "MemAvailable": mem_available()}
    return {name: value for name, value in found.items() if value is not None}


def shm_free(path: Path = Path("/dev/shm")) -> int | None:
    """Free bytes in ``/dev/shm`` (None where there is none)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GiB" if n >= GB else f"{n / MB:.0f} MB"


def plan_loader_memory(shape: LoaderShape, limits: dict[str, int], shm: int | None) -> LoaderBudget:
    """Fit the caches into the job's memory (scaled down if needed) or refuse; check /dev/shm for the batches."""
    n_caches = shape.ranks * shape.caches_per_rank
    if shape.shm_bytes and shm is not None and shape.shm_bytes > shm:
        need_mb = -(-shape.shm_bytes // MB)
        raise MemoryBudgetError(
            f"/dev/shm: {shm // MB} MB free, but {shape.ranks} rank(s) × ({shape.train_workers} train + "
            f"{shape.val_workers} val workers) × {shape.prefetch_factor} batches in flight need {need_mb} MB: run "
            f"the container with a larger /dev/shm (docker run --shm-size={max(1, -(-2 * need_mb // 1024))}g) or "
            f"lower --loader.workers / --loader.val_workers / --loader.prefetch_factor")
    wanted = n_caches * shape.cache_bytes + shape.shm_bytes
    what = (f"{shape.ranks} rank(s) × ({max(shape.train_workers, 1)} train + {max(shape.val_workers, 1)} val "
            f"caches) × {shape.cache_bytes // MB} MB + {shape.shm_bytes // MB} MB batches = {_gb(wanted)}")
    if not limits:
        return LoaderBudget(shape.cache_bytes, f"loader memory: {what} (no memory limit found)")
    source, limit = min(limits.items(), key=lambda kv: kv[1])
    allowed = int(LOADER_SHARE * limit)
    if wanted <= allowed:
        return LoaderBudget(shape.cache_bytes, f"loader memory: {what} of {_gb(allowed)} allowed "
                                               f"({LOADER_SHARE:.0%} of {_gb(limit)}, {source})")
    cache = (allowed - shape.shm_bytes) // n_caches
    if cache < shape.case_bytes:
        raise MemoryBudgetError(
            f"loader memory: {what}, but this job may use {_gb(limit)} ({source}; loaders get {LOADER_SHARE:.0%}) "
            f"and even one case per cache ({-(-shape.case_bytes // MB)} MB) needs "
            f"{_gb(n_caches * shape.case_bytes + shape.shm_bytes)}: lower --loader.workers / --loader.val_workers "
            f"or --loader.size, or ask for more memory (e.g. sbatch --mem)")
    return LoaderBudget(cache, f"loader memory: {what} exceeds {_gb(allowed)} ({LOADER_SHARE:.0%} of {_gb(limit)}, "
                               f"{source}): caches scaled to {cache / MB:.1f} MB per worker")


def loader_shape(cfg: DataConfig, datasets: list[SliceDataset], ranks: int) -> LoaderShape:
    """The loaders' memory shape from the data config and the datasets (largest case, sample size)."""
    sample = (2 * cfg.context_slices + 1) * cfg.size * cfg.size * 4 + cfg.size * cfg.size
    return LoaderShape(ranks=ranks, train_workers=cfg.workers, val_workers=val_workers(cfg),
                       cache_bytes=cfg.cache_mb * MB, case_bytes=max(ds.case_bytes() for ds in datasets),
                       train_batch_bytes=cfg.batch_size * sample, val_batch_bytes=cfg.val_batch_size * sample,
                       prefetch_factor=cfg.prefetch_factor)


def fit_loaders(cfg: DataConfig, datasets: list[SliceDataset], env: Mapping[str, str] | None = None) -> LoaderBudget:
    """Check the loaders against the job's memory and /dev/shm; give each dataset's cache the budget it may use."""
    env = os.environ if env is None else env
    shape = loader_shape(cfg, datasets, int(env.get("LOCAL_WORLD_SIZE") or 1))
    budget = plan_loader_memory(shape, job_limits(env), shm_free())
    for ds in datasets:
        ds.cache.budget_bytes = budget.cache_bytes
    return budget
