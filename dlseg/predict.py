"""Predict a cohort: ``accelerate launch dlseg/predict.py --model RUN --input PATH --out OUT [options]``.

Also runs as ``python dlseg/predict.py …`` or ``python -m dlseg.predict …``; a thin script over
:mod:`dlseg.inference`. Exit status: 0 all cases written, 1 some cases failed (the rest are written and the
summary lists the reasons), 2 unusable arguments, input or model (one line, no traceback). With ``--shard I/N``
(one task of a job array) the status is that of the shard's cases; a shard with no case (more tasks than cases)
exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch dlseg/predict.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlseg.config import parse_args  # noqa: E402
from dlseg.console import run_entry  # noqa: E402
from dlseg.inference.config import PredictConfig  # noqa: E402
from dlseg.inference.runner import predict_cohort  # noqa: E402

DESCRIPTION = "Predict a cohort: CHAOS tree, DICOM tree or dlseg store → CHAOS PNGs (+ npz, NIfTI, overlays)."


def _main(argv: list[str] | None) -> int:
    summary = predict_cohort(parse_args(PredictConfig, argv, prog="dlseg/predict.py", description=DESCRIPTION))
    if summary is None:      # not the main process: the main one reports and sets the status
        return 0
    return 1 if summary["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    """Run the prediction; return the exit status."""
    return run_entry(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
