"""The cohort a run predicts after series selection, and the dry run (``--dry-run``) that only shows it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dlseg.console import console
from dlseg.export import read_meta
from dlseg.inference.config import PredictConfig
from dlseg.inference.inputs import Cohort, find_cohort
from dlseg.inference.privacy import SourceRefs, cohort_salt
from dlseg.inference.selection import SeriesChoice, print_selection, read_uid_file, write_selection


def series_choice(cfg: PredictConfig) -> SeriesChoice:
    """The override flags as a SeriesChoice (ConfigError when the UID file is unusable)."""
    return SeriesChoice(cfg.series_description, read_uid_file(cfg.series_uids), cfg.min_slices)


def selected_cohort(cfg: PredictConfig, meta: dict[str, Any], out: Path, everything: bool = False
                    ) -> tuple[Cohort, str]:
    """Main process: the output folder's salt, the cohort, and for a DICOM tree the selection (file + screen)."""
    out.mkdir(parents=True, exist_ok=True)
    salt = cohort_salt(out, cfg.id_salt)
    cohort = find_cohort(cfg.input, cfg.input_kind, cfg.split, meta, series_choice(cfg), salt)
    refs = SourceRefs(salt, cfg.record_sources)
    cohort.failures = [{**f, "reason": refs.redact(f["reason"], cfg.input, ())} for f in cohort.failures]
    if cohort.selection:
        print_selection(cohort.selection, write_selection(out, cohort.selection), everything)
    return cohort, salt


def dry_run(cfg: PredictConfig) -> dict[str, Any] | None:
    """Show what a run would predict (no model forward, no outputs but the selection and the salt).

    Under a multi-process launch only rank 0 looks (the others return None, as non-main processes do).
    """
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None
    cohort, _ = selected_cohort(cfg, read_meta(cfg.model[0]), Path(cfg.out), everything=True)
    if not cohort.selection:
        console.print(f"dry run: {len(cohort.cases)} {cohort.kind} cases would be predicted, "
                      f"{len(cohort.failures)} unusable", highlight=False)
    return {"dry_run": True, "failed": 0, "predicted": 0, "would_predict": [c.case_id for c in cohort.cases],
            "skipped": len(cohort.skipped), "cases": cohort.selection}
