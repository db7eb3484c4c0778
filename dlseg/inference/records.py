"""Resume and summaries: fingerprints that make a case folder reusable, stale temporaries, summary.csv/json."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

from dlseg.fileio import atomic_write
from dlseg.inference import case_flags, outputs
from dlseg.inference.config import Shard

SUMMARY_FIELDS = ("case_id", "status", "slices", "height", "width", "spacing_z", "spacing_y", "spacing_x",
                  "liver_volume_ml", "foreground_slices", "seconds", "reason", *case_flags.MEASURE_FIELDS, "flags")


class HasFingerprint(Protocol):
    """A case to predict (``inputs.CaseSpec``): its id and input fingerprint."""

    case_id: str
    fingerprint: str


def stat_fingerprint(paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> str:
    """SHA-256 over each source file's name relative to the input root, size and mtime (cheap; no content read)."""
    h = hashlib.sha256(b"dlseg-predict-input:stat:v1\n")
    for p in paths:
        st = os.stat(p)
        h.update(f"{Path(os.path.relpath(p, root)).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """SHA-256 of the output-affecting settings (sorted JSON)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class RunIdentity:
    """What makes an existing case folder reusable: model, settings, and where it runs."""

    model_fingerprint: str
    settings: dict[str, Any]
    settings_fingerprint: str
    world_size: int
    rank: int

    def provenance(self, input_fingerprint: str, formats: Iterable[str]) -> dict[str, Any]:
        """The record keys that say which input, model and settings produced a case folder."""
        return {"model_fingerprint": self.model_fingerprint, "input_fingerprint": input_fingerprint,
                "settings_fingerprint": self.settings_fingerprint, "settings": self.settings,
                "formats": list(formats), "world_size": self.world_size, "rank": self.rank}

    def made(self, record: dict[str, Any] | None, input_fingerprint: str) -> bool:
        """True when ``record`` was written for this input, model and settings."""
        return bool(record) and (record.get("input_fingerprint"), record.get("model_fingerprint"),
                                 record.get("settings_fingerprint")) == \
            (input_fingerprint, self.model_fingerprint, self.settings_fingerprint)


def is_done(out: Path, spec: HasFingerprint, ident: RunIdentity) -> dict[str, Any] | None:
    """The existing record when the case is complete for this input, model and settings; else None."""
    rec = outputs.read_record(out / spec.case_id)
    return rec if ident.made(rec, spec.fingerprint) else None


def clean_stale(out: Path, case_ids: Iterable[str]) -> int:
    """Remove the temporaries and failure notes of these cases left by an earlier (possibly killed) run.

    Only the given cases' own names are touched, so array tasks sharing ``out`` never disturb each other.
    """
    mine = set(case_ids)
    n = 0
    with os.scandir(out) as entries:
        for e in entries:
            m = outputs.TMP_CASE_RE.fullmatch(e.name)
            if m and m.group("case") in mine:
                shutil.rmtree(e.path, ignore_errors=True) if e.is_dir() else os.unlink(e.path)
                n += 1
    failed = out / outputs.FAILED_DIR
    if failed.is_dir():
        with os.scandir(failed) as entries:
            for e in entries:
                m = outputs.NOTE_TMP_RE.fullmatch(e.name)
                if (m and m.group("case") in mine) or (e.name.endswith(".json") and e.name[:-5] in mine):
                    os.unlink(e.path)
                    n += 1
    return n


def summary_row(rec: dict[str, Any], status: str) -> dict[str, Any]:
    """A flat summary row from a case record."""
    shape, spacing = rec["shape"], rec["spacing"]
    return {"case_id": rec["case_id"], "status": status, "slices": rec["slices"], "height": shape[1],
            "width": shape[2], "spacing_z": spacing[0], "spacing_y": spacing[1], "spacing_x": spacing[2],
            "liver_volume_ml": rec["liver_volume_ml"], "foreground_slices": rec["foreground_slices"],
            "seconds": rec["seconds"], "reason": "", **case_flags.row_measures(rec), "flags": ""}


def failed_row(case_id: str, reason: str) -> dict[str, Any]:
    """A summary row of a failed case."""
    return {**{k: None for k in SUMMARY_FIELDS}, "case_id": case_id, "status": "failed", "reason": reason}


def skipped_row(case_id: str, reason: str) -> dict[str, Any]:
    """A summary row of a series the selection left out (not a failure)."""
    return {**failed_row(case_id, reason), "status": "skipped"}


def collect_rows(out: Path, fingerprints: dict[str, str], reused: set[str], early_failures: list[dict[str, str]],
                 ident: RunIdentity) -> list[dict[str, Any]]:
    """One row per case of this run (case id → input fingerprint), from the records and failure notes on disk."""
    rows = [failed_row(f["case_id"], f["reason"]) for f in early_failures]
    for cid, fp in fingerprints.items():
        note = outputs.read_failure(out, cid)
        rec = outputs.read_record(out / cid)
        if note is not None:
            rows.append(failed_row(cid, note.get("reason", "")))
        elif ident.made(rec, fp):
            rows.append(summary_row(rec, "reused" if cid in reused else "predicted"))
        else:
            rows.append(failed_row(cid, "no record written (process ended early)"))
    return rows


def write_summary(out: Path, rows: list[dict[str, Any]], totals: dict[str, Any], shard: Shard | None = None) -> Path:
    """The summary CSV and JSON of the cohort or shard (each written atomically); returns the CSV's path."""
    csv_path, json_path = outputs.summary_files(out, shard)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SUMMARY_FIELDS))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_FIELDS})
    atomic_write(csv_path, buf.getvalue().encode())
    atomic_write(json_path, json.dumps({**totals, "cases": rows}, indent=1).encode())
    return csv_path


def missing_shard_summaries(out: Path, shard: Shard) -> list[str]:
    """Names of the shard summaries of this array (same N) not yet in ``out``."""
    paths = [outputs.summary_files(out, Shard(i, shard.count))[1] for i in range(shard.count)]
    return [p.name for p in paths if not p.is_file()]
