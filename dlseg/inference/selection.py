"""Series selection of a generic DICOM tree for one model: decisions, salted case ids, and ``OUT/selection.csv``.

The rules live in :mod:`dlseg.sources.series_select`; here they meet the model's modality and sequence and the
override flags (``--series-description``, ``--series-uids``). Rows name series by salted ids, series number and
description, never by UID, patient or folder.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlseg.console import console
from dlseg.errors import ConfigError
from dlseg.fileio import atomic_write
from dlseg.inference.privacy import salted_hash
from dlseg.sources.dicom import SeriesFiles
from dlseg.sources.series_select import MIN_SLICES, SeriesVolume, geometry_skip, series_volumes
from dlseg.store import sanitize_case_id

SELECTION_FILE = "selection.csv"
SELECTION_FIELDS = ("study", "case_id", "series_number", "description", "echo", "slices", "sequence", "decision",
                    "reason")
SCREEN_STUDIES = 20          # more studies than this: the table goes to the file only (the dry run prints all)


@dataclass(frozen=True)
class SeriesChoice:
    """The override flags and the localizer slice limit."""

    description: str | None = None           # regular expression on SeriesDescription (case-insensitive)
    uids: frozenset[str] = frozenset()       # SeriesInstanceUIDs
    min_slices: int = MIN_SLICES

    @property
    def explicit(self) -> bool:
        return self.description is not None or bool(self.uids)

    def chosen(self, v: SeriesVolume) -> bool:
        """True when an override flag names this series."""
        return v.uid in self.uids or (self.description is not None
                                      and re.search(self.description, v.first["description"], re.I) is not None)


def read_uid_file(path: str | None) -> frozenset[str]:
    """SeriesInstanceUIDs of a file, one a line (blank lines and ``#`` comments ignored)."""
    if not path:
        return frozenset()
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--series-uids {path}: cannot read ({e.strerror or e})") from None
    uids = frozenset(line.split("#")[0].strip() for line in text.splitlines()) - {""}
    if not uids:
        raise ConfigError(f"--series-uids {path}: no SeriesInstanceUID in the file")
    return uids


@dataclass
class Decision:
    """One volume: predict it or not, and why."""

    volume: SeriesVolume
    case_id: str
    study: str
    predict: bool
    reason: str

    def row(self) -> dict[str, Any]:
        """The selection-table row (no UIDs, no paths)."""
        h = self.volume.first
        return {"study": self.study, "case_id": self.case_id, "series_number": h["series_number"],
                "description": h["description"], "echo": self.volume.echo, "slices": len(self.volume.files),
                "sequence": self.volume.sequence or "", "decision": "predict" if self.predict else "skip",
                "reason": self.reason}


def case_id(modality: str, uid: str, echo: str, salt: str) -> str:
    """Case id of a generic series (or one echo of it): modality + a salted hash, never a name or UID."""
    return sanitize_case_id(f"{modality or 'XX'}-series-{salted_hash(salt, uid, echo)}")


def decide(v: SeriesVolume, modality: str, sequence: str | None, choice: SeriesChoice) -> tuple[bool, str]:
    """(predict, why) of one volume for a model of ``modality`` / ``sequence`` (None: any of the modality)."""
    have = v.first["modality"].upper()
    if choice.explicit:
        if not choice.chosen(v):
            return False, "not chosen by --series-description / --series-uids"
        skip = geometry_skip(v.headers) or (f"{have or 'unknown'} series; the model expects {modality}"
                                            if have != modality else None)
        return (False, skip) if skip else (True, "chosen by --series-description / --series-uids")
    if v.skip:
        return False, v.skip
    if have != modality:
        return False, f"{have} series; the model expects {modality}"
    if sequence and v.sequence != sequence:
        return False, f"{v.sequence} ({v.why}); the model wants {sequence}"
    return True, f"{v.sequence}: {v.why}"


def select_series(series: list[SeriesFiles], meta: dict[str, Any], choice: SeriesChoice, salt: str) -> list[Decision]:
    """Every volume of every series with its decision for this model, grouped by study in order of appearance."""
    modality = str(meta["modality"]).upper()
    sequence = meta.get("sequence") if meta.get("sequence") not in (None, "", "all") else None
    volumes = series_volumes(((s.uid, s.files, s.headers) for s in series), choice.min_slices)
    studies = {v.study: f"study-{salted_hash(salt, 'study', v.study, n=8)}" for v in volumes}
    decisions = [Decision(v, case_id(v.first["modality"], v.uid, v.echo, salt), studies[v.study],
                          *decide(v, modality, sequence, choice)) for v in volumes]
    rank = {study: k for k, study in enumerate(studies)}
    return sorted(decisions, key=lambda d: rank[d.volume.study])


def write_selection(out: Path, rows: list[dict[str, Any]]) -> Path:
    """``OUT/selection.csv`` (atomically)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SELECTION_FIELDS))
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in SELECTION_FIELDS} for r in rows)
    return atomic_write(out / SELECTION_FILE, buf.getvalue().encode())


def read_selection(out: Path) -> list[dict[str, str]]:
    """The rows of ``OUT/selection.csv`` (empty when absent)."""
    path = out / SELECTION_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def print_selection(rows: list[dict[str, Any]], path: Path, everything: bool = False) -> None:
    """One table per study (all of them with ``everything``, else up to SCREEN_STUDIES), then the totals."""
    studies: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        studies.setdefault(r["study"], []).append(r)
    if everything or len(studies) <= SCREEN_STUDIES:
        width = min(max((len(r["description"]) for r in rows), default=0), 28)
        for study, members in studies.items():
            console.print(study, highlight=False)
            for r in members:
                mark = "[green]predict[/]" if r["decision"] == "predict" else "[yellow]skip   [/]"
                series = f"#{r['series_number'] or '?'}"
                echo = f" {r['echo']}" if r["echo"] else ""
                console.print(f"  {mark} {r['case_id']}  {series:>5} {r['description'][:28]:<{width}} "
                              f"{r['slices']:>4} sl{echo}: {r['reason']}", highlight=False, soft_wrap=True)
    chosen = sum(r["decision"] == "predict" for r in rows)
    console.print(f"selection: {chosen} of {len(rows)} series volumes in {len(studies)} studies to predict, "
                  f"{len(rows) - chosen} skipped ({path})", highlight=False, soft_wrap=True)
