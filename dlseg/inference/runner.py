"""Cohort prediction on every process of a launch: plan, packed batches, background writers, summary.

Data flow (one process per device; cases divided across processes)::

    DataLoader workers:  read series (DICOM or store) → intensity_stats → prepare_volume   (one item = one case)
    main thread:         pack slices of consecutive cases into batches → model → probabilities on the training grid
    writer threads:      inverse resize → threshold / argmax → largest component → case folder (outputs.write_case)

Memory is bounded whatever the cohort size: the loader holds ``workers × prefetch`` cases, the batcher at most
the cases one batch spans, and the writers at most ``max_pending_writes`` cases.

``--shard I/N`` keeps ``cases[I::N]`` of the deterministically ordered cohort; tasks share one output folder
(their case folders are disjoint) and each cleans only its own cases' temporaries. Running the same command
without ``--shard`` afterwards reuses every case and writes the cohort's summary.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from datetime import timedelta
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from dlseg.console import console, make_progress
from dlseg.distributed import check_launch
from dlseg.errors import CaseError, ConfigError, StoreError, UsageError
from dlseg.inference import case_flags, dicom_seg, outputs, planning, records, report_html
from dlseg.inference.cohort_select import dry_run, selected_cohort
from dlseg.inference.config import PredictConfig, Shard
from dlseg.inference.ensemble import load_models
from dlseg.inference.inputs import CaseSpec, case_loader, failure_reason
from dlseg.inference.privacy import SourceRefs
from dlseg.inference.predictor import Predictor, context_inputs
from dlseg.inference.records import RunIdentity

WAIT_WARNING = 0.3      # note when the model waits for data (or writers) more than this fraction of the loop


@dataclass
class _Active:
    """A loaded case whose slices are being scheduled into batches."""

    item: dict[str, Any]
    inputs: torch.Tensor                 # (Z, S, S) on the device
    probs: np.ndarray                    # (Z, K, S, S) filled batch by batch
    started: float
    next_z: int = 0
    done_z: int = 0

    @property
    def z(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class LoopStats:
    """Throughput of one process's prediction loop."""

    cases: int = 0
    slices: int = 0
    batches: int = 0
    loop_s: float = 0.0                  # after the first case arrived
    wait_s: float = 0.0                  # blocked on the loader after the first case
    startup_s: float | None = None       # until the first case arrived (worker start + first read)
    write_wait_s: float = 0.0            # blocked because the writers were behind


class CohortRunner:
    """Runs one process's share of a cohort: loader → packed batches → background writers."""

    def __init__(self, predictor: Predictor, cfg: PredictConfig, out: Path, ident: RunIdentity,
                 refs: SourceRefs = SourceRefs()):
        self.predictor, self.cfg, self.out, self.ident, self.refs = predictor, cfg, out, ident, refs
        self.stats = LoopStats()
        self.failures: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _next_case(self, it, t_start: float) -> dict[str, Any] | None:
        """The loader's next item, its wait booked as start-up (the first) or as data wait."""
        t0 = time.perf_counter()
        item = next(it, None)
        if self.stats.startup_s is None:      # worker start-up, not steady-state starvation
            self.stats.startup_s = time.perf_counter() - t_start
        else:
            self.stats.wait_s += time.perf_counter() - t0
        return item

    def _activate(self, item: dict[str, Any]) -> _Active:
        """A loaded case on the device with room for its probabilities."""
        pred = self.predictor
        inputs = item.pop("inputs").to(pred.device, non_blocking=True)
        probs = np.empty((inputs.shape[0], pred.num_classes, pred.size, pred.size), np.float32)
        return _Active(item, inputs, probs, time.perf_counter())

    def run(self, specs: list[CaseSpec], progress=None, task=None) -> LoopStats:
        """Predict and write every case of ``specs``; failures are noted on disk and in ``self.failures``."""
        if not specs:
            return self.stats
        cfg = self.cfg
        active: deque[_Active] = deque()
        pending: set[Future] = set()
        gate = threading.BoundedSemaphore(cfg.max_pending_writes)
        it = iter(case_loader(specs, self.predictor.meta, cfg.overlays, cfg.workers, cfg.prefetch,
                              pin_memory=self.predictor.device.type == "cuda", refs=self.refs,
                              want_preview=cfg.report))
        exhausted = False
        t_start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=cfg.write_threads, thread_name_prefix="dlseg-write") as pool:
            while True:
                while not exhausted and sum(a.z - a.next_z for a in active) < cfg.batch_size:
                    item = self._next_case(it, t_start)
                    if item is None:
                        exhausted = True
                    elif not item["ok"]:
                        self._fail(item["spec"], item["reason"], progress, task)
                    else:
                        active.append(self._activate(item))
                if not active:
                    break
                self._step(active)
                while active and active[0].done_z == active[0].z:
                    a = active.popleft()
                    t0 = time.perf_counter()
                    gate.acquire()                         # back-pressure: at most max_pending_writes queued
                    self.stats.write_wait_s += time.perf_counter() - t0
                    fut = pool.submit(self._write, a)
                    pending.add(fut)
                    fut.add_done_callback(lambda f: (gate.release(), self._advance(f, progress, task)))
                pending = {f for f in pending if not f.done()}
            for f in list(pending):
                f.result()
        self.stats.loop_s = time.perf_counter() - t_start - (self.stats.startup_s or 0.0)
        return self.stats

    def _step(self, active: deque[_Active]) -> None:
        """One packed batch: take the next unscheduled slices of consecutive cases, forward, scatter back."""
        pred, b = self.predictor, self.cfg.batch_size
        segments, n = [], 0
        for a in active:
            take = min(b - n, a.z - a.next_z)
            if take > 0:
                segments.append((a, a.next_z, a.next_z + take))
                a.next_z += take
                n += take
            if n == b:
                break
        x = torch.cat([context_inputs(a.inputs, z0, z1, pred.context) for a, z0, z1 in segments])
        probs = pred.probabilities(x).cpu().numpy()
        off = 0
        for a, z0, z1 in segments:
            a.probs[z0:z1] = probs[off:off + z1 - z0]
            off += z1 - z0
            a.done_z += z1 - z0
        self.stats.batches += 1
        self.stats.slices += n

    def _write(self, a: _Active) -> tuple[str, dict[str, Any]]:
        """Writer thread: post-process and write a case, or note its failure."""
        spec, item, cfg = a.item["spec"], a.item, self.cfg
        try:
            seg_files = (dicom_seg.source_files(spec.kind, spec.root, spec.case_id, spec.files, cfg.source_root)
                         if "dicom-seg" in cfg.formats else None)
            labels = self.predictor.labels_from_probs(a.probs, item["mapping"])
            measures = case_flags.measure(labels, case_flags.mean_foreground_probability(
                a.probs, self.predictor.threshold))
            thumbs = (report_html.thumbnail_strip(item["preview"], labels)
                      if cfg.report and item["preview"] is not None else None)
            case = outputs.CaseOutput(spec.case_id, labels, self.predictor.num_classes, item["sources"],
                                      item["geometry"], item["image"] if cfg.overlays else None, item["truth"],
                                      item["stats"], seg_files, measures, thumbs)
            rec = outputs.write_case(self.out, case, cfg.formats, cfg.overlays, cfg.label_value,
                                     self.ident.provenance(spec.fingerprint, cfg.formats), a.started,
                                     item["load_s"])
            return "ok", rec
        except Exception as e:
            return "failed", outputs.write_failure(self.out, spec.case_id, failure_reason(e), spec.fingerprint)

    def _book(self, rec: dict[str, Any], ok: bool, advance: int, progress, task) -> None:
        """Count a finished case and move the progress bar."""
        with self._lock:
            (self.records if ok else self.failures).append(rec)
            self.stats.cases += 1
            if progress is not None:
                progress.update(task, advance=advance, info=f"{self.stats.cases} cases, {len(self.failures)} failed")

    def _advance(self, fut: Future, progress, task) -> None:
        """Done-callback of a writer."""
        status, rec = fut.result()
        self._book(rec, status == "ok", rec.get("slices") or 0, progress, task)

    def _fail(self, spec: CaseSpec, reason: str, progress, task) -> None:
        """A case the loader could not read."""
        row = outputs.write_failure(self.out, spec.case_id, reason, spec.fingerprint)
        self._book(row, False, spec.slices, progress, task)


def make_plan(cfg: PredictConfig, meta: dict[str, Any], out: Path, ident: RunIdentity) -> dict[str, Any]:
    """Main process: find the cohort (this shard's part), clean its stale temporaries, split into done and to-do."""
    try:
        shard = cfg.shard_part()
        cohort, salt = selected_cohort(cfg, meta, out)
        if "dicom-seg" in cfg.formats:
            dicom_seg.check_input(cohort.kind, cfg.source_root)
    except (ConfigError, UsageError, StoreError, CaseError, OSError) as e:
        return {"error": str(e)}
    cases = cohort.cases if shard is None else shard.select(cohort.cases)
    early = cohort.failures if shard is None else shard.select(cohort.failures)
    skipped = cohort.skipped if shard is None else shard.select(cohort.skipped)
    records.clean_stale(out, [s.case_id for s in cases])
    done = {s.case_id: records.is_done(out, s, ident) for s in cases}
    return {"kind": cohort.kind, "todo": [s for s in cases if done[s.case_id] is None],
            "all": {s.case_id: s.fingerprint for s in cases},
            "reused": [c for c, r in done.items() if r is not None], "early": early, "skipped": skipped,
            "salt": salt, "cohort_total": len(cohort.cases) + len(cohort.failures) + len(cohort.skipped)}


def process_state(timeout_s: float) -> PartialState:
    """Accelerate's process state (MULTI_CPU when ``ACCELERATE_USE_CPU=true``); refuses a silently split launch."""
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timedelta(seconds=timeout_s))
    check_launch(state, f"; refusing to predict every case {os.environ.get('WORLD_SIZE')} times")
    return state


def run_identity(cfg: PredictConfig, predictor: Predictor, state: PartialState, model_fp: str) -> RunIdentity:
    """The fingerprints and settings every record of this run carries."""
    settings = {**predictor.settings(), "label_value": cfg.label_value, "formats": sorted(cfg.formats),
                "overlays": cfg.overlays, "record_sources": cfg.record_sources}
    return RunIdentity(model_fp, settings, records.settings_fingerprint(settings),
                       state.num_processes, state.process_index)


def announce(plan: dict[str, Any], shard: Shard | None, state: PartialState) -> None:
    """What this run will do: cases, reused, unusable, processes, device."""
    part = "" if shard is None else f"shard {shard.index}/{shard.count}: "
    console.print(f"predict: {part}{len(plan['all'])} of {plan['cohort_total']} {plan['kind']} cases "
                  f"({len(plan['reused'])} already done, {len(plan['early'])} unusable, "
                  f"{len(plan['skipped'])} skipped) on {state.num_processes} process(es), device {state.device}",
                  highlight=False)
    if shard is not None and len(plan["all"]) + len(plan["early"]) == 0:
        console.print(f"[yellow]note:[/] shard {shard.index}/{shard.count} has no cases (the cohort has "
                      f"{plan['cohort_total']}, fewer than the {shard.count} shards): nothing to predict",
                      highlight=False)


def predict_cohort(cfg: PredictConfig) -> dict[str, Any] | None:
    """Predict every case of ``cfg.input`` on all processes of the launch; the main process returns the summary.

    Raises a UserError (exit status 2) for unusable arguments, input or model; returns None on other processes.
    """
    cfg.check()
    if cfg.dry_run:
        return dry_run(cfg)
    state = process_state(cfg.dist_timeout_s)
    cfg = cfg.for_device(state.device)
    predictor, model_fp = load_models(cfg.model, device=state.device, tta=cfg.tta, threshold=cfg.threshold,
                                      keep_largest=cfg.keep_largest, mixed_precision=cfg.mixed_precision)
    out, shard = Path(cfg.out), cfg.shard_part()
    ident = run_identity(cfg, predictor, state, model_fp)   # the fingerprint of exactly the bytes loaded
    exchange = planning.Exchange.open(out, state, cfg.dist_timeout_s)   # no collective waits on the planning
    plan = exchange.plan(lambda: make_plan(cfg, predictor.meta, out, ident))
    mine = planning.my_cases(plan["todo"], state.process_index, state.num_processes)
    announce(plan, shard, state)
    if predictor.tta:
        console.print(predictor.tta_text(), highlight=False)
    with make_progress("slices") as progress:
        task = progress.add_task(f"predict (rank {state.process_index}/{state.num_processes})",
                                 total=sum(s.slices for s in mine), info="")
        refs = SourceRefs(plan["salt"], cfg.record_sources)
        stats = CohortRunner(predictor, cfg, out, ident, refs).run(mine, progress, task)

    all_stats = exchange.results(asdict(stats))
    if all_stats is None:
        return None
    rows = records.collect_rows(out, plan["all"], set(plan["reused"]), plan["early"], ident)
    rows += [records.skipped_row(s["case_id"], s["reason"]) for s in plan["skipped"]]
    totals = {**cohort_totals(rows, all_stats, ident, plan, shard, state.num_processes),
              "flagged": case_flags.flag_rows(rows, cfg.flags)}
    path = records.write_summary(out, rows, totals, shard)
    if cfg.report and shard is None:
        report_html.write_report(out, rows, totals, cfg.flags)
    report(totals, rows, cfg, path)
    if shard is not None and not records.missing_shard_summaries(out, shard):
        console.print(f"all {shard.count} shard summaries are in {out}; for one summary.csv of the whole cohort, run "
                      f"the same command without --shard (it reuses every complete case)", highlight=False)
    return {**totals, "cases": rows}


def cohort_totals(rows: list[dict[str, Any]], all_stats: list[dict[str, Any]], ident: RunIdentity,
                  plan: dict[str, Any], shard: Shard | None, world_size: int) -> dict[str, Any]:
    """The summary's totals: counts by status, throughput and waits over every process, identity."""
    slices = sum(s["slices"] for s in all_stats)
    loop_s = max((s["loop_s"] for s in all_stats), default=0.0)
    loop_total = max(sum(s["loop_s"] for s in all_stats), 1e-9)
    return {
        "cases_total": len(rows), "predicted": sum(r["status"] == "predicted" for r in rows),
        "reused": sum(r["status"] == "reused" for r in rows), "failed": sum(r["status"] == "failed" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "world_size": world_size, "slices_predicted": slices,
        "images_per_s": round(slices / loop_s, 2) if loop_s > 0 else None,
        "data_wait_fraction": round(sum(s["wait_s"] for s in all_stats) / loop_total, 4),
        "write_wait_fraction": round(sum(s["write_wait_s"] for s in all_stats) / loop_total, 4),
        "startup_s": round(max((s["startup_s"] or 0.0 for s in all_stats), default=0.0), 3),
        "model_fingerprint": ident.model_fingerprint,
        "settings": ident.settings, "input_kind": plan["kind"], "cohort_cases": plan["cohort_total"],
        "shard": None if shard is None else {"index": shard.index, "count": shard.count},
    }


def report(totals: dict[str, Any], rows: list[dict[str, Any]], cfg: PredictConfig, summary: Path) -> None:
    """Final lines: counts, throughput, data-wait fraction (with a hint when high), failures."""
    console.print(
        f"predicted {totals['predicted']}, reused {totals['reused']}, failed {totals['failed']}, "
        f"skipped {totals['skipped']} of "
        f"{totals['cases_total']} cases on {totals['world_size']} process(es); "
        f"{totals['slices_predicted']} slices at {totals['images_per_s'] or 0:.1f} images/s; "
        f"waiting for data {100 * totals['data_wait_fraction']:.1f}% of the time after a "
        f"{totals['startup_s']:.1f} s start", highlight=False)
    if totals["slices_predicted"] and totals["data_wait_fraction"] > WAIT_WARNING:
        console.print(f"[yellow]note:[/] the model waited for data {100 * totals['data_wait_fraction']:.0f}% of "
                      f"the time; more --workers (now {cfg.workers}) would keep it busier", highlight=False)
    if totals["slices_predicted"] and totals["write_wait_fraction"] > WAIT_WARNING:
        console.print(f"[yellow]note:[/] the model waited for the writers {100 * totals['write_wait_fraction']:.0f}% "
                      f"of the time; more --write-threads (now {cfg.write_threads}) or fewer --format/--overlays "
                      f"would keep it busier", highlight=False)
    for r in rows:
        if r.get("flags"):
            console.print(f"[yellow]flagged[/] {r['case_id']}: {r['flags']}", highlight=False, soft_wrap=True)
    for r in rows:
        if r["status"] == "failed":
            console.print(f"[red]failed[/] {r['case_id']}: {r['reason']}", highlight=False, soft_wrap=True)
    console.print(f"summary: {summary}", highlight=False)
