"""``python -m dlseg.evaluate --pred OUT_DIR --truth PATH``: score prediction folders with the CHAOS metrics.

Predictions: ``OUT_DIR/<case_id>/`` folders of ``dlseg/predict.py``, read through :mod:`dlseg.inference.outputs`
(the slice PNGs like the official ``png_series_reader``: every ``*.png``, sorted, as 8-bit grayscale; a folder
without PNGs from its ``prediction.npz``).

Truth: a dlseg Zarr store (liver = mask value 1, spacing from the store) or a CHAOS tree (Ground PNGs through
``dlseg.sources.masks``, geometry from the DICOM headers exactly as the official code uses it: PixelSpacing and
the mean slice step ``|T_last - T_first| / (N - 1)`` of the files in name order), or a folder of NIfTI label
files (``labelsTr``/``labelsTs``: case id = file stem; the liver's value from the ``dataset.json`` beside it, else 1).

Every truth case is scored; a truth case without a usable prediction (missing, unreadable, wrong shape) fails
alone with a one-line reason. Outputs: a per-case CSV (default ``OUT_DIR/evaluation.csv``) and a summary JSON
next to it (``evaluation.summary.json``), both written atomically; a summary table (mean, std, median) on the
console. A multi-class prediction is scored per class and as the mean over classes (``dlseg.class_metrics``,
``--classes``). Exit status 0 all cases scored, 1 some failed, 2 unusable arguments.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from rich.markup import escape
from rich.table import Table

from dlseg.class_metrics import class_summaries, class_table, long_rows, resolve_classes, score_classes
from dlseg.config import option, parse_args
from dlseg.console import console, err_console, make_progress, run_entry
from dlseg.errors import CaseError, ConfigError, Failure, StoreError, UsageError, one_line
from dlseg.fileio import atomic_write
from dlseg.inference.outputs import LIVER, LIVER_GRAY, prediction_cases, read_prediction, read_prediction_labels
from dlseg.metrics import case_metrics
from dlseg.sources.dicom import header_meta, read_dataset
from dlseg.sources.layout import discover
from dlseg.sources.masks import LABEL_NAMES, read_masks
from dlseg.sources.nifti import is_nifti_input, liver_as_one, truth_cases, truth_label_names
from dlseg.sources.nifti_volume import read_label_volume
from dlseg.store import Store
from dlseg.workers import spawn_pool

EXIT_OK, EXIT_FAILED = 0, 1
#: CSV column → key of :func:`dlseg.metrics.case_metrics` (CHAOS metrics first).
COLUMNS = {
    "Dice": "dice", "RAVD": "ravd", "ASSD": "assd", "MSSD": "mssd", "HD95": "hd95", "IoU": "iou",
    "voxels_pred": "voxels_pred", "voxels_truth": "voxels_truth", "TP": "tp", "FP": "fp", "FN": "fn",
}
SUMMARY_METRICS = ("Dice", "RAVD", "ASSD", "MSSD", "HD95", "IoU")


def parse_label_value(text: str) -> int | None:
    """``63`` → 63, ``any`` → None (any nonzero pixel is liver)."""
    if text.strip().lower() == "any":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--label-value: expected 1..255 or 'any', got {text!r}") from None
    return check_label_value(value)


def check_label_value(value: int | None) -> int | None:
    """A PNG gray value 1..255, or None for any nonzero pixel (ConfigError otherwise)."""
    if value is not None and not 1 <= value <= 255:
        raise ConfigError(f"--label-value: expected 1..255 or 'any', got {value}")
    return value


@dataclass
class EvalConfig:
    """One evaluation run; its fields are the flags of ``python -m dlseg.evaluate``."""

    pred: str = option("prediction folder (OUT_DIR of dlseg/predict.py) (required)", "")
    truth: str = option("a CHAOS tree (Train_Sets/...), a dlseg Zarr store or a folder of NIfTI labels "
                        "(labelsTr/, labelsTs/) (required)", "")
    csv: str | None = option("per-case CSV", None, default_help="OUT_DIR/evaluation.csv")
    label_value: int | str | None = option("PNG gray value of the liver, or 'any' for any nonzero pixel",
                                           LIVER_GRAY)
    split: str | None = option("store truth only: train | val | unlabeled | all", None,
                               default_help="all labeled cases")
    modality: str = option("CHAOS-tree truth only: ct | t1-in | t1-out | t2 | all", "all")
    workers: int = option("processes scoring cases in parallel", 1)
    classes: str = option("auto (a multi-class prediction: each of its classes; else the liver), liver, all (the "
                          "truth's label map and every class the model wrote) or NAME,NAME", "auto")

    def __post_init__(self) -> None:
        """``--label-value any`` is None; fewer than one worker is one."""
        if isinstance(self.label_value, str):
            self.label_value = parse_label_value(self.label_value)
        check_label_value(self.label_value)
        self.workers = max(1, self.workers)

    @property
    def csv_path(self) -> Path:
        return Path(self.csv) if self.csv else Path(self.pred) / "evaluation.csv"

    @property
    def summary_path(self) -> Path:
        return self.csv_path.with_suffix(".summary.json")


# ------------------------------------------------------------------------------------------------- truth
@dataclass
class TruthSpec:
    """Where the ground truth lives and which cases of it to score (picklable for worker processes)."""

    path: str
    kind: str                                   # store | chaos | nifti
    split: str | None = None
    modality: str = "all"


def truth_kind(path: Path) -> str:
    """``store`` for a Zarr store, ``nifti`` for a folder of NIfTI labels, ``chaos`` for anything else (CHAOS tree)."""
    if (path / "zarr.json").is_file():
        return "store"
    return "nifti" if is_nifti_input(path) else "chaos"


def open_truth(spec: TruthSpec) -> tuple[list[tuple[str, Any]], list[Failure]]:
    """Labeled truth cases as (case id, CHAOS CaseSource or None for the store), and unusable truth cases.

    Raises UsageError/StoreError when the truth cannot be used at all.
    """
    if spec.kind == "store":
        store = open_store(spec.path)
        ids = store.split_cases(spec.split or "all")
        return [(c, None) for c in ids if store.info(c).labeled], []
    if spec.split is not None:
        raise UsageError(f"--split {spec.split}: only a Zarr store truth has splits ({spec.path} is not one)")
    if spec.kind == "nifti":
        return truth_cases(Path(spec.path)), []
    cases, failures = discover(spec.path, modality=spec.modality, labels="liver")
    return [(c.case_id, c) for c in cases if c.labeled], failures


@lru_cache(maxsize=4)
def open_store(path: str) -> Store:
    """A Store, opened once per process."""
    return Store(path)


def truth_label_map(spec: TruthSpec) -> dict[int, str]:
    """Label → class name of the truth (the store's label map; the CHAOS organs for a CHAOS tree)."""
    if spec.kind == "store":
        return {int(k): str(v) for k, v in open_store(spec.path).label_map.items()}
    if spec.kind == "nifti":
        return truth_label_names(Path(spec.path))
    return dict(LABEL_NAMES)


def load_truth(spec: TruthSpec, case_id: str, source: Any) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A truth case's labels (Z, H, W) uint8 (liver = 1) and spacing (z, y, x) in mm."""
    if spec.kind == "store":
        store = open_store(spec.path)
        _, mask = store.read_case(case_id, mask=True)
        return mask, store.info(case_id).spacing
    if spec.kind == "nifti":
        labels, spacing = read_label_volume(Path(source[0]))
        return liver_as_one(labels, source[1]), spacing
    mask = read_masks(source.mask_files, source.modality, "organs")
    return mask, official_spacing(source.image_files)


def official_spacing(files: Sequence[Path]) -> tuple[float, float, float]:
    """(z, y, x) mm as the official CHAOS code derives it: PixelSpacing and |T_last - T_first| / (N - 1)."""
    first = header_meta(read_dataset(Path(files[0])))
    if not first["pixel_spacing"]:
        raise CaseError(files[0], "no PixelSpacing: cannot convert surface distances to mm")
    dy, dx = first["pixel_spacing"]
    if len(files) == 1:
        return (1.0, float(dy), float(dx))  # one slice: every surface voxel is in it, z spacing never enters
    last = header_meta(read_dataset(Path(files[-1])))
    if first["position"] is None or last["position"] is None:
        raise CaseError(files[0], "no ImagePositionPatient: cannot derive the slice step")
    dz = float(np.linalg.norm(np.subtract(last["position"], first["position"]))) / (len(files) - 1)
    if dz <= 0:
        raise CaseError(files[-1], "first and last slice have the same position")
    return (dz, float(dy), float(dx))


# ---------------------------------------------------------------------------------------------- scoring
@dataclass
class CaseJob:
    """Everything a worker needs to score one case."""

    case_id: str
    pred_dir: str
    truth: TruthSpec
    source: Any                         # CHAOS CaseSource (files of the case), None for a store truth
    label_value: int | None
    classes: dict[int, str] | None = None      # label → name of each class scored; None: the liver alone


def score_case(job: CaseJob) -> dict[str, Any] | Failure:
    """One case's CSV row, or its Failure (never raises for bad input)."""
    case_dir = Path(job.pred_dir) / job.case_id
    try:
        pred = (read_prediction(case_dir, job.label_value) if job.classes is None
                else read_prediction_labels(case_dir, job.label_value))
        truth, spacing = load_truth(job.truth, job.case_id, job.source)
        if pred.shape != truth.shape:
            raise CaseError(case_dir, f"prediction is {shape_text(pred.shape)} "
                                      f"but the truth is {shape_text(truth.shape)}")
        if job.classes is not None:
            return {"case": job.case_id, **score_classes(pred, truth, spacing, job.classes, COLUMNS, SUMMARY_METRICS)}
        m = case_metrics(pred, truth == LIVER, spacing)
    except CaseError as e:
        return Failure(job.case_id, e.path, e.reason)
    except StoreError as e:
        return Failure(job.case_id, job.truth.path, one_line(e))
    row: dict[str, Any] = {"case": job.case_id}
    row.update({col: m[key] for col, key in COLUMNS.items()})
    return row


def shape_text(shape: Sequence[int]) -> str:
    """``78x512x512``."""
    return "x".join(map(str, shape))


def run_jobs(jobs: list[CaseJob], workers: int) -> Iterator[dict[str, Any] | Failure]:
    """Score jobs in order, in this process or a pool of spawned workers (``dlseg.workers``)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(score_case, jobs)
        return
    with spawn_pool(workers) as pool:
        yield from pool.map(score_case, jobs)


def evaluate_folder(
    pred_dir: str | os.PathLike, truth: str | os.PathLike, label_value: int | None = LIVER_GRAY,
    split: str | None = None, modality: str = "all", workers: int = 1, progress: bool = False,
    classes: str = "auto",
) -> tuple[list[dict[str, Any]], list[Failure]]:
    """Score every labeled truth case against ``pred_dir/<case_id>/``: (CSV rows, failures).

    Raises UsageError/StoreError when the truth or the prediction folder cannot be used at all.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise UsageError(f"{pred_dir}: no such prediction folder")
    spec = TruthSpec(str(truth), truth_kind(Path(truth)), split, modality)
    cases, failures = open_truth(spec)
    if not cases and not failures:
        raise UsageError(f"{truth}: no labeled cases to score")
    chosen = resolve_classes(classes, pred_dir, truth_label_map(spec))
    jobs = [CaseJob(c, str(pred_dir), spec, source, label_value, chosen) for c, source in cases]
    rows: list[dict[str, Any]] = []
    with make_progress("cases", disable=None if progress else True) as bar:
        task = bar.add_task("evaluate", total=len(jobs), info="")
        for result in run_jobs(jobs, workers):
            (failures if isinstance(result, Failure) else rows).append(result)
            bar.update(task, advance=1, info=result.case_id if isinstance(result, Failure) else result["case"])
    return rows, failures


# ---------------------------------------------------------------------------------------------- outputs
def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Mean, std (population), median and count over the finite values of each metric."""
    out: dict[str, dict[str, float | int | None]] = {}
    for col in SUMMARY_METRICS:
        values = np.array([r[col] for r in rows], dtype=float)
        finite = values[np.isfinite(values)]
        stats = (float(finite.mean()), float(finite.std()), float(np.median(finite))) if finite.size else (None,) * 3
        out[col] = {"mean": stats[0], "std": stats[1], "median": stats[2], "n": int(finite.size)}
    return out


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Per-case CSV: case, Dice, RAVD, ASSD, MSSD, HD95, IoU, voxel and confusion counts (per class: a class column)."""
    buf = io.StringIO()
    per_class = bool(rows) and "classes" in rows[0]
    writer = csv.DictWriter(buf, fieldnames=["case", *(["class"] if per_class else []), *COLUMNS],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(long_rows(rows, list(COLUMNS)) if per_class else rows)
    return buf.getvalue()


def json_safe(value: Any) -> Any:
    """Non-finite floats → None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def summary_document(cfg: EvalConfig, rows: list[dict[str, Any]], failures: list[Failure],
                     unmatched: list[str]) -> dict[str, Any]:
    """Everything summary.json holds."""
    return json_safe({
        "pred": str(cfg.pred), "truth": str(cfg.truth), "label_value": cfg.label_value,
        "cases": len(rows) + len(failures), "scored": len(rows), "failed": len(failures),
        "metrics": summarize(rows),
        **({"classes": class_summaries(rows, summarize)} if rows and "classes" in rows[0] else {}),
        "failures": [{"case": f.case_id, "path": f.path, "reason": f.reason} for f in failures],
        "predictions_without_truth": unmatched,
        "per_case": rows,
    })


def fmt(value: float | int | None) -> str:
    """Table cell text."""
    return "-" if value is None else f"{value:.3f}"


def print_summary(doc: dict[str, Any], cfg: EvalConfig) -> None:
    """Rich table of mean/std/median per metric, then failures, one line each."""
    table = Table(title=f"CHAOS evaluation: {doc['scored']}/{doc['cases']} cases scored")
    for name in ("metric", "mean", "std", "median", "n"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    units = {"RAVD": " (%)", "ASSD": " (mm)", "MSSD": " (mm)", "HD95": " (mm)"}
    for col, s in doc["metrics"].items():
        table.add_row(col + units.get(col, ""), fmt(s["mean"]), fmt(s["std"]), fmt(s["median"]), str(s["n"]))
    if doc.get("classes"):
        table = class_table(doc, f"CHAOS evaluation per class: {doc['scored']}/{doc['cases']} cases scored "
                                 f"(mean ± sd over {doc['metrics']['Dice']['n']} cases)", units)
    console.print(table)
    console.print(f"per-case CSV: {escape(str(cfg.csv_path))}   summary: {escape(str(cfg.summary_path))}")
    if doc["predictions_without_truth"]:
        console.print(f"{len(doc['predictions_without_truth'])} prediction folder(s) have no ground truth here "
                      "and were not scored")
    for f in doc["failures"]:
        err_console.print(f"[red]failed[/] {escape(f['case'])}: {escape(f['path'])}: {escape(f['reason'])}",
                          highlight=False, soft_wrap=True)


# -------------------------------------------------------------------------------------------------- CLI
def run(cfg: EvalConfig, progress: bool = True) -> int:
    """Evaluate, write the CSV and summary JSON, print the table; the exit status."""
    if not cfg.pred or not cfg.truth:
        raise UsageError(f"{'--pred' if not cfg.pred else '--truth'}: required")
    rows, failures = evaluate_folder(cfg.pred, cfg.truth, cfg.label_value, cfg.split, cfg.modality,
                                     cfg.workers, progress, cfg.classes)
    scored = {r["case"] for r in rows} | {f.case_id for f in failures}
    unmatched = [c for c in prediction_cases(Path(cfg.pred)) if c not in scored]
    doc = summary_document(cfg, rows, failures, unmatched)
    atomic_write(cfg.csv_path, csv_text(rows))
    atomic_write(cfg.summary_path, json.dumps(doc, indent=2) + "\n")
    print_summary(doc, cfg)
    return EXIT_FAILED if failures else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point: one error line and status 2 for unusable arguments, never a traceback."""
    return run_entry(lambda: run(parse_args(EvalConfig, argv, prog="python -m dlseg.evaluate",
                                            description="Score prediction folders with the CHAOS metrics.")))


if __name__ == "__main__":
    sys.exit(main())
