"""Preprocess stage: ``python -m preprocess`` slices/s with 1 and N workers vs decoding alone, and memory per worker.

* ``decode_only``: ``dlseg.preprocessing.convert.decode_case`` over every case in one process (read DICOM + PNG, nothing
  written): the work no converter can avoid;
* ``workers_1`` / ``workers_N``: ``dlseg.preprocessing.pipeline.run`` into a fresh store (statistics, compression, atomic
  writes, split), each in its own process so that its peak memory is its own; with N workers the largest
  worker's peak is the per-worker figure (spawned pool processes). The 1-worker run is held to one CPU core and
  the N-worker run to N cores (``sched_setaffinity``), so that parallel efficiency is speed-up per core: a lone
  worker cannot borrow idle cores through its libraries' threads (zarr's codec pool) and flatter the baseline.
* ``workers_*_per_case``: the same, differenced between the large and the small cohort
  (``memory_cases[1]`` and ``[0]`` cases): slices/s once the per-run fixed cost (worker start-up, discovery,
  split, finalize) is taken out; that fixed cost is reported in seconds.
* ``idle worker``: a process that has imported the converter and done nothing: the floor of every worker.

End-to-end rates are measured on the large cohort (the synthetic patients repeated); the N-worker run on the
small one also shows that a worker's peak does not grow with the cohort.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from typing import Iterator

from dlseg.preprocessing import pipeline
from dlseg.preprocessing.convert import decode_case
from dlseg.sources.layout import discover

from .common import (
    MB, BenchConfig, BenchSkip, Cohort, Comparison, StageResult, Timing, isolated, memory_check, replicated_tree,
)


ROUNDS = 2    # each run is repeated this many times, in alternating order; rates are totals over the rounds


def decode_all(chaos: str) -> dict:
    """Decode every T1-in case once in this process; slices, seconds and the largest case's bytes."""
    sources = discover(chaos, "t1-in", "liver")[0]
    start, slices, largest, total = time.perf_counter(), 0, 0, 0
    for src in sources:
        image, mask = decode_case(src, "liver")
        slices += int(image.shape[0])
        nbytes = image.nbytes + (mask.nbytes if mask is not None else 0)
        largest, total = max(largest, nbytes), total + nbytes
    return {"slices": slices, "seconds": time.perf_counter() - start, "cases": len(sources),
            "largest_case_bytes": largest, "cohort_bytes": total}


def usable_cores() -> list[int]:
    """The CPU cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@contextmanager
def held_to(cores: int) -> Iterator[None]:
    """Run the block (and processes it starts) on the first ``cores`` usable cores; restore afterwards."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, usable_cores()[:cores])
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def convert_all(chaos: str, out: str, workers: int) -> dict:
    """``python -m preprocess`` (library call) into a fresh store with ``workers`` processes, on as many cores."""
    shutil.rmtree(out, ignore_errors=True)
    with held_to(workers):
        start = time.perf_counter()
        report = pipeline.run(pipeline.PreprocessConfig(src=chaos, out=out, modality="t1-in", workers=workers), show_progress=False)
        seconds = time.perf_counter() - start
    if report.failures:
        raise RuntimeError(f"{out}: {len(report.failures)} case(s) failed to convert: {report.first_failures()}")
    slices = sum(int(c["slices"]) for c in report.root["cases"].values())
    shutil.rmtree(out, ignore_errors=True)
    return {"slices": slices, "seconds": seconds, "cases": len(report.root["cases"])}


def idle_worker() -> dict:
    """Do nothing in a process that has imported this module, and so the converter: its peak memory is the floor."""
    return {}


def default_workers(cfg: BenchConfig) -> int:
    """N for the parallel run: the configured count, else what ``python -m preprocess`` would use."""
    return cfg.preprocess_workers or max(2, pipeline.default_workers())


def run(cfg: BenchConfig, cohort: Cohort) -> StageResult:
    """Measure decoding alone, conversion with 1 and N workers, and memory per worker."""
    if cohort.chaos is None:
        raise BenchSkip("needs the DICOM sources (--source) of the given store")
    res = StageResult("preprocess", "slices/s")
    scratch = cohort.root / "scratch-preprocess"
    shutil.rmtree(scratch, ignore_errors=True)
    small_n, large_n = cfg.memory_cases
    small = str(replicated_tree(cohort.chaos, small_n, scratch / f"cohort-{small_n}"))
    chaos = str(replicated_tree(cohort.chaos, large_n, scratch / f"cohort-{large_n}"))
    n = default_workers(cfg)
    runs = {"decode": (decode_all, chaos), "w1": (convert_all, chaos, str(scratch / "w1.zarr"), 1),
            "wN": (convert_all, chaos, str(scratch / f"w{n}.zarr"), n),
            "w1_small": (convert_all, small, str(scratch / "w1-small.zarr"), 1),
            "wN_small": (convert_all, small, str(scratch / f"w{n}-small.zarr"), n)}
    rounds = 1 if cfg.quick else ROUNDS
    got, mem, per_round = measure_rounds(cfg, runs, rounds)
    _, mem["idle"] = isolated(idle_worker, isolate=cfg.isolate, threads=cfg.threads)
    shutil.rmtree(scratch, ignore_errors=True)
    fixed = add_rates(res, got, n, cfg.memory_cases, rounds)
    add_memory(res, cfg, got["decode"], mem, n)
    cores = len(usable_cores())
    res.details.update({"cases": got["decode"]["cases"], "slices": got["decode"]["slices"] // rounds,
                        "rounds": rounds, "workers": n, "cores": cores, "seconds_per_round": per_round,
                        **{f"{key}_fixed_s": round(v, 3) for key, v in fixed.items()}})
    if n > cores:
        res.notes.append(f"{n} workers on {cores} cores: the efficiency is capped at {cores / n:.2f}")
    if fixed:
        res.notes.append("fixed cost per run (start-up, discovery, split, finalize): "
                         + ", ".join(f"{k.replace('workers_', '')} worker(s) {v:.2f} s" for k, v in fixed.items()))
    res.notes.append(f"the {large_n}-case cohort repeats the synthetic patients (symlinked folders); each run in a "
                     "fresh process (worker start-up and the final split/finalize included); decoding alone is "
                     "timed inside its process")
    return res


def measure_rounds(cfg: BenchConfig, runs: dict[str, tuple], rounds: int
                   ) -> tuple[dict[str, dict], dict[str, dict], dict[str, list[float]]]:
    """Each run once per round, each in its own process, order reversed every round so that drift weighs on all.

    Returns (slices and seconds summed over rounds, other outputs as last seen; peak memory per run, the largest
    over rounds; each round's seconds per run).
    """
    got: dict[str, dict] = {}
    mem: dict[str, dict] = {}
    per_round: dict[str, list[float]] = {}
    for r in range(rounds):
        for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            fn, *args = runs[key]
            out, peak = isolated(fn, *args, isolate=cfg.isolate, threads=cfg.threads)
            total = got.setdefault(key, {})
            for k, v in out.items():
                total[k] = total.get(k, 0) + v if k in ("slices", "seconds") else v
            per_round.setdefault(key, []).append(round(out["seconds"], 3))
            mem[key] = {k: max(v, mem.get(key, {}).get(k, 0.0)) for k, v in peak.items()}
    return got, mem, per_round


def add_rates(res: StageResult, got: dict[str, dict], n: int, cases: tuple[int, int], rounds: int) -> dict[str, float]:
    """Timings and comparisons of the runs; returns each worker count's fixed cost per run, in seconds."""
    small_n, large_n = cases
    decoded, one, many, one_small, many_small = (got[k] for k in ("decode", "w1", "wN", "w1_small", "wN_small"))
    res.add("decode_only", Timing(decoded["slices"], decoded["seconds"]))
    res.add("workers_1", Timing(one["slices"], one["seconds"]))
    res.add(f"workers_{n}", Timing(many["slices"], many["seconds"]))
    res.compare(Comparison(f"{n} workers vs {n} × 1 worker (parallel efficiency, {large_n} cases)", f"workers_{n}",
                           "workers_1", "speed-up per core, end to end: 1 worker on 1 core, N workers on N cores "
                           "(worker start-up and finalize included)", goal_min=0.8, baseline_scale=n))
    fixed = {}
    for key, big, little in (("workers_1", one, one_small), (f"workers_{n}", many, many_small)):
        extra = Timing(big["slices"] - little["slices"], big["seconds"] - little["seconds"])
        if extra.items > 0 and extra.seconds > 0:
            res.add(f"{key}_per_case", extra)
            fixed[key] = max(little["seconds"] - little["slices"] / extra.rate, 0.0) / rounds
    res.compare(Comparison(f"{n} workers vs {n} × 1 worker, fixed cost taken out", f"workers_{n}_per_case",
                           "workers_1_per_case", f"the same from the {large_n}- minus the {small_n}-case run: "
                           "speed-up per core on a cohort large enough that start-up does not count",
                           baseline_scale=n))
    res.compare(Comparison("1 worker vs decoding alone", "workers_1", "decode_only",
                           "share of the time spent decoding when converting (1.0 = conversion costs nothing more)"))
    res.compare(Comparison(f"{n} workers vs decoding alone (1 process)", f"workers_{n}", "decode_only",
                           "end-to-end conversion speed against decoding the same files once in one process"))
    return fixed


def add_memory(res: StageResult, cfg: BenchConfig, decoded: dict, mem: dict[str, dict], n: int) -> None:
    """Peak memory of every run, and (isolated runs only) the per-worker checks against the decoded data."""
    small_n, large_n = cfg.memory_cases
    case_mb = decoded["largest_case_bytes"] / MB
    worker_peak = mem["wN"]["children_peak_rss_mb"]
    idle = mem["idle"]["peak_rss_mb"]
    res.memory = {"decode_only_peak_rss_mb": mem["decode"]["peak_rss_mb"],
                  "workers_1_peak_rss_mb": mem["w1"]["peak_rss_mb"],
                  f"workers_{n}_main_peak_rss_mb": mem["wN"]["peak_rss_mb"],
                  f"workers_{n}_per_worker_peak_rss_mb": worker_peak,
                  f"workers_{n}_per_worker_peak_rss_mb_{small_n}_cases": mem["wN_small"]["children_peak_rss_mb"],
                  "idle_worker_rss_mb": idle, "largest_case_mb": case_mb}
    if not cfg.isolate:
        return
    res.memory_checks.append(memory_check(
        "per-worker working memory vs the largest decoded case", max(worker_peak - idle, 0.0), case_mb, None,
        "(worker peak − idle worker) ÷ largest case (image + mask as decoded); includes what a worker loads "
        "on first use (pixel handlers, codecs), which dominates for small cases"))
    res.memory_checks.append(memory_check(
        "per-worker working memory vs the whole cohort decoded", max(worker_peak - idle, 0.0),
        decoded["cohort_bytes"] / MB, None, "the same ÷ every case of the cohort decoded at once"))
    res.memory_checks.append(memory_check(
        f"per-worker peak memory, {large_n} vs {small_n} cases", worker_peak, mem["wN_small"]["children_peak_rss_mb"],
        1.10, f"largest worker's peak converting {large_n} cases ÷ converting {small_n}; ≤ 1.10 = does not grow "
              "with the cohort"))
