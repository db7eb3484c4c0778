"""Shared pieces of the benchmark: settings, the cached synthetic cohort, timing, peak memory, machine facts."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import platform
import resource
import shutil
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

from dlseg.config import option
from dlseg.console import console
from dlseg.inference.config import PredictConfig

STAGES = ("loader", "augment", "preprocess", "predict", "train")
MB = 1 << 20


@dataclass
class BenchConfig:
    """What ``python -m dlseg.bench`` measures and at which sizes."""

    size: int = option("training size in pixels (square)", 128)
    base_width: int = option("U-Net width of the first level", 16)
    depth: int = option("U-Net levels", 4)
    batch_size: int = option("training/augmentation batch", 16)
    predict_batch_size: int = option("slices per forward pass in prediction", 0,
                                     default_help="0: the predictor's default for the device")
    device: Literal["cpu", "cuda"] = option("where models run", "cpu", choices=("cpu", "cuda"))
    mixed_precision: Literal["no", "bf16", "fp16"] = option("autocast dtype", "no", choices=("no", "bf16", "fp16"))
    channels_last: bool = option("channels_last memory format", False)
    workers: int = option("trainer DataLoader workers (0: load in the training process)", 0)
    predict_workers: int | None = option("case-loading processes in prediction", None,
                                         default_help="the predictor's default for the device")
    preprocess_workers: int = option("processes of the parallel preprocessing run (0 = one per core, at most 8)", 0)
    augment_on: Literal["cpu", "device"] = option("trainer augmentation side", "cpu", choices=("cpu", "device"))
    quick: bool = option("shorter loops and smaller cohorts (about a minute)", False)
    patients: int = option("synthetic MR patients", 10)
    memory_cases: tuple[int, int] = option("prediction memory: small vs large cohort", (10, 40),
                                           metavar=("SMALL", "LARGE"), default_help="10 40; quick: 2 8")
    slicewise_cases: int = option("cases run through the one-slice-at-a-time prediction baseline", 2)
    train_epochs: int = option("trainer epochs, alternating with as many passes of the bare loop", 2)
    warmup_epochs: int = option("of which untimed on both sides", 0)
    seed: int = option("synthetic cohort and split seed", 0)
    synth_size: tuple[int, int] = option("synthetic in-plane size range (pixels)", (192, 256), metavar=("MIN", "MAX"))
    synth_slices: tuple[int, int] = option("synthetic slices per series", (26, 36), metavar=("MIN", "MAX"))
    store: str | None = option("an existing dlseg store instead of the synthetic cohort", None)
    source: str | None = option("the CHAOS tree --store came from (DICOM baselines, predict, preprocess)", None)
    cache_dir: str = option("where the synthetic cohort is kept", "runs/_bench")
    budget_s: float = option("seconds per measured loop (quick: a quarter)", 3.0)
    isolate: bool = option("run stages in this process (memory not per stage)", True, flag="--no-isolate",
                           const=False)
    threads: int = option("torch/OpenCV threads per process (0 = the libraries' default)", 0)

    def scaled(self, seconds: float) -> float:
        """A time budget shortened in quick mode."""
        return seconds / 4 if self.quick else seconds

    def with_predict_defaults(self) -> "BenchConfig":
        """This config with prediction's batch size and workers as ``dlseg/predict.py`` picks them on the device."""
        pc = PredictConfig(batch_size=self.predict_batch_size, workers=self.predict_workers).for_device(self.device)
        return replace(self, predict_batch_size=pc.batch_size, predict_workers=pc.workers)


class BenchSkip(Exception):
    """A measurement that cannot run here (e.g. no DICOM sources for a given store); the message says why."""


@dataclass
class Timing:
    """Items processed in a measured loop and the seconds it took."""

    items: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, float]:
        return {"items": self.items, "seconds": self.seconds, "rate": self.rate}


@dataclass
class Comparison:
    """One row of the table: ``ours / baseline`` (baseline optionally scaled), with a goal on that ratio."""

    name: str
    ours: str                  # key in StageResult.rates
    baseline: str              # key in StageResult.rates
    meaning: str
    goal_min: float | None = None      # ratio must be >= this
    goal_max: float | None = None      # ratio must be <= this
    baseline_scale: float = 1.0        # e.g. N workers x one-worker rate for parallel efficiency


@dataclass
class StageResult:
    """What a stage measured: rates (one unit), comparisons between them, memory, sizes and notes."""

    stage: str
    unit: str
    rates: dict[str, float] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)          # MB
    memory_checks: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, timing: Timing) -> None:
        """Record a measured loop under ``key``."""
        self.rates[key] = timing.rate
        self.timings[key] = timing.to_dict()

    def compare(self, comparison: Comparison) -> None:
        """Add a comparison when both of its rates were measured."""
        if comparison.ours in self.rates and comparison.baseline in self.rates:
            self.comparisons.append(comparison)

    def to_dict(self) -> dict[str, Any]:
        """JSON form; each comparison carries its ratio and whether the goal is met."""
        rows = []
        for c in self.comparisons:
            ours, base = self.rates[c.ours], self.rates[c.baseline] * c.baseline_scale
            ratio = ours / base if base > 0 else float("nan")
            met = None
            if c.goal_min is not None or c.goal_max is not None:
                met = bool((c.goal_min is None or ratio >= c.goal_min) and (c.goal_max is None or ratio <= c.goal_max))
            rows.append({"name": c.name, "ours": c.ours, "baseline": c.baseline, "ours_rate": ours,
                         "baseline_rate": base, "baseline_scale": c.baseline_scale, "ratio": ratio,
                         "goal_min": c.goal_min, "goal_max": c.goal_max, "met": met, "meaning": c.meaning})
        return {"stage": self.stage, "unit": self.unit, "rates": self.rates, "timings": self.timings,
                "comparisons": rows, "memory_mb": self.memory, "memory_checks": self.memory_checks,
                "details": self.details, "notes": self.notes, "skipped": self.skipped}


def memory_check(name: str, value: float, reference: float, goal_max: float | None, meaning: str) -> dict[str, Any]:
    """A memory ratio ``value / reference`` with an optional upper goal."""
    ratio = value / reference if reference > 0 else float("nan")
    met = None if goal_max is None else bool(ratio <= goal_max)
    return {"name": name, "value_mb": value, "reference_mb": reference, "ratio": ratio, "goal_max": goal_max,
            "met": met, "meaning": meaning}


# ------------------------------------------------------------------------------------------------ timing

def sync(device: str) -> None:
    """Wait for queued accelerator work (no-op on CPU)."""
    if device.startswith("cuda"):
        import torch     # third-party imports stay lazy here: spawned bench workers import this module
        torch.cuda.synchronize()


def measure(fn: Callable[[Any], Any], items: Iterable[Any], budget_s: float, device: str = "cpu",
            min_items: int = 1, count: Callable[[Any], int] = lambda item: 1) -> Timing:
    """Call ``fn`` on items until they run out or ``budget_s`` has passed (after ``min_items``); items/s.

    ``count(item)`` says how many units one item is (e.g. the slices of a batch).
    """
    n = 0
    sync(device)
    start = time.perf_counter()
    for item in items:
        fn(item)
        n += count(item)
        if n >= min_items and time.perf_counter() - start > budget_s:
            break
    sync(device)
    return Timing(n, time.perf_counter() - start)


@dataclass
class Contender:
    """One side of an interleaved measurement: ``fn`` over an endless ``items`` iterator, in ``context``."""

    fn: Callable[[Any], Any]
    items: Iterator[Any]
    count: Callable[[Any], int] = lambda item: 1
    context: Callable[[], Any] | None = None      # e.g. a thread-count setting held for this side's turn


def interleaved(contenders: dict[str, Contender], budget_s: float, rounds: int = 6,
                device: str = "cpu") -> dict[str, Timing]:
    """Time each contender for ``budget_s`` in all, in ``rounds`` alternating turns (order reversed every round).

    On a machine whose load drifts (shared cores, a neighbour's job), timing A then B charges the drift to one
    side; taking turns spreads it over both, so the ratio is steadier than either rate.
    """
    totals = {name: Timing(0, 0.0) for name in contenders}
    names = list(contenders)
    for r in range(max(1, rounds)):
        for name in (names if r % 2 == 0 else names[::-1]):
            c = contenders[name]
            with c.context() if c.context is not None else nullcontext():
                t = measure(c.fn, c.items, budget_s / max(1, rounds), device=device, count=c.count)
            totals[name] = Timing(totals[name].items + t.items, totals[name].seconds + t.seconds)
    return totals


def timed(fn: Callable[[], int]) -> Timing:
    """Run ``fn`` once; it returns the number of items it processed."""
    start = time.perf_counter()
    n = fn()
    return Timing(int(n), time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ memory

def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its largest finished child (workers), in MB."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mb": self_kb / 1024.0, "children_peak_rss_mb": child_kb / 1024.0}


@contextmanager
def quiet_console() -> Iterator[None]:
    """Silence dlseg's console (progress bars, per-epoch tables) while a stage runs; restore it afterwards."""
    before = console.quiet
    console.quiet = True
    try:
        yield
    finally:
        console.quiet = before


def set_threads(threads: int) -> None:
    """Intra-op threads of torch and OpenCV in this process (0 leaves the libraries' defaults)."""
    if threads > 0:
        import cv2
        import torch
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)


def _child_entry(queue, fn: Callable[..., Any], args: tuple, env: dict[str, str], threads: int) -> None:
    """Spawned process body: run ``fn`` and send (ok, result or error line, peak memory) back."""
    os.environ.update(env)
    set_threads(threads)
    try:
        result = fn(*args)
        queue.put((True, result, peak_rss_mb()))
    except BenchSkip as e:
        queue.put((False, f"skip: {e}", peak_rss_mb()))
    except BaseException as e:  # report, never hang the parent
        last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        where = f" ({Path(last.filename).name}:{last.lineno})" if last else ""
        queue.put((False, f"{type(e).__name__}: {e}{where}", peak_rss_mb()))


def isolated(fn: Callable[..., Any], *args: Any, isolate: bool = True, env: dict[str, str] | None = None,
             threads: int = 0, timeout_s: float = 1800.0) -> tuple[Any, dict[str, float]]:
    """Run ``fn(*args)`` in a fresh spawned process; (its result, its peak memory). In-process when not isolating.

    A fresh process makes ``ru_maxrss`` the peak of that run alone; its DataLoader/pool workers show up as
    ``children_peak_rss_mb`` (the largest one). Raises BenchSkip / RuntimeError with the child's one-line reason.
    """
    if not isolate:
        return fn(*args), peak_rss_mb()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_entry, args=(queue, fn, args, dict(env or {}), threads))
    proc.start()
    try:
        ok, payload, memory = queue.get(timeout=timeout_s)
    except Exception:
        proc.kill()
        proc.join()
        raise RuntimeError(f"{getattr(fn, '__name__', fn)}: no result (process exit {proc.exitcode})") from None
    proc.join()
    if not ok:
        if payload.startswith("skip: "):
            raise BenchSkip(payload[6:])
        raise RuntimeError(payload)
    return payload, memory


def run_stage(name: str, cfg: BenchConfig, cohort: Cohort) -> dict[str, Any]:
    """Run one stage in this process and return its JSON form (with the load average around it)."""
    set_threads(cfg.threads)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    module = importlib.import_module(f"dlseg.benchmarks.{name}")
    with quiet_console():
        result = module.run(cfg, cohort).to_dict()
    result["wall_s"] = time.perf_counter() - start
    result["load_average_1min"] = [load_before, os.getloadavg()[0]]
    return result


# ------------------------------------------------------------------------------------------------ machine

def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    import albumentations
    import cv2
    import numpy
    import pydicom
    import torch
    import zarr

    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "numpy": numpy.__version__, "zarr": zarr.__version__, "pydicom": pydicom.__version__,
        "albumentations": albumentations.__version__, "opencv": cv2.__version__, "device": device,
        "load_average_1min": os.getloadavg()[0],
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["device_count"] = torch.cuda.device_count()
    else:
        info["device_name"] = f"CPU ({info['cpu']})"
    return info


# ------------------------------------------------------------------------------------------------ cohort

@dataclass(frozen=True)
class Cohort:
    """The data the stages use: a CHAOS tree (None when only a store was given) and its T1-in store."""

    chaos: Path | None
    store: Path
    root: Path                 # folder for derived trees and scratch output


def replicated_tree(chaos: Path, n_cases: int, out: Path) -> Path:
    """A CHAOS tree of ``n_cases`` MR patients made of symlinks to the cohort's patients, repeated as needed."""
    patients = sorted((p for p in (chaos / "Train_Sets" / "MR").iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: int(p.name) if p.name.isdigit() else 0)
    if not patients:
        raise BenchSkip(f"{chaos}: no MR patients to replicate")
    target = out / "Train_Sets" / "MR"
    if target.is_dir() and len(list(target.iterdir())) == n_cases:
        return out
    shutil.rmtree(out, ignore_errors=True)
    target.mkdir(parents=True)
    for i in range(n_cases):
        os.symlink(patients[i % len(patients)].resolve(), target / str(1001 + i), target_is_directory=True)
    return out
