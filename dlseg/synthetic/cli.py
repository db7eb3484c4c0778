"""``python -m preprocess.synthetic OUT_DIR --patients N …``: the cohort's command line."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from dlseg.console import console, make_progress, print_error, run_entry
from dlseg.synthetic.cohort import MODALITIES, MR_SEQUENCES, CohortSpec, plan, write_patient


def _parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(prog="python -m preprocess.synthetic",
                                 description="Write a synthetic cohort in the CHAOS layout (DICOM + Ground PNGs).")
    ap.add_argument("out_dir", type=Path, help="output folder (Train_Sets/ and Test_Sets/ are created in it)")
    ap.add_argument("--patients", type=int, required=True, help="training patients per modality")
    ap.add_argument("--modality", choices=MODALITIES, default="mr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, nargs=2, metavar=("MIN", "MAX"), default=(192, 256),
                    help="in-plane size range in pixels")
    ap.add_argument("--slices", type=int, nargs=2, metavar=("MIN", "MAX"), default=(26, 36),
                    help="slices per series range")
    ap.add_argument("--test-patients", type=int, default=0, help="unlabeled patients per modality (Test_Sets/)")
    ap.add_argument("--sequences", nargs="+", choices=MR_SEQUENCES, default=list(MR_SEQUENCES),
                    help="MR series to write (default: all)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 on success, 2 for unusable arguments, 1 when writing failed."""
    return run_entry(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    """Parse, validate (ConfigError → exit 2 through run_entry), write patient by patient, summarize."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:       # argparse printed its usage line; --help exits 0
        return 0 if e.code in (0, None) else 2
    spec = CohortSpec(args.patients, args.modality, args.seed, tuple(args.size), tuple(args.slices),
                      args.test_patients, tuple(args.sequences))
    jobs = plan(spec)
    start, slices = time.perf_counter(), 0
    try:
        with make_progress(unit="patients", transient=True) as progress:
            task = progress.add_task("synthetic", total=len(jobs), info="")
            for job in jobs:
                progress.update(task, info=str(job.folder))
                slices += write_patient(job, args.out_dir)
                progress.advance(task)
    except OSError as e:
        print_error(f"{e.filename or args.out_dir}: cannot write the cohort ({e.strerror or e})")
        return 1
    n_ct = sum(j.modality == "CT" for j in jobs)
    console.print(f"wrote {len(jobs)} patients ({n_ct} CT, {len(jobs) - n_ct} MR; "
                  f"{sum(j.test for j in jobs)} in Test_Sets), {slices} DICOM slices to {args.out_dir} "
                  f"in {time.perf_counter() - start:.1f} s", highlight=False, soft_wrap=True)
    return 0
