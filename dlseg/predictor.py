"""Cohort prediction: inputs → batched inference → CHAOS-format PNGs (+ npz / NIfTI / overlays), resumable.

Data flow (one process per device; cases divided across processes)::

    DataLoader workers:  read series (DICOM or store) → intensity_stats → prepare_volume   (one item = one case)
    main thread:         pack slices of consecutive cases into batches → model (inference_mode, autocast,
                         channels_last, optional flip TTA) → probabilities on the training grid
    writer threads:      mapping.inverse (probabilities) → threshold / argmax → largest component →
                         OUT/.tmp-<case>-<token>/ … → rename to OUT/<case>/

Memory is bounded whatever the cohort size: the loader holds ``workers × prefetch`` cases, the batcher at most
the cases one batch spans, and the writers at most ``max_pending_writes`` cases.

A case folder appears only by renaming a complete temporary folder, and its ``record.json`` carries the model,
input and settings fingerprints, so re-running the same command skips exactly the cases already done.

``--shard I/N`` (job arrays) keeps ``cases[I::N]`` of the deterministically ordered cohort; tasks share one output
folder (their case folders are disjoint), each writes ``summary-shard-I-of-N.csv/json``, and each cleans only the
temporaries of its own cases, so tasks never disturb each other. Running the same command without ``--shard``
afterwards reuses every case and writes the cohort's ``summary.csv/json``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from dlseg.config import ConfigError
from dlseg.console import console, make_progress
from dlseg.distributed import check_launch
from dlseg.fileio import atomic_write, hash_file, install_dir
from dlseg.export import META, WEIGHTS, load_model, resolve_model_dir
from dlseg.normalize import NormConfig, ResizeMapping, intensity_stats, prepare_volume
from dlseg.store import Store, StoreError, sanitize_case_id
from dlseg.workers import one_core

FORMATS = ("png", "npz", "nifti")
INPUT_KINDS = ("auto", "chaos", "dicom", "store")
PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_BATCH, ACCELERATOR_BATCH = 8, 64     # default slices per forward pass (PredictConfig.for_device)
CPU_WORKERS, ACCELERATOR_WORKERS = 0, 2  # default case-loading processes (PredictConfig.for_device)
CHAOS_GRAY_STEP = 63          # multi-class PNG value = class × 63 (liver 63, kidneys 126/189, spleen 252)
TMP_PREFIX = ".tmp-"             # case temporaries: .tmp-<case>-<12 hex>, and .tmp-<case>-old-<8 hex> (install_dir)
TMP_CASE_RE = re.compile(r"\.tmp-(?P<case>.+)-(?:[0-9a-f]{12}|old-[0-9a-f]{8})")
NOTE_TMP_RE = re.compile(r"\.(?P<case>.+)\.json\.[0-9a-f]{8}\.tmp")   # atomic_write's name in .failed/
FAILED_DIR = ".failed"
RECORD = "record.json"
SOURCES = "sources.json"
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))  # identity, hflip, vflip, both
OVERLAY_COLORS = {1: (0, 255, 0), 2: (255, 128, 0), 3: (0, 128, 255), 4: (255, 0, 255)}  # BGR per class


@dataclass
class PredictConfig:
    """Everything one prediction run needs (the command-line flags of ``dlseg/predict.py``)."""

    model: str = ""                      # run folder, its model/ folder, or model.safetensors / model.json
    input: str = ""                      # CHAOS tree, any DICOM folder tree, or a dlseg Zarr store
    out: str = ""                        # output folder (one sub-folder per case)
    input_kind: str = "auto"             # auto | chaos | dicom | store
    split: str | None = None             # store input: train | val | unlabeled | all (default all)
    batch_size: int = 0                  # slices per forward pass (packed across cases); 0 = by device (for_device)
    workers: int | None = None           # DataLoader processes reading + decoding + normalizing cases (None: by device)
    prefetch: int = 2                    # cases each worker prepares ahead
    write_threads: int = 4               # background writer threads (inverse resize, threshold, PNG encode)
    max_pending_writes: int = 4          # cases waiting for the writers before compute pauses
    tta: bool = False                    # mean of probabilities over identity, h-flip, v-flip, both
    keep_largest: bool = False           # keep the largest 3D connected component (per class)
    threshold: float | None = None       # binary models: probability threshold (default: the model's)
    formats: tuple[str, ...] = ("png",)  # png | npz | nifti
    overlays: bool = False               # overlays/slice_NNNN.png: image | ground truth | prediction
    label_value: int = 63                # binary models: PNG gray value of the liver
    mixed_precision: str = "no"          # no | fp16 | bf16 (autocast)
    wait_warning: float = 0.3            # warn once when data wait exceeds this fraction of loop time
    shard: str | None = None             # "I/N": predict only cases[I::N] of the cohort (job array task I of N)

    def for_device(self, device: torch.device | str) -> "PredictConfig":
        """This config with the device defaults filled in: ``batch_size`` 0 and ``workers`` None.

        * batch: 64 slices on an accelerator, 8 on a CPU, where a large batch falls out of the caches (width-16
          U-Net at 128 px on 2 cores: 62-84 slices/s at batch 4-16, 44-46 at 32-64);
        * workers: 2 loader processes on an accelerator (the CPU prepares while the GPU computes), none on a CPU,
          where the forward pass already uses every core and loader processes only take cores from it
          (end-to-end 51 vs 41 slices/s on 2 cores, and no 2 s worker start-up).
        """
        cpu = torch.device(device).type == "cpu"
        return dataclasses.replace(
            self, batch_size=self.batch_size or (CPU_BATCH if cpu else ACCELERATOR_BATCH),
            workers=self.workers if self.workers is not None else (CPU_WORKERS if cpu else ACCELERATOR_WORKERS))

    def shard_part(self) -> "Shard | None":
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
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"--threshold {self.threshold}: expected a probability strictly between 0 and 1")
        if not 1 <= self.label_value <= 255:
            raise ConfigError(f"--label-value {self.label_value}: expected 1..255")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"--mixed-precision {self.mixed_precision!r}: expected no, fp16 or bf16")
        self.shard_part()


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` of a cohort: every count-th case, starting with the index-th."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
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


def summary_stem(shard: Shard | None) -> str:
    """``summary`` for the whole cohort, ``summary-shard-I-of-N`` for one shard (tasks never clobber each other)."""
    return "summary" if shard is None else f"summary-{shard.name}"


# ----------------------------------------------------------------------------------------------------------------
# The model side: batched probabilities, post-processing, and the one-slice-at-a-time reference
# ----------------------------------------------------------------------------------------------------------------

def context_inputs(inputs: torch.Tensor, z0: int, z1: int, k: int) -> torch.Tensor:
    """(n, 2k+1, S, S) network inputs for slices [z0, z1) of a (Z, S, S) volume (edge slices replicate)."""
    if k == 0:
        return inputs[z0:z1, None]
    z = torch.arange(z0, z1, device=inputs.device)[:, None] + torch.arange(-k, k + 1, device=inputs.device)[None]
    return inputs[z.clamp_(0, inputs.shape[0] - 1)]


def largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep, for each class, only its largest 3D connected component (26-connectivity)."""
    out = np.zeros_like(labels)
    structure = ndimage.generate_binary_structure(3, 3)
    for c in np.unique(labels):
        if c == 0:
            continue
        comp, n = ndimage.label(labels == c, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[comp == int(sizes.argmax())] = c
    return out


class Predictor:
    """A loaded model plus the settings that turn its outputs into label volumes."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], device: str | torch.device = "cpu",
                 tta: bool = False, threshold: float | None = None, keep_largest: bool = False,
                 mixed_precision: str = "no"):
        self.device = torch.device(device)
        self.meta = meta
        self.channels_last = bool(meta.get("channels_last", False))
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.num_classes = int(meta["arch"]["num_classes"])
        self.context = int(meta["context_slices"])
        self.size = int(meta["train_size"])
        self.modality = str(meta["modality"]).upper()
        self.norm = NormConfig.from_dict(meta["normalization"])
        self.tta = tta
        self.threshold = float(meta["threshold"] if threshold is None else threshold)
        self.keep_largest = keep_largest
        self.mixed_precision = mixed_precision
        self.amp_dtype = PRECISIONS[mixed_precision]

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", **options: Any) -> "Predictor":
        """Load an exported model (raises ModelError with one line when missing or not matching its JSON)."""
        model, meta = load_model(path)          # on the CPU (safetensors rejects e.g. "cpu:0"); moved below
        return cls(model, meta, device, **options)

    def settings(self) -> dict[str, Any]:
        """What, besides the model, decides the output labels."""
        return {"tta": self.tta, "threshold": self.threshold, "keep_largest": self.keep_largest,
                "mixed_precision": self.mixed_precision}

    def _autocast(self):
        """Autocast context for the configured precision (a no-op for ``no``)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits → probabilities (sigmoid for one logit, softmax over classes otherwise), float32."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.num_classes == 1 else torch.softmax(logits, dim=1)

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) inputs → (B, K, S, S) float32 probabilities on the device (flip-TTA mean when enabled)."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        flips = FLIPS if self.tta else FLIPS[:1]
        total = None
        with self._autocast():
            for dims in flips:
                xi = torch.flip(x, dims) if dims else x
                p = self._activate(self.model(xi))
                p = torch.flip(p, dims) if dims else p
                total = p if total is None else total + p
        return total / len(flips)

    def forward_in_memory(self, slices: torch.Tensor, batch_size: int) -> int:
        """The ceiling for the benchmark: the forward pass alone over in-memory (N, C, S, S) slices; returns N."""
        for i in range(0, slices.shape[0], batch_size):
            self.probabilities(slices[i:i + batch_size])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return int(slices.shape[0])

    def labels_from_probs(self, probs: np.ndarray, mapping: ResizeMapping) -> np.ndarray:
        """(Z, K, S, S) probabilities on the training grid → (Z, H, W) uint8 class labels at the original size."""
        z = probs.shape[0]
        out = np.empty((z, mapping.height, mapping.width), dtype=np.uint8)
        for i in range(z):
            p = mapping.inverse(probs[i], is_mask=False)          # (K, H, W), linear interpolation
            out[i] = (p[0] > self.threshold) if self.num_classes == 1 else p.argmax(axis=0)
        return largest_component(out) if self.keep_largest and out.size else out

    def prepare(self, image: np.ndarray, stats: dict[str, float] | None = None) -> tuple[np.ndarray, ResizeMapping]:
        """Scanner volume → training-grid inputs, exactly as training saw them (stats computed when not given)."""
        if stats is None:
            stats = intensity_stats(image, self.modality)
        return prepare_volume(image, stats, self.modality, self.size, self.norm)

    def predict_volume_slicewise(self, image: np.ndarray, stats: dict[str, float] | None = None) -> np.ndarray:
        """Reference / baseline: one slice per forward pass through the same normalize/resize/model path."""
        inputs, mapping = self.prepare(image, stats)
        t = torch.from_numpy(inputs)
        probs = np.stack([self.probabilities(context_inputs(t, z, z + 1, self.context))[0].cpu().numpy()
                          for z in range(inputs.shape[0])]) if inputs.shape[0] else np.zeros((0, 1, self.size, self.size), np.float32)
        return self.labels_from_probs(probs, mapping)

    def png_values(self, labels: np.ndarray, label_value: int) -> np.ndarray:
        """Class labels → CHAOS PNG gray values (binary: ``label_value``; multi-class: 63 × class)."""
        if self.num_classes == 1:
            return (labels > 0).astype(np.uint8) * np.uint8(label_value)
        return (labels.astype(np.uint16) * CHAOS_GRAY_STEP).clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Inputs: CHAOS trees, generic DICOM trees, the store
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaseSpec:
    """One case to predict: small and picklable (the DataLoader sends it to a worker)."""

    case_id: str
    kind: str                              # dicom | store
    root: str                              # input root; source names are relative to it
    files: tuple[str, ...] = ()            # DICOM files in slice order (dicom)
    mask_files: tuple[str, ...] | None = None
    modality: str = ""                     # what the folder/series says (checked against the model)
    labels: str = "liver"
    slices: int = 0                        # expected number of slices (progress only)
    fingerprint: str = ""                  # input fingerprint


@dataclass
class Cohort:
    """The cases of one input and the cases that failed before prediction (with reasons)."""

    kind: str
    cases: list[CaseSpec]
    failures: list[dict[str, str]] = field(default_factory=list)


def stat_fingerprint(paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> str:
    """SHA-256 over each source file's name relative to the input root, size and mtime (cheap; no content read)."""
    h = hashlib.sha256(b"dlseg-predict-input:stat:v1\n")
    for p in paths:
        st = os.stat(p)
        h.update(f"{Path(os.path.relpath(p, root)).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def detect_kind(path: Path) -> str:
    """store when ``zarr.json`` is at the root; chaos when Train_Sets/Test_Sets/CT/MR folders exist; else dicom."""
    if (path / "zarr.json").is_file():
        return "store"
    from dlseg.sources.layout import source_sets
    from dlseg.errors import UsageError
    try:
        source_sets(path)
        return "chaos"
    except UsageError:
        return "dicom"


def chaos_cohort(root: Path, meta: dict[str, Any]) -> Cohort:
    """Cases of the model's sequence in a CHAOS tree (Train_Sets and/or Test_Sets), ordered by the layout rules."""
    from dlseg.sources.layout import discover

    sequence = meta.get("sequence") or "all"
    cases, failures = discover(root, sequence, meta["labels"])
    specs = []
    for c in cases:
        if c.modality.upper() != str(meta["modality"]).upper():
            continue
        files = tuple(str(p) for p in c.image_files)
        specs.append(CaseSpec(
            case_id=c.case_id, kind="dicom", root=str(root), files=files,
            mask_files=tuple(str(p) for p in c.mask_files) if c.mask_files is not None else None,
            modality=c.modality, labels=meta["labels"], slices=len(files),
            fingerprint=stat_fingerprint(c.image_files, root),
        ))
    fails = [{"case_id": f.case_id, "reason": f"{f.path}: {f.reason}"} for f in failures]
    return Cohort("chaos", specs, fails)


def series_case_id(modality: str, uid: str) -> str:
    """Identifier-free case id of a generic series: modality + a short hash of its SeriesInstanceUID."""
    digest = hashlib.sha256(uid.encode()).hexdigest()[:12]
    return sanitize_case_id(f"{modality or 'XX'}-series-{digest}")


def dicom_cohort(root: Path, meta: dict[str, Any]) -> Cohort:
    """Every image series under ``root`` (grouped by SeriesInstanceUID, ordered along the slice normal)."""
    from dlseg.sources.dicom import find_series

    specs, fails = [], []
    want = str(meta["modality"]).upper()
    for s in find_series(root):
        cid = series_case_id(s.modality, s.uid)
        if s.modality.upper() != want:
            fails.append({"case_id": cid, "reason": f"series is {s.modality or 'of unknown modality'}, "
                                                    f"the model expects {want}"})
            continue
        files = tuple(str(p) for p in s.files)
        specs.append(CaseSpec(case_id=cid, kind="dicom", root=str(root), files=files, modality=s.modality,
                              labels=meta["labels"], slices=len(files),
                              fingerprint=stat_fingerprint(s.files, root)))
    return Cohort("dicom", specs, fails)


def store_cohort(root: Path, meta: dict[str, Any], split: str | None) -> Cohort:
    """Cases of one split of a dlseg store (default: all); the store's content fingerprint identifies each."""
    store = Store(root)
    specs, fails = [], []
    want = str(meta["modality"]).upper()
    for cid in store.split_cases(split or "all"):
        attrs = store.info(cid).attrs
        if str(attrs.get("modality", "")).upper() != want:
            fails.append({"case_id": cid, "reason": f"case is {attrs.get('modality')}, the model expects {want}"})
            continue
        specs.append(CaseSpec(case_id=cid, kind="store", root=str(root), modality=attrs.get("modality", ""),
                              labels=meta["labels"], slices=int(attrs["shape"][0]),
                              fingerprint="store:" + str(attrs.get("fingerprint", ""))))
    return Cohort("store", specs, fails)


def find_cohort(cfg: PredictConfig, meta: dict[str, Any]) -> Cohort:
    """The cases of ``cfg.input`` for this model (raises ConfigError / UsageError / StoreError when unusable)."""
    root = Path(cfg.input)
    if not root.exists():
        raise ConfigError(f"--input {cfg.input}: no such file or folder")
    kind = detect_kind(root) if cfg.input_kind == "auto" else cfg.input_kind
    if cfg.split is not None and kind != "store":
        raise ConfigError(f"--split {cfg.split}: only a dlseg store input has splits ({cfg.input} is a {kind} input)")
    if kind == "store":
        cohort = store_cohort(root, meta, cfg.split)
    elif kind == "chaos":
        cohort = chaos_cohort(root, meta)
    else:
        cohort = dicom_cohort(root, meta)
    if not cohort.cases and not cohort.failures:
        raise ConfigError(f"--input {cfg.input}: no {meta['modality']} cases found ({kind} input)")
    return cohort


# ----------------------------------------------------------------------------------------------------------------
# Loading one case (runs in DataLoader workers)
# ----------------------------------------------------------------------------------------------------------------

def _identity(item: Any) -> Any:
    """collate_fn for one case per item (keeps dicts and objects as they are)."""
    return item


class CaseDataset(Dataset):
    """Map-style dataset of cases: item i is case i read, decoded and normalized (or its failure reason)."""

    def __init__(self, specs: list[CaseSpec], predictor_meta: dict[str, Any], want_image: bool):
        self.specs = specs
        self.modality = str(predictor_meta["modality"]).upper()
        self.size = int(predictor_meta["train_size"])
        self.norm = NormConfig.from_dict(predictor_meta["normalization"])
        self.want_image = want_image
        self._stores: dict[str, Store] = {}

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        spec = self.specs[i]
        t0 = time.perf_counter()
        try:
            item = self._load(spec)
        except Exception as e:  # one unreadable case fails alone; its reason goes to the summary
            return {"ok": False, "spec": spec, "reason": _reason(e)}
        item["load_s"] = time.perf_counter() - t0
        return item

    def _store(self, root: str) -> Store:
        """A Store opened once per worker process."""
        if root not in self._stores:
            self._stores[root] = Store(root)
        return self._stores[root]

    def _load(self, spec: CaseSpec) -> dict[str, Any]:
        """Read the case, compute its inputs; keep the image and truth only when overlays need them."""
        if spec.kind == "store":
            store = self._store(spec.root)
            attrs = store.info(spec.case_id).attrs
            image, truth = store.read_case(spec.case_id, mask=self.want_image)
            stats = attrs["stats"]          # what preprocessing computed with intensity_stats (and training used)
            geometry = {"spacing": attrs["spacing"], "origin": attrs["origin"], "direction": attrs["direction"]}
            sources = list(attrs["source_files"])
        else:
            from dlseg.sources.dicom import read_series
            volume = read_series(list(spec.files))
            image = volume.image
            stats = intensity_stats(image, self.modality)
            geometry = {"spacing": list(volume.spacing), "origin": list(volume.origin),
                        "direction": list(volume.direction)}
            sources = [Path(os.path.relpath(p, spec.root)).as_posix() for p in volume.files]
            truth = self._truth(spec, volume) if self.want_image else None
        if image.shape[0] == 0:
            raise ValueError("series has no slices")
        inputs, mapping = prepare_volume(image, stats, self.modality, self.size, self.norm)
        return {
            "ok": True, "spec": spec, "inputs": torch.from_numpy(inputs), "mapping": mapping,
            "geometry": geometry, "sources": sources, "stats": stats,
            "image": image if self.want_image else None, "truth": truth,
        }

    @staticmethod
    def _truth(spec: CaseSpec, volume) -> np.ndarray | None:
        """Ground-truth labels aligned with the decoded slices, when the case has them."""
        if spec.mask_files is None:
            return None
        from dlseg.sources.masks import read_masks
        by_image = dict(zip((str(Path(f)) for f in spec.files), spec.mask_files))
        files = [by_image[str(p)] for p in volume.files]
        truth = read_masks(files, spec.modality, spec.labels)
        if truth.shape != volume.image.shape:
            raise ValueError(f"ground truth {truth.shape} does not match the image {volume.image.shape} (overlays)")
        return truth


def _reason(e: BaseException) -> str:
    """One-line failure reason (CaseError/StoreError already read 'path: reason')."""
    from dlseg.errors import CaseError, one_line
    if isinstance(e, (CaseError, StoreError, ConfigError)):
        return one_line(e)
    return one_line(f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------------------------
# Writing one case (runs in writer threads)
# ----------------------------------------------------------------------------------------------------------------

def slice_names(n: int) -> list[str]:
    """``slice_0000.png`` … zero-padded so that a lexicographic sort is slice order."""
    width = max(4, len(str(max(n - 1, 0))))
    return [f"slice_{i:0{width}d}.png" for i in range(n)]


def nifti_affine(spacing: Iterable[float], origin: Iterable[float], direction: Iterable[float]) -> np.ndarray:
    """RAS affine for a volume stored as (x=column, y=row, z=slice) from DICOM geometry (LPS)."""
    dz, dy, dx = (float(v) for v in spacing)
    d = np.asarray(list(direction), dtype=float).reshape(3, 3)   # rows: row axis, column axis, slice axis
    lps = np.eye(4)
    lps[:3, 0] = d[0] * dx
    lps[:3, 1] = d[1] * dy
    lps[:3, 2] = d[2] * dz
    lps[:3, 3] = np.asarray(list(origin), dtype=float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_nifti(path: Path, labels: np.ndarray, geometry: dict[str, Any]) -> None:
    """``prediction.nii.gz``: labels as (x, y, z) uint8 with the affine from the DICOM geometry."""
    import nibabel as nib

    affine = nifti_affine(geometry["spacing"], geometry["origin"], geometry["direction"])
    img = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def display_slice(image: np.ndarray, stats: dict[str, float]) -> np.ndarray:
    """A scanner slice → uint8 gray for overlays (window [p0.5, p99.5] of the case)."""
    lo, hi = float(stats["p0_5"]), float(stats["p99_5"])
    scaled = (np.asarray(image, np.float32) - lo) / max(hi - lo, 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def overlay_panel(gray: np.ndarray, truth: np.ndarray | None, pred: np.ndarray) -> np.ndarray:
    """image | ground truth (when known) | prediction, side by side; masks as filled colour + contour."""
    def paint(labels: np.ndarray) -> np.ndarray:
        bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        for c, color in OVERLAY_COLORS.items():
            m = (labels == c).astype(np.uint8)
            if not m.any():
                continue
            fill = bgr.copy()
            fill[m > 0] = color
            bgr = cv2.addWeighted(bgr, 0.65, fill, 0.35, 0)
            contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(bgr, contours, -1, color, 1)
        return bgr

    panels = [cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)]
    if truth is not None:
        panels.append(paint(truth))
    panels.append(paint(pred))
    sep = np.full((gray.shape[0], 2, 3), 255, np.uint8)
    out = [panels[0]]
    for p in panels[1:]:
        out += [sep, p]
    return np.concatenate(out, axis=1)


@dataclass
class RunIdentity:
    """What makes an existing case folder reusable: model, settings, and where it runs."""

    model_fingerprint: str
    settings: dict[str, Any]
    settings_fingerprint: str
    world_size: int
    rank: int


def write_case(out: Path, item: dict[str, Any], probs: np.ndarray, predictor: Predictor, cfg: PredictConfig,
               ident: RunIdentity, started: float) -> dict[str, Any]:
    """Post-process and write one case into a temporary folder, then rename it into place; returns its record."""
    spec: CaseSpec = item["spec"]
    labels = predictor.labels_from_probs(probs, item["mapping"])
    z = labels.shape[0]
    names = slice_names(z)
    tmp = out / f"{TMP_PREFIX}{spec.case_id}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        if "png" in cfg.formats:
            values = predictor.png_values(labels, cfg.label_value)
            for name, sl in zip(names, values):
                if not cv2.imwrite(str(tmp / name), sl, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
                    raise OSError(f"{tmp / name}: cannot write PNG")
        (tmp / SOURCES).write_text(json.dumps(dict(zip(names, item["sources"])), indent=1))
        if "npz" in cfg.formats:
            np.savez_compressed(tmp / "prediction.npz", mask=labels)
        if "nifti" in cfg.formats:
            write_nifti(tmp / "prediction.nii.gz", labels, item["geometry"])
        if cfg.overlays:
            (tmp / "overlays").mkdir()
            truth = item["truth"]
            for i, name in enumerate(names):
                panel = overlay_panel(display_slice(item["image"][i], item["stats"]),
                                      None if truth is None else truth[i], labels[i])
                cv2.imwrite(str(tmp / "overlays" / name), panel, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        spacing = [float(v) for v in item["geometry"]["spacing"]]
        voxel_ml = float(np.prod(spacing)) / 1000.0
        counts = np.bincount(labels.ravel(), minlength=max(predictor.num_classes, 2))
        record = {
            "case_id": spec.case_id, "status": "predicted", "slices": int(z), "shape": list(labels.shape),
            "spacing": spacing, "liver_volume_ml": round(float(counts[1]) * voxel_ml, 4),
            "foreground_slices": int((labels.reshape(z, -1) > 0).any(axis=1).sum()),
            "seconds": round(time.perf_counter() - started + item["load_s"], 4),
            "model_fingerprint": ident.model_fingerprint, "input_fingerprint": spec.fingerprint,
            "settings_fingerprint": ident.settings_fingerprint, "settings": ident.settings,
            "formats": list(cfg.formats), "world_size": ident.world_size, "rank": ident.rank,
        }
        if predictor.num_classes > 1:
            record["class_volumes_ml"] = {str(c): round(float(counts[c]) * voxel_ml, 4)
                                          for c in range(1, predictor.num_classes)}
        (tmp / RECORD).write_text(json.dumps(record, indent=1))   # last: a folder with a record is complete
        final = out / spec.case_id
        install_dir(tmp, final, final.with_name(f"{TMP_PREFIX}{final.name}-old-{uuid.uuid4().hex[:8]}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def write_failure(out: Path, case_id: str, reason: str, fingerprint: str = "") -> dict[str, Any]:
    """Record a failed case on disk (``.failed/<case>.json``) for the cohort summary; returns the row."""
    row = {"case_id": case_id, "status": "failed", "reason": reason, "input_fingerprint": fingerprint}
    folder = out / FAILED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"{case_id}.json", json.dumps(row).encode())
    return row


# ----------------------------------------------------------------------------------------------------------------
# Resume, summaries
# ----------------------------------------------------------------------------------------------------------------

def model_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of the exported weights file and its JSON."""
    d = resolve_model_dir(path)
    h = hashlib.sha256(b"dlseg-model\n")
    for name in (WEIGHTS, META):
        hash_file(h, d / name)
        h.update(b"\1")
    return h.hexdigest()


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """SHA-256 of the output-affecting settings (sorted JSON)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def read_record(folder: Path) -> dict[str, Any] | None:
    """A case folder's record, or None when absent or unreadable."""
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def is_done(out: Path, spec: CaseSpec, ident: RunIdentity) -> dict[str, Any] | None:
    """The existing record when the case is complete for this input, model and settings; else None."""
    rec = read_record(out / spec.case_id)
    if rec and rec.get("input_fingerprint") == spec.fingerprint and \
            rec.get("model_fingerprint") == ident.model_fingerprint and \
            rec.get("settings_fingerprint") == ident.settings_fingerprint:
        return rec
    return None


def clean_stale(out: Path, case_ids: Iterable[str]) -> int:
    """Remove the temporaries and failure notes of these cases left by an earlier (possibly killed) run.

    Only the given cases' own names are touched (``.tmp-<case>-<token>``, ``.failed/<case>.json`` and its
    temporary), so array tasks sharing ``out`` never delete another task's case in flight or its failure notes.
    """
    mine = set(case_ids)
    n = 0
    with os.scandir(out) as entries:
        for e in entries:
            m = TMP_CASE_RE.fullmatch(e.name)
            if m and m.group("case") in mine:
                shutil.rmtree(e.path, ignore_errors=True) if e.is_dir() else os.unlink(e.path)
                n += 1
    failed = out / FAILED_DIR
    if failed.is_dir():
        with os.scandir(failed) as entries:
            for e in entries:
                m = NOTE_TMP_RE.fullmatch(e.name)
                if (m and m.group("case") in mine) or (e.name.endswith(".json") and e.name[:-5] in mine):
                    os.unlink(e.path)
                    n += 1
    return n


SUMMARY_FIELDS = ("case_id", "status", "slices", "height", "width", "spacing_z", "spacing_y", "spacing_x",
                  "liver_volume_ml", "foreground_slices", "seconds", "reason")


def summary_row(rec: dict[str, Any], status: str) -> dict[str, Any]:
    """A flat summary row from a case record."""
    shape, spacing = rec["shape"], rec["spacing"]
    return {"case_id": rec["case_id"], "status": status, "slices": rec["slices"], "height": shape[1],
            "width": shape[2], "spacing_z": spacing[0], "spacing_y": spacing[1], "spacing_x": spacing[2],
            "liver_volume_ml": rec["liver_volume_ml"], "foreground_slices": rec["foreground_slices"],
            "seconds": rec["seconds"], "reason": ""}


def collect_rows(out: Path, fingerprints: dict[str, str], reused: set[str], early_failures: list[dict[str, str]],
                 ident: RunIdentity) -> list[dict[str, Any]]:
    """One row per case of this run (case id → input fingerprint), from the records and failure notes on disk."""
    rows = []
    for f in early_failures:
        rows.append({**{k: None for k in SUMMARY_FIELDS}, "case_id": f["case_id"], "status": "failed",
                     "reason": f["reason"]})
    for cid, fp in fingerprints.items():
        fail = out / FAILED_DIR / f"{cid}.json"
        rec = read_record(out / cid)
        if fail.is_file():
            note = json.loads(fail.read_text())
            rows.append({**{k: None for k in SUMMARY_FIELDS}, "case_id": cid, "status": "failed",
                         "reason": note.get("reason", "")})
        elif rec and (rec.get("input_fingerprint"), rec.get("model_fingerprint"), rec.get("settings_fingerprint")) \
                == (fp, ident.model_fingerprint, ident.settings_fingerprint):
            rows.append(summary_row(rec, "reused" if cid in reused else "predicted"))
        else:
            rows.append({**{k: None for k in SUMMARY_FIELDS}, "case_id": cid, "status": "failed",
                         "reason": "no record written (process ended early)"})
    return rows


def write_summary(out: Path, rows: list[dict[str, Any]], totals: dict[str, Any], stem: str = "summary") -> Path:
    """``STEM.csv`` and ``STEM.json`` (each written atomically); returns the CSV's path."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SUMMARY_FIELDS))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_FIELDS})
    atomic_write(out / f"{stem}.csv", buf.getvalue().encode())
    atomic_write(out / f"{stem}.json", json.dumps({**totals, "cases": rows}, indent=1).encode())
    return out / f"{stem}.csv"


def missing_shard_summaries(out: Path, shard: Shard) -> list[str]:
    """Names of the shard summaries of this array (same N) not yet in ``out``."""
    names = [f"{summary_stem(Shard(i, shard.count))}.json" for i in range(shard.count)]
    return [n for n in names if not (out / n).is_file()]


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class _Active:
    """A loaded case whose slices are being scheduled into batches."""

    item: dict[str, Any]
    inputs: torch.Tensor                 # (Z, S, S) on the device
    probs: np.ndarray                    # (Z, K, S, S) filled batch by batch
    started: float
    next_z: int = 0
    done_z: int = 0

    @property
    def z(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class LoopStats:
    """Throughput of one process's prediction loop."""

    cases: int = 0
    slices: int = 0
    batches: int = 0
    loop_s: float = 0.0                  # after the first case arrived
    wait_s: float = 0.0                  # blocked on the loader after the first case
    startup_s: float | None = None       # until the first case arrived (worker start + first read)
    write_wait_s: float = 0.0            # blocked because the writers were behind


class CohortRunner:
    """Runs one process's share of a cohort: loader → packed batches → background writers."""

    def __init__(self, predictor: Predictor, cfg: PredictConfig, out: Path, ident: RunIdentity):
        self.predictor, self.cfg, self.out, self.ident = predictor, cfg, out, ident
        self.stats = LoopStats()
        self.failures: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def loader(self, specs: list[CaseSpec]) -> DataLoader:
        """One case per item; workers prepare ``prefetch`` cases ahead each."""
        ds = CaseDataset(specs, self.predictor.meta, want_image=self.cfg.overlays)
        w = self.cfg.workers
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=w, collate_fn=_identity,
                          pin_memory=self.predictor.device.type == "cuda",
                          prefetch_factor=self.cfg.prefetch if w > 0 else None,
                          worker_init_fn=one_core if w > 0 else None,
                          # spawn: forking after OpenCV/OpenMP thread pools and the progress thread can hang workers
                          multiprocessing_context="spawn" if w > 0 else None)

    def run(self, specs: list[CaseSpec], progress=None, task=None) -> LoopStats:
        """Predict and write every case of ``specs``; failures are noted on disk and in ``self.failures``."""
        if not specs:
            return self.stats
        cfg, pred = self.cfg, self.predictor
        k = pred.num_classes
        active: deque[_Active] = deque()
        pending: set[Future] = set()
        gate = threading.BoundedSemaphore(cfg.max_pending_writes)
        it = iter(self.loader(specs))
        exhausted = False
        t_start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=cfg.write_threads, thread_name_prefix="dlseg-write") as pool:
            while True:
                while not exhausted and sum(a.z - a.next_z for a in active) < cfg.batch_size:
                    t0 = time.perf_counter()
                    item = next(it, None)
                    if self.stats.startup_s is None:      # worker start-up, not steady-state starvation
                        self.stats.startup_s = time.perf_counter() - t_start
                    else:
                        self.stats.wait_s += time.perf_counter() - t0
                    if item is None:
                        exhausted = True
                    elif not item["ok"]:
                        self._fail(item["spec"], item["reason"], progress, task)
                    else:
                        inputs = item.pop("inputs").to(pred.device, non_blocking=True)
                        active.append(_Active(item, inputs, np.empty((inputs.shape[0], k, pred.size, pred.size),
                                                                     np.float32), time.perf_counter()))
                if not active:
                    break
                self._step(active)
                while active and active[0].done_z == active[0].z:
                    a = active.popleft()
                    t0 = time.perf_counter()
                    gate.acquire()                         # back-pressure: at most max_pending_writes queued
                    self.stats.write_wait_s += time.perf_counter() - t0
                    fut = pool.submit(self._write, a)
                    pending.add(fut)
                    fut.add_done_callback(lambda f: (gate.release(), self._advance(f, progress, task)))
                pending = {f for f in pending if not f.done()}
            for f in list(pending):
                f.result()
        self.stats.loop_s = time.perf_counter() - t_start - (self.stats.startup_s or 0.0)
        return self.stats

    def _step(self, active: deque[_Active]) -> None:
        """One packed batch: take the next unscheduled slices of consecutive cases, forward, scatter back."""
        pred, b = self.predictor, self.cfg.batch_size
        segments, n = [], 0
        for a in active:
            take = min(b - n, a.z - a.next_z)
            if take > 0:
                segments.append((a, a.next_z, a.next_z + take))
                a.next_z += take
                n += take
            if n == b:
                break
        x = torch.cat([context_inputs(a.inputs, z0, z1, pred.context) for a, z0, z1 in segments])
        probs = pred.probabilities(x).cpu().numpy()
        off = 0
        for a, z0, z1 in segments:
            a.probs[z0:z1] = probs[off:off + z1 - z0]
            off += z1 - z0
            a.done_z += z1 - z0
        self.stats.batches += 1
        self.stats.slices += n

    def _write(self, a: _Active) -> tuple[str, dict[str, Any]]:
        """Writer thread: post-process and write a case, or note its failure."""
        spec = a.item["spec"]
        try:
            rec = write_case(self.out, a.item, a.probs, self.predictor, self.cfg, self.ident, a.started)
            return "ok", rec
        except Exception as e:
            return "failed", write_failure(self.out, spec.case_id, _reason(e), spec.fingerprint)

    def _advance(self, fut: Future, progress, task) -> None:
        """Done-callback: book the case and move the progress bar."""
        status, rec = fut.result()
        with self._lock:
            (self.records if status == "ok" else self.failures).append(rec)
            self.stats.cases += 1
            if progress is not None:
                progress.update(task, advance=rec.get("slices") or 0,
                                info=f"{self.stats.cases} cases, {len(self.failures)} failed")

    def _fail(self, spec: CaseSpec, reason: str, progress, task) -> None:
        """A case the loader could not read."""
        row = write_failure(self.out, spec.case_id, reason, spec.fingerprint)
        with self._lock:
            self.failures.append(row)
            self.stats.cases += 1
            if progress is not None:
                progress.update(task, advance=spec.slices, info=f"{self.stats.cases} cases, {len(self.failures)} failed")


def make_plan(cfg: PredictConfig, meta: dict[str, Any], out: Path, ident: RunIdentity) -> dict[str, Any]:
    """Main process: find the cohort (this shard's part), clean its stale temporaries, split into done and to-do."""
    from dlseg.errors import CaseError, UsageError
    try:
        shard = cfg.shard_part()
        cohort = find_cohort(cfg, meta)
        out.mkdir(parents=True, exist_ok=True)
    except (ConfigError, UsageError, StoreError, CaseError, OSError) as e:
        return {"error": str(e)}
    cases = cohort.cases if shard is None else shard.select(cohort.cases)
    early = cohort.failures if shard is None else shard.select(cohort.failures)
    clean_stale(out, [s.case_id for s in cases])
    done = {s.case_id: is_done(out, s, ident) for s in cases}
    return {"kind": cohort.kind, "todo": [s for s in cases if done[s.case_id] is None],
            "all": {s.case_id: s.fingerprint for s in cases},
            "reused": [c for c, r in done.items() if r is not None], "early": early,
            "cohort_total": len(cohort.cases) + len(cohort.failures)}


def process_state():
    """Accelerate's process state (MULTI_CPU when ``ACCELERATE_USE_CPU=true``); refuses a silently split launch."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_launch(state, f"; refusing to predict every case {os.environ.get('WORLD_SIZE')} times")
    return state


def predict_cohort(cfg: PredictConfig) -> dict[str, Any] | None:
    """Predict every case of ``cfg.input`` on all processes of the launch; the main process returns the summary.

    Raises ConfigError / ModelError / UsageError / StoreError (exit status 2) for unusable arguments.
    Returns None on non-main processes.
    """
    from accelerate.utils import broadcast_object_list, gather_object

    cfg.check()
    state = process_state()
    cfg = cfg.for_device(state.device)
    predictor = Predictor.load(cfg.model, device=state.device, tta=cfg.tta, threshold=cfg.threshold,
                               keep_largest=cfg.keep_largest, mixed_precision=cfg.mixed_precision)
    out = Path(cfg.out)
    settings = {**predictor.settings(), "label_value": cfg.label_value, "formats": sorted(cfg.formats),
                "overlays": cfg.overlays}
    ident = RunIdentity(model_fingerprint(cfg.model), settings, settings_fingerprint(settings),
                        state.num_processes, state.process_index)

    plan: list[Any] = [make_plan(cfg, predictor.meta, out, ident) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(plan, from_process=0)
    plan_d = plan[0]
    if "error" in plan_d:            # every rank stops with the main process's one-line reason
        raise ConfigError(plan_d["error"])
    mine = plan_d["todo"][state.process_index::state.num_processes]
    shard = cfg.shard_part()
    part = "" if shard is None else f"shard {shard.index}/{shard.count}: "
    shard_total = len(plan_d["all"]) + len(plan_d["early"])

    runner = CohortRunner(predictor, cfg, out, ident)
    console.print(f"predict: {part}{len(plan_d['all'])} of {plan_d['cohort_total']} {plan_d['kind']} cases "
                  f"({len(plan_d['reused'])} already done, {len(plan_d['early'])} unusable) on "
                  f"{state.num_processes} process(es), device {state.device}", highlight=False)
    if shard is not None and shard_total == 0:
        console.print(f"[yellow]note:[/] shard {shard.index}/{shard.count} has no cases (the cohort has "
                      f"{plan_d['cohort_total']}, fewer than the {shard.count} shards): nothing to predict",
                      highlight=False)
    with make_progress("slices") as progress:
        task = progress.add_task(f"predict (rank {state.process_index}/{state.num_processes})",
                                 total=sum(s.slices for s in mine), info="")
        stats = runner.run(mine, progress, task)

    all_stats = gather_object([asdict(stats)]) if state.num_processes > 1 else [asdict(stats)]
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    rows = collect_rows(out, plan_d["all"], set(plan_d["reused"]), plan_d["early"], ident)
    slices = sum(s["slices"] for s in all_stats)
    loop_s = max((s["loop_s"] for s in all_stats), default=0.0)
    wait = sum(s["wait_s"] for s in all_stats) / max(sum(s["loop_s"] for s in all_stats), 1e-9)
    totals = {
        "cases_total": len(rows), "predicted": sum(r["status"] == "predicted" for r in rows),
        "reused": sum(r["status"] == "reused" for r in rows), "failed": sum(r["status"] == "failed" for r in rows),
        "world_size": state.num_processes, "slices_predicted": slices,
        "images_per_s": round(slices / loop_s, 2) if loop_s > 0 else None,
        "data_wait_fraction": round(wait, 4),
        "write_wait_fraction": round(sum(s["write_wait_s"] for s in all_stats)
                                     / max(sum(s["loop_s"] for s in all_stats), 1e-9), 4),
        "startup_s": round(max((s["startup_s"] or 0.0 for s in all_stats), default=0.0), 3),
        "model_fingerprint": ident.model_fingerprint,
        "settings": settings, "input_kind": plan_d["kind"], "cohort_cases": plan_d["cohort_total"],
        "shard": None if shard is None else {"index": shard.index, "count": shard.count},
    }
    path = write_summary(out, rows, totals, summary_stem(shard))
    report(totals, rows, cfg, path)
    if shard is not None and not missing_shard_summaries(out, shard):
        console.print(f"all {shard.count} shard summaries are in {out}; for one summary.csv of the whole cohort, run "
                      f"the same command without --shard (it reuses every complete case)", highlight=False)
    return {**totals, "cases": rows}


def report(totals: dict[str, Any], rows: list[dict[str, Any]], cfg: PredictConfig, summary: Path) -> None:
    """Final lines: counts, throughput, data-wait fraction (with a hint when high), failures."""
    console.print(
        f"predicted {totals['predicted']}, reused {totals['reused']}, failed {totals['failed']} of "
        f"{totals['cases_total']} cases on {totals['world_size']} process(es); "
        f"{totals['slices_predicted']} slices at {totals['images_per_s'] or 0:.1f} images/s; "
        f"waiting for data {100 * totals['data_wait_fraction']:.1f}% of the time after a "
        f"{totals['startup_s']:.1f} s start", highlight=False)
    if totals["slices_predicted"] and totals["data_wait_fraction"] > cfg.wait_warning:
        console.print(f"[yellow]note:[/] the model waited for data {100 * totals['data_wait_fraction']:.0f}% of "
                      f"the time; more --workers (now {cfg.workers}) would keep it busier", highlight=False)
    if totals["slices_predicted"] and totals["write_wait_fraction"] > cfg.wait_warning:
        console.print(f"[yellow]note:[/] the model waited for the writers {100 * totals['write_wait_fraction']:.0f}% "
                      f"of the time; more --write-threads (now {cfg.write_threads}) or fewer --format/--overlays "
                      f"would keep it busier", highlight=False)
    for r in rows:
        if r["status"] == "failed":
            console.print(f"[red]failed[/] {r['case_id']}: {r['reason']}", highlight=False, soft_wrap=True)
    console.print(f"summary: {summary}", highlight=False)


def slicewise_baseline(predictor: Predictor, files: list[str | os.PathLike], out_dir: str | os.PathLike,
                       label_value: int = 63) -> int:
    """The article's way, for the benchmark: read a series, then one slice per forward pass and one PNG per slice."""
    from dlseg.sources.dicom import read_series

    volume = read_series(files)
    labels = predictor.predict_volume_slicewise(volume.image)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = predictor.png_values(labels, label_value)
    for name, sl in zip(slice_names(len(values)), values):
        cv2.imwrite(str(out / name), sl)
    return int(labels.shape[0])
