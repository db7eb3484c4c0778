"""Which cases a run drops from the store: only those whose sources vanished, never one that merely failed now.

A case converted by an earlier run that fails this time (a transient read error, a file being copied in) keeps
its previous version; its failure says so and the exit status still reports it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from dlseg.errors import Failure

KEPT = "previous version kept"


@dataclasses.dataclass
class Reconciled:
    """The store's cases after a run: which to remove, which failed ones stay, and the failures as reported."""

    removed: list[str]
    kept: list[str]
    failures: list[Failure]


def reconcile(stored: Iterable[str], sources: Iterable[str], failures: list[Failure]) -> Reconciled:
    """``stored``: complete cases on disk; ``sources``: cases found this run (converted or failed to convert)."""
    stored = set(stored)
    found = set(sources) | {f.case_id for f in failures}
    kept = sorted({f.case_id for f in failures} & stored)
    marked = [dataclasses.replace(f, reason=f"{f.reason} ({KEPT})") if f.case_id in stored else f for f in failures]
    return Reconciled(sorted(stored - found), kept, marked)


def kept_entries(kept: Iterable[str], failures: list[Failure], table: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Split entries (subject, labeled) of the kept cases, from their failures and the store's previous table."""
    subjects = {f.case_id: f.subject for f in failures}
    entries = {}
    for cid in kept:
        row = table.get(cid) or {}
        subject = subjects.get(cid) or f"{row.get('modality')}-{row.get('patient')}"
        entries[cid] = {"subject": subject, "labeled": bool(row.get("labeled", True))}
    return entries


def kept_note(kept: list[str]) -> str:
    """`` (N kept their previous version)`` for the run's summary line, or nothing."""
    return f" ({len(kept)} kept their previous version)" if kept else ""
