"""Per-class scores for ``python -m dlseg.evaluate``: every CHAOS metric for each foreground class and their mean.

A multi-class case is scored one class at a time (``pred == k`` against ``truth == k``, with the definitions of
:mod:`dlseg.metrics`), and the case's ``mean`` is the unweighted mean over the scored classes of each metric. The
overall table gives, per class and for the mean, the mean ± standard deviation over cases (finite values only:
an infinite RAVD, truth empty and prediction not, is left out, and the summary's ``n`` says over how many), as
CHAOS reports its per-organ results.

Which classes (``--classes``):

* ``auto`` — the prediction's own: every class of a multi-class model (from the case records), otherwise the
  liver alone, scored exactly as before per-class evaluation existed;
* ``liver`` — the liver alone;
* ``all`` — every foreground class of the truth's label map;
* ``NAME,NAME`` — those classes of the truth's label map.

Class names come from the truth's label map (the store's ``label_map``; the CHAOS organ names for a CHAOS tree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.table import Table

from dlseg.errors import UsageError
from dlseg.inference.outputs import prediction_cases, read_record
from dlseg.metrics import case_metrics

MEAN = "mean"                  # the class column's value for the mean over classes
CLASS_MODES = ("auto", "liver", "all")


def predicted_classes(pred_dir: Path) -> list[int]:
    """Class labels a multi-class model wrote into ``pred_dir`` (from its records); empty for a binary model."""
    for case in prediction_cases(pred_dir):
        record = read_record(pred_dir / case) or {}
        if record.get("class_volumes_ml"):
            return sorted(int(k) for k in record["class_volumes_ml"])
    return []


def resolve_classes(option: str, pred_dir: Path, label_map: dict[int, str]) -> dict[int, str] | None:
    """Label → name of the classes to score, or None for the liver alone (the one-class report)."""
    text = option.strip()
    if text == "liver":
        return None
    if text == "auto":
        labels = predicted_classes(pred_dir)
        return {k: label_map.get(k, f"class_{k}") for k in labels} if labels else None
    if text == "all":   # the truth's named classes and every class the model wrote (a truth may name fewer)
        named = {k: v for k, v in label_map.items() if k > 0}
        return {k: named.get(k, f"class_{k}") for k in sorted(set(named) | set(predicted_classes(pred_dir)))}
    by_name = {v: k for k, v in label_map.items() if k > 0}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise UsageError(f"--classes {option!r}: unknown class {', '.join(unknown) or '(none given)'} "
                         f"(the truth has: {', '.join(by_name)}; or auto, liver, all)")
    return {by_name[n]: n for n in names}


def score_classes(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], classes: dict[int, str],
                  columns: dict[str, str], summary: Sequence[str]) -> dict[str, Any]:
    """One case: ``summary`` metrics averaged over classes, plus ``classes``: name → every column of that class."""
    per = {}
    for label, name in classes.items():
        m = case_metrics(pred == label, truth == label, spacing)
        per[name] = {col: m[key] for col, key in columns.items()}
    mean = {col: float(np.mean([per[n][col] for n in per])) for col in summary}
    return {**mean, "classes": per}


def long_rows(rows: list[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Per-class CSV rows: each case's classes, then its ``mean`` row (metrics only)."""
    out = []
    for r in rows:
        for name, values in r["classes"].items():
            out.append({"case": r["case"], "class": name, **{c: values[c] for c in columns}})
        out.append({"case": r["case"], "class": MEAN, **{c: r[c] for c in columns if c in r}})
    return out


def class_summaries(rows: list[dict[str, Any]], summarize) -> dict[str, Any]:
    """Class name → ``summarize`` of that class's values over the cases, in the rows' class order."""
    names = list(rows[0]["classes"]) if rows else []
    return {name: summarize([r["classes"][name] for r in rows]) for name in names}


def cell(s: dict[str, Any]) -> str:
    """``mean`` over ``± sd`` of one summary entry ('-' without finite values)."""
    return "-" if s["mean"] is None else f"{s['mean']:.3f}\n± {s['std']:.3f}"


def class_table(doc: dict[str, Any], title: str, units: dict[str, str]) -> Table:
    """CHAOS-style table: a row per metric, a column per class and one for the mean over classes (mean ± sd)."""
    table = Table(title=title, show_lines=True)
    table.add_column("metric")
    for name in doc["classes"]:
        table.add_column(name, justify="right")
    table.add_column(f"[bold]{MEAN}", justify="right")
    for col, summary in doc["metrics"].items():
        table.add_row(col + units.get(col, ""), *(cell(doc["classes"][n][col]) for n in doc["classes"]),
                      f"[bold]{cell(summary)}")
    return table
