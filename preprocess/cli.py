"""``python -m preprocess SRC OUT.zarr [options]``: a CHAOS tree → one Zarr store (see :mod:`dlseg.preprocessing`).

Exit status: 0 every case converted (or unchanged), 1 some cases failed (the rest written), 2 unusable arguments.
"""

from __future__ import annotations

import sys

from dlseg.config import parse_args
from dlseg.console import print_error, run_entry
from dlseg.preprocessing.pipeline import PreprocessConfig, print_report, run

DESCRIPTION = ("Convert a CHAOS-layout cohort (DICOM + ground-truth PNGs) or an MSD / nnU-Net NIfTI dataset into one "
               "Zarr store.")


def _main(argv: list[str] | None) -> int:
    cfg = parse_args(PreprocessConfig, argv, prog="python -m preprocess", description=DESCRIPTION)
    try:
        report = run(cfg)
    except OSError as e:  # e.g. OUT cannot be created or written
        print_error(f"{e.filename or cfg.out}: {e.strerror or e}")
        return 2
    except KeyboardInterrupt:
        print_error("interrupted; re-run the same command to resume")
        return 130
    print_report(report, cfg)
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 ok, 1 some cases failed, 2 unusable arguments (one line, no traceback)."""
    return run_entry(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
