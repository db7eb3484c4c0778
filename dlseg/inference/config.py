"""What one prediction run needs: ``PredictConfig`` (the flags of ``dlseg/predict.py``), device defaults, shards."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Any

from dlseg.config import option
from dlseg.errors import ConfigError
from dlseg.inference.case_flags import FlagConfig
from dlseg.sources.masks import GRAY_VALUES
from dlseg.sources.series_select import MIN_SLICES

FORMATS = ("png", "npz", "nifti", "dicom-seg")
INPUT_KINDS = ("auto", "chaos", "dicom", "store", "nifti")
PRECISIONS = ("no", "fp16", "bf16")     # autocast dtypes (predictor.AMP_DTYPES); this module stays torch-free
# A large batch falls out of a CPU's caches, and loader processes there only take cores from the forward pass.
CPU_BATCH, ACCELERATOR_BATCH = 8, 64
CPU_WORKERS, ACCELERATOR_WORKERS = 0, 2
DIST_TIMEOUT_S = 1800                   # as long as training's --dist-timeout-s


@dataclass
class PredictConfig:
    """Everything one prediction run needs; its fields are the flags of ``dlseg/predict.py``."""

    model: tuple[str, ...] = option("run folder, its model/ folder, or model.safetensors/model.json (required); "
                                    "repeat for an ensemble (mean of the models' probabilities)", (), repeat=True,
                                    metavar="MODEL")
    input: str = option("CHAOS tree, any DICOM folder tree, a dlseg Zarr store, or a NIfTI file or folder "
                        "(imagesTs/) (required)", "")
    out: str = option("output folder: one sub-folder per case + summary.csv/json (required)", "")
    input_kind: str = option("what --input is", "auto", choices=INPUT_KINDS)
    source_root: str | None = option("store input: the folder it was preprocessed from (--format dicom-seg "
                                     "references those DICOM files)", None)
    split: str | None = option("store input: train | val | unlabeled | all", None, default_help="all")
    batch_size: int = option("slices per forward pass, packed across cases", 0,
                             default_help=f"{ACCELERATOR_BATCH} on a GPU, {CPU_BATCH} on a CPU")
    workers: int | None = option("processes reading and preparing cases ahead", None,
                                 default_help=f"{ACCELERATOR_WORKERS} with a GPU, {CPU_WORKERS} on a CPU, where "
                                              "the forward pass already uses every core")
    prefetch: int = option("cases each worker prepares ahead", 2)
    write_threads: int = option("background writer threads (inverse resize, threshold, PNG encode)", 4)
    max_pending_writes: int = option("cases queued for the writers before compute pauses", 4)
    tta: bool = option("test-time augmentation: mean over the flips, turns and zooms the model was trained with "
                       "(refused for a model trained with none)", False)
    keep_largest: bool = option("keep the largest 3D connected component (per class)", False)
    threshold: float | None = option("binary models: probability threshold", None, default_help="the model's")
    formats: tuple[str, ...] = option(f"comma list of {', '.join(FORMATS)}", ("png",), flag="--format")
    overlays: bool = option("overlays/ PNGs: image | ground truth | prediction", False)
    label_value: int = option("binary models: PNG gray value of the liver", GRAY_VALUES["MR"][1])
    mixed_precision: str = option("autocast dtype", "no", choices=PRECISIONS)
    dist_timeout_s: int = option("collective timeout (s); a rank silent this long (no heartbeat) is given up",
                                 DIST_TIMEOUT_S)
    report: bool = option("write OUT/report.html (cohort table, flags, thumbnails, volume histogram)", True,
                          flag="--no-report", const=False)
    flags: FlagConfig = option("rules that flag implausible cases (summary.csv, report.html)",
                               default_factory=FlagConfig)
    shard: str | None = option("I/N: predict only cases[I::N] of the cohort (job array task I of N, 0 ≤ I < N); "
                               "tasks share --out and each writes summary-shard-I-of-N.csv/json", None)
    series_description: str | None = option("DICOM trees: predict the series whose SeriesDescription matches this "
                                            "regular expression (case-insensitive), instead of the rules", None)
    series_uids: str | None = option("DICOM trees: a file of SeriesInstanceUIDs (one a line) to predict, instead "
                                     "of the rules (with --series-description: either chooses)", None)
    min_slices: int = option("DICOM trees: series with fewer slices are skipped as localizers", MIN_SLICES)
    dry_run: bool = option("print the series selection and write OUT/selection.csv; predict nothing", False)
    record_sources: bool = option("sources.json and failure reasons name source files by path (a folder name can "
                                  "be a patient name); default: salted SOPInstanceUID hashes or indices", False)
    id_salt: str | None = option("salt of the ids of DICOM-tree series (default: a random one, recorded in "
                                 "OUT/id-salt.json and reused when resuming)", None)

    def __post_init__(self) -> None:
        models = [self.model] if isinstance(self.model, (str, os.PathLike)) else list(self.model or ())
        self.model = tuple(str(m) for m in models if str(m))      # PredictConfig(model=path): one model
        self.formats = tuple(f.strip() for f in self.formats if f.strip())   # "png, npz" as "png,npz"

    def for_device(self, device: Any) -> PredictConfig:
        """This config with the device defaults filled in (``batch_size`` 0, ``workers`` None) for a torch device."""
        cpu = str(device).split(":")[0] == "cpu"
        return dataclasses.replace(
            self, batch_size=self.batch_size or (CPU_BATCH if cpu else ACCELERATOR_BATCH),
            workers=self.workers if self.workers is not None else (CPU_WORKERS if cpu else ACCELERATOR_WORKERS))

    def shard_part(self) -> Shard | None:
        """The parsed ``--shard`` (None for the whole cohort); raises ConfigError when unusable."""
        return None if self.shard is None else Shard.parse(self.shard)

    def check(self) -> None:
        """Raise ConfigError naming the first unusable option."""
        if not self.model:
            raise ConfigError("--model: required (a run folder or its exported model)")
        if not self.input:
            raise ConfigError("--input: required (a CHAOS tree, a DICOM folder or a dlseg store)")
        if not self.out:
            raise ConfigError("--out: required (the output folder)")
        if self.input_kind not in INPUT_KINDS:
            raise ConfigError(f"--input-kind {self.input_kind!r}: expected one of {', '.join(INPUT_KINDS)}")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ConfigError(f"--format {','.join(self.formats)!r}: expected a comma list of {', '.join(FORMATS)}")
        if "nifti" in self.formats and importlib.util.find_spec("nibabel") is None:
            raise ConfigError("--format nifti needs nibabel, which is not installed (pip install nibabel)")
        if self.batch_size < 0 or (self.workers or 0) < 0 or self.prefetch < 1 or self.write_threads < 1:
            raise ConfigError("--prefetch and --write-threads must be ≥ 1, --batch-size and --workers ≥ 0")
        if self.max_pending_writes < 1:
            raise ConfigError("--max-pending-writes must be ≥ 1")
        if self.dist_timeout_s < 1:
            raise ConfigError(f"--dist-timeout-s {self.dist_timeout_s}: expected at least 1 second")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"--threshold {self.threshold}: expected a probability strictly between 0 and 1")
        if not 1 <= self.label_value <= 255:
            raise ConfigError(f"--label-value {self.label_value}: expected 1..255")
        if self.min_slices < 1:
            raise ConfigError(f"--min-slices {self.min_slices}: expected ≥ 1")
        try:
            re.compile(self.series_description or "")
        except re.error as e:
            raise ConfigError(f"--series-description {self.series_description!r}: not a regular expression ({e})") \
                from None
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"--mixed-precision {self.mixed_precision!r}: expected no, fp16 or bf16")
        self.shard_part()


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` of a cohort: every count-th case, starting with the index-th."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` with 0 ≤ I < N → Shard (ConfigError naming --shard otherwise)."""
        m = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", text)
        if m is None:
            raise ConfigError(f"--shard {text!r}: expected I/N with integers 0 ≤ I < N (e.g. 0/4)")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1 or index >= count:
            raise ConfigError(f"--shard {text!r}: expected 0 ≤ I < N (N ≥ 1), got I={index}, N={count}")
        return cls(index, count)

    def select(self, items: list) -> list:
        """This shard's share of a deterministically ordered list."""
        return items[self.index::self.count]

    @property
    def name(self) -> str:
        """``shard-I-of-N`` (used in summary file names)."""
        return f"shard-{self.index}-of-{self.count}"
