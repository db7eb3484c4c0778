"""Predict a cohort: ``accelerate launch dlseg/predict.py --model RUN --input PATH --out OUT [options]``.

Also runs as ``python dlseg/predict.py …`` or ``python -m dlseg.predict …``. Thin script over
:mod:`dlseg.predictor`. Exit status: 0 all cases written, 1 some cases failed (the rest are written and the
summary lists the reasons), 2 unusable arguments, input or model (one line, no traceback). With ``--shard I/N``
(one task of a job array) the status is that of the shard's cases; a shard with no case (more tasks than cases)
exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch dlseg/predict.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlseg.predictor import FORMATS, INPUT_KINDS, PRECISIONS, PredictConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The documented flags of the predict command."""
    d = PredictConfig()
    p = argparse.ArgumentParser(prog="dlseg/predict.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="run folder, its model/ folder, or model.safetensors/model.json")
    p.add_argument("--input", required=True, help="CHAOS tree, any DICOM folder tree, or a dlseg Zarr store")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per case + summary.csv/json)")
    p.add_argument("--input-kind", default=d.input_kind, choices=INPUT_KINDS, help="what --input is")
    p.add_argument("--split", default=None, help="store input: train | val | unlabeled | all")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="slices per forward pass, packed across cases (default 0: 64 on a GPU, 8 on a CPU)")
    p.add_argument("--workers", type=int, default=d.workers, help="processes reading and preparing cases ahead (default: 2 with a GPU, 0 on a CPU, "
                   "where the forward pass already uses every core)")
    p.add_argument("--prefetch", type=int, default=d.prefetch, help="cases each worker prepares ahead")
    p.add_argument("--write-threads", type=int, default=d.write_threads, help="background writer threads")
    p.add_argument("--max-pending-writes", type=int, default=d.max_pending_writes,
                   help="cases queued for the writers before compute pauses")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (mean of 4 flips)")
    p.add_argument("--keep-largest", action="store_true", help="keep the largest 3D connected component")
    p.add_argument("--threshold", type=float, default=None, help="probability threshold (default: the model's)")
    p.add_argument("--format", default=",".join(d.formats), help=f"comma list of {', '.join(FORMATS)}")
    p.add_argument("--overlays", action="store_true", help="overlays/ PNGs: image | ground truth | prediction")
    p.add_argument("--label-value", type=int, default=d.label_value, help="binary models: PNG value of the liver")
    p.add_argument("--mixed-precision", default=d.mixed_precision, choices=list(PRECISIONS), help="autocast dtype")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="predict only cases[I::N] of the cohort (job array task I of N, 0 ≤ I < N); tasks share "
                        "--out and each writes summary-shard-I-of-N.csv/json")
    return p


def config_from_args(argv: list[str] | None = None) -> PredictConfig:
    """Parse the command line into a PredictConfig."""
    a = build_parser().parse_args(argv)
    return PredictConfig(
        model=a.model, input=a.input, out=a.out, input_kind=a.input_kind, split=a.split, batch_size=a.batch_size,
        workers=a.workers, prefetch=a.prefetch, write_threads=a.write_threads,
        max_pending_writes=a.max_pending_writes, tta=a.tta, keep_largest=a.keep_largest, threshold=a.threshold,
        formats=tuple(f.strip() for f in a.format.split(",") if f.strip()), overlays=a.overlays,
        label_value=a.label_value, mixed_precision=a.mixed_precision, shard=a.shard,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the prediction; return the exit status."""
    from dlseg.config import ConfigError
    from dlseg.console import err_console, is_main_process
    from dlseg.export import ModelError
    from dlseg.predictor import predict_cohort
    from dlseg.store import StoreError
    from dlseg.errors import CaseError, UsageError

    cfg = config_from_args(argv)
    try:
        summary = predict_cohort(cfg)
    except (ConfigError, ModelError, UsageError, StoreError, CaseError) as e:
        if is_main_process():
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    if summary is None:      # not the main process: the main one reports and sets the status
        return 0
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
