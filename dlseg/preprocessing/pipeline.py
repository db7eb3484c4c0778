"""Preprocessing runs: a CHAOS tree or a NIfTI dataset → one Zarr store, in parallel, resumable
(``python -m preprocess``).

Exit status: 0 every case converted (or unchanged), 1 some cases failed (the rest written), 2 unusable arguments.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

from rich.markup import escape
from rich.table import Table

from dlseg.config import option
from dlseg.console import console, make_progress
from dlseg.locks import FolderLock, is_lock_file
from dlseg.store import StoreWriter
from dlseg.workers import spawn_pool

from dlseg.preprocessing.convert import CaseResult, process_case
from dlseg.errors import Failure, UsageError
from dlseg.sources.layout import MODALITIES, CaseSource
from dlseg.sources.nifti import discover_cases
from dlseg.preprocessing.qa import qa_dir_for
from dlseg.preprocessing.retain import kept_entries, kept_note, reconcile
from dlseg.preprocessing.split import SplitConfig, build_split, split_patients, split_warnings, validate

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def default_workers() -> int:
    """One worker per CPU core, at most 8 (each holds about one case in memory)."""
    return max(1, min(os.cpu_count() or 1, 8))


@dataclass
class PreprocessConfig:
    """Everything one preprocessing run needs; its fields are the flags of ``python -m preprocess``."""

    src: str = option("folder holding Train_Sets/ (or Train_Sets/ itself, a folder with CT/ and/or MR/, or "
                      "Test_Sets/), or an MSD / nnU-Net NIfTI dataset (dataset.json)", positional=True, flag="SRC")
    out: str = option("output store, e.g. data/chaos.zarr (re-running resumes and skips unchanged cases)",
                      positional=True, flag="OUT.zarr")
    modality: str = option("CHAOS sequence(s) to convert (a NIfTI dataset's comes from dataset.json)", "t1-in",
                           choices=MODALITIES)
    labels: str = option("CHAOS: liver (0/1) or organs (0..4); NIfTI dataset: all (its label map) or one "
                         "structure of dataset.json by name (0/1)", "liver")
    workers: int = option("parallel processes", default_factory=default_workers, default_help="CPU cores, max 8")
    seed: int = option("split seed", 0)
    val_fraction: float = option("fraction of patients for val", 0.2, exclusive="split")
    folds: int | None = option("k-fold split: number of folds (with --fold)", None, exclusive="split")
    split_file: str | None = option('JSON {"train": [patients], "val": [patients]}; a patient is "5" or "MR-5"',
                                    None, exclusive="split")
    fold: int | None = option("k-fold split: which fold is val (0-based)", None)
    qa: bool = option("write OUT.qa/<case>.png with mask contours on a few slices", False)

    def split_config(self) -> SplitConfig:
        return SplitConfig(self.seed, self.val_fraction, self.folds, self.fold, self.split_file)


@dataclass
class RunReport:
    """The outcome of a run: what was written, skipped, removed, failed, and the root attributes."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)         # failed now, previous version still in the store
    failures: list[Failure] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    root: dict[str, Any] = field(default_factory=dict)
    qa_dir: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.failures else EXIT_OK

    def first_failures(self, shown: int = 3) -> str:
        """``case: file: reason; …`` of the first ``shown`` failures (and how many more), for library callers."""
        more = f" (and {len(self.failures) - shown} more)" if len(self.failures) > shown else ""
        return "; ".join(str(f) for f in self.failures[:shown]) + more


def check_config(cfg: PreprocessConfig) -> None:
    """Reject unusable options before any work (UsageError → exit 2)."""
    validate(cfg.split_config())
    if cfg.workers < 1:
        raise UsageError(f"--workers {cfg.workers}: need at least 1")
    if cfg.split_file and not Path(cfg.split_file).is_file():
        raise UsageError(f"{cfg.split_file}: split file not found")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(not is_lock_file(p.name) for p in out.iterdir()) and not (out / "zarr.json").is_file():
        raise UsageError(f"{out}: folder is not empty and is not a Zarr store; choose another output")


WORKER_DIED = "worker process died converting this case (a crash in a decoder, or out of memory); the other cases went on"


def convert_in_pool(workers: int, todo: deque[CaseSource], job: Callable[[CaseSource], CaseResult],
                    ) -> Generator[CaseResult, None, list[CaseSource]]:
    """Convert the cases of ``todo`` (consumed) in a fresh pool of spawned workers; yield results as they finish.

    At most two cases per worker are handed over at a time, so that when a worker dies (the pool is then
    broken) only those few are in doubt: they are returned, and the cases still in ``todo`` were not started.
    """
    pool = spawn_pool(workers)
    running: dict[Future, CaseSource] = {}
    try:
        while todo or running:
            while todo and len(running) < 2 * workers:
                src = todo.popleft()
                running[pool.submit(job, src)] = src
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = []
            for fut in done:
                src = running.pop(fut)
                if isinstance(fut.exception(), BrokenProcessPool):
                    broken.append(src)
                else:
                    yield fut.result()  # process_case reports bad input as a result; anything else is a bug
            if broken:
                return broken + list(running.values())
        return []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_cases(cfg: PreprocessConfig, sources: list[CaseSource], qa_dir: str | None,
              convert: Callable[..., CaseResult] = process_case) -> Iterator[CaseResult]:
    """Convert cases in spawned worker processes (``dlseg.workers``: one core each, gone with this process);
    yield results as they finish.

    The main process only hands out cases and collects results, so a crash in a native decoder or the kernel's
    OOM killer takes down a worker, never the run: the cases that worker may have held are retried one at a
    time, each alone in a fresh process; the one that dies again fails alone and the cohort goes on.
    """
    job = partial(convert, cfg.out, labels=cfg.labels, qa_dir=qa_dir)
    store = StoreWriter(cfg.out)
    at_start = {src.case_id: store.case_version(src.case_id) for src in sources}
    todo = deque(sources)
    while todo:
        suspects = yield from convert_in_pool(max(1, min(cfg.workers, len(todo))), todo, job)
        for src in suspects:
            retried = list(convert_in_pool(1, deque([src]), job))   # empty: its process died again
            if not retried:
                yield CaseResult(src.case_id, "failed", src.slice_count, path=src.relative(src.image_files[:1])[0],
                                 reason=WORKER_DIED, subject=src.subject)
            elif retried[0].status == "skipped" and store.case_version(src.case_id) != at_start[src.case_id]:
                # its first worker wrote it before the pool broke, so the retry found it up to date
                attrs = store.complete_attrs(src.case_id) or {}
                yield CaseResult(src.case_id, "written", src.slice_count, notes=attrs.get("notes", []),
                                 subject=src.subject)
            else:
                yield retried[0]


def run(cfg: PreprocessConfig, show_progress: bool = True) -> RunReport:
    """Discover, convert (skipping unchanged cases), drop stale ones, split by patient, finalize the store.

    The whole run holds the store's lock (``dlseg.locks``): one writer per store; a second run stops at once.
    """
    check_config(cfg)
    out = Path(cfg.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with FolderLock(out, "python -m preprocess"):
            return run_locked(cfg, show_progress)
    finally:
        if created:   # a run that stopped before writing anything leaves no empty folder behind
            try:
                out.rmdir()
            except OSError:
                pass


def run_locked(cfg: PreprocessConfig, show_progress: bool) -> RunReport:
    """The body of :func:`run`, with the store's lock held."""
    sources, failures, label_names = discover_cases(cfg.src, cfg.modality, cfg.labels)
    subjects = {s.subject for s in sources if s.group == "train"} | {f.subject for f in failures if f.subject}
    sides = split_patients(sorted(subjects), cfg.split_config())
    writer = StoreWriter(cfg.out)
    writer.clean_partial()
    report = RunReport(failures=list(failures))
    qa_dir = str(qa_dir_for(cfg.out)) if cfg.qa else None
    report.qa_dir = qa_dir
    total = sum(s.slice_count for s in sources)
    with make_progress(unit="slices", disable=None if show_progress else True) as progress:
        task = progress.add_task("preprocess", total=total, info=f"0/{len(sources)} cases")
        for done, res in enumerate(run_cases(cfg, sources, qa_dir), start=1):
            if res.status == "failed":
                report.failures.append(Failure(res.case_id, res.path, res.reason, res.subject))
            else:
                (report.written if res.status == "written" else report.skipped).append(res.case_id)
            if res.notes:
                report.notes[res.case_id] = res.notes
            progress.update(task, advance=res.slices, info=f"{done}/{len(sources)} cases, {len(report.failures)} failed")
    writer.clean_partial()  # no worker is left; drop the empty staging folder
    failed_ids = {f.case_id for f in report.failures}
    wanted = {s.case_id for s in sources} - failed_ids
    rec = reconcile(writer.case_ids(), [s.case_id for s in sources], report.failures)
    for cid in rec.removed:
        writer.remove_case(cid)
    report.removed, report.kept, report.failures = rec.removed, rec.kept, rec.failures
    present = {s.case_id: {"subject": s.subject, "labeled": s.labeled} for s in sources if s.case_id in wanted}
    present.update(kept_entries(rec.kept, rec.failures, dict(writer.root.attrs).get("cases", {})))
    split = build_split(present, sides, cfg.split_config())
    report.root = writer.finalize(split, label_names)
    return report


def print_report(report: RunReport, cfg: PreprocessConfig) -> None:
    """Summary, notes, split and the failures table (main process only)."""
    for cid, notes in sorted(report.notes.items()):
        for note in notes:
            console.print(f"[yellow]note[/] {escape(cid)}: {escape(note)}", highlight=False)
    split = report.root.get("split", {})
    console.print(
        f"{escape(cfg.out)}: {len(report.written)} written, {len(report.skipped)} unchanged, "
        f"{len(report.failures)} failed{kept_note(report.kept)}, {len(report.removed)} removed; "
        f"split {split.get('method')}: {len(split.get('train', []))} train / {len(split.get('val', []))} val / "
        f"{len(split.get('unlabeled', []))} unlabeled cases", highlight=False, soft_wrap=True,
    )
    for warning in split_warnings(split):
        console.print(f"[yellow]warning[/]: {escape(warning)}", highlight=False, soft_wrap=True)
    if report.qa_dir:
        console.print(f"QA pictures: {escape(report.qa_dir)}/<case>.png", highlight=False)
    if report.failures:
        table = Table(title=f"{len(report.failures)} failed case(s)", title_style="bold red")
        for col in ("case", "file", "reason"):
            table.add_column(col, overflow="fold")
        for f in sorted(report.failures, key=lambda f: f.case_id):
            table.add_row(escape(f.case_id), escape(f.path), escape(f.reason))
        console.print(table)
