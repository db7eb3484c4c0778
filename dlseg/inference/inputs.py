"""What to predict: cohorts of CHAOS trees, generic DICOM trees, dlseg stores and NIfTI files, and the case loader."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dlseg.errors import CaseError, ConfigError, StoreError, UsageError, one_line
from dlseg.inference.privacy import SourceRefs
from dlseg.inference.records import stat_fingerprint
from dlseg.inference.report_html import preview_stack
from dlseg.inference.selection import SeriesChoice, select_series
from dlseg.normalize import NormConfig, intensity_stats, prepare_volume
from dlseg.sources.dicom import Volume, find_series, read_series
from dlseg.sources.layout import MODALITIES, discover, source_sets
from dlseg.sources.nifti import header_slices, input_images, is_dataset, is_nifti_input, slice_sources
from dlseg.sources.nifti_volume import read_volume
from dlseg.sources.masks import read_masks
from dlseg.store import Store
from dlseg.workers import one_core


@dataclass(frozen=True)
class CaseSpec:
    """One case to predict: small and picklable (the DataLoader sends it to a worker)."""

    case_id: str
    kind: str                              # dicom | store | nifti
    root: str                              # input root; source names are relative to it
    files: tuple[str, ...] = ()            # DICOM files in slice order (dicom); the image file (nifti)
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
    skipped: list[dict[str, str]] = field(default_factory=list)      # series not for this model (with reasons)
    selection: list[dict[str, Any]] = field(default_factory=list)    # generic DICOM: the selection table


def detect_kind(path: Path) -> str:
    """store when ``zarr.json`` is at the root; nifti for NIfTI files; chaos when Train_Sets/Test_Sets/CT/MR
    folders exist; else dicom."""
    if (path / "zarr.json").is_file():
        return "store"
    if is_nifti_input(path):
        return "nifti"
    if is_dataset(path):
        raise ConfigError(f"--input {path}: a NIfTI dataset; pass its imagesTs/ (or imagesTr/) folder")
    try:
        source_sets(path)
        return "chaos"
    except UsageError:
        return "dicom"


def chaos_cohort(root: Path, meta: dict[str, Any]) -> Cohort:
    """Cases of the model's sequence in a CHAOS tree (Train_Sets and/or Test_Sets), ordered by the layout rules."""
    sequence = meta.get("sequence")   # a model trained on NIfTI (sequence mr) predicts every MR sequence
    cases, failures = discover(root, sequence if sequence in MODALITIES else "all", meta["labels"])
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


def dicom_cohort(root: Path, meta: dict[str, Any], choice: SeriesChoice, salt: str) -> Cohort:
    """The series under ``root`` that the selection rules (or the override flags) choose for this model."""
    specs, skipped = [], []
    decisions = select_series(find_series(root), meta, choice, salt)
    for d in decisions:
        if not d.predict:
            skipped.append({"case_id": d.case_id, "reason": d.reason})
            continue
        files = tuple(str(p) for p in d.volume.files)
        specs.append(CaseSpec(case_id=d.case_id, kind="dicom", root=str(root), files=files,
                              modality=d.volume.first["modality"], labels=meta["labels"], slices=len(files),
                              fingerprint=stat_fingerprint(d.volume.files, root)))
    return Cohort("dicom", specs, [], skipped, [d.row() for d in decisions])


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


def nifti_cohort(path: Path, meta: dict[str, Any]) -> Cohort:
    """Every NIfTI image of a file or folder (``imagesTs/``, nnU-Net's ``_0000`` dropped from case ids)."""
    root = path if path.is_dir() else path.parent
    found, failed = input_images(path)
    specs = [CaseSpec(case_id=cid, kind="nifti", root=str(root), files=(str(p),), modality=str(meta["modality"]),
                      labels=meta["labels"], slices=header_slices(p), fingerprint=stat_fingerprint([p], root))
             for cid, p in found]
    return Cohort("nifti", specs, [{"case_id": cid, "reason": reason} for cid, reason in failed])


def find_cohort(input: str, input_kind: str, split: str | None, meta: dict[str, Any],
                choice: SeriesChoice = SeriesChoice(), salt: str = "") -> Cohort:
    """The cases of ``input`` for this model (raises ConfigError / UsageError / StoreError when unusable)."""
    root = Path(input)
    if not root.exists():
        raise ConfigError(f"--input {input}: no such file or folder")
    kind = detect_kind(root) if input_kind == "auto" else input_kind
    if split is not None and kind != "store":
        raise ConfigError(f"--split {split}: only a dlseg store input has splits ({input} is a {kind} input)")
    if kind == "store":
        cohort = store_cohort(root, meta, split)
    elif kind == "chaos":
        cohort = chaos_cohort(root, meta)
    elif kind == "nifti":
        cohort = nifti_cohort(root, meta)
    else:
        cohort = dicom_cohort(root, meta, choice, salt)
    if not cohort.cases and not cohort.failures and not cohort.skipped:
        raise ConfigError(f"--input {input}: no {meta['modality']} cases found ({kind} input)")
    return cohort


def failure_reason(e: BaseException) -> str:
    """One-line failure reason (CaseError/StoreError already read 'path: reason')."""
    if isinstance(e, (CaseError, StoreError, ConfigError)):
        return one_line(e)
    return one_line(f"{type(e).__name__}: {e}")


class CaseDataset(Dataset):
    """Map-style dataset of cases: item i is case i read, decoded and normalized (or its failure reason)."""

    def __init__(self, specs: list[CaseSpec], predictor_meta: dict[str, Any], want_image: bool,
                 refs: SourceRefs = SourceRefs(), want_preview: bool = False):
        self.specs, self.refs = specs, refs
        self.modality = str(predictor_meta["modality"]).upper()
        self.size = int(predictor_meta["train_size"])
        self.norm = NormConfig.from_dict(predictor_meta["normalization"])
        self.want_image = want_image        # overlays: the image and the ground truth
        self.want_preview = want_preview    # the report: thumbnail-sized display slices only
        self._stores: dict[str, Store] = {}

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        spec = self.specs[i]
        t0 = time.perf_counter()
        try:
            item = self._load(spec)
        except Exception as e:  # one unreadable case fails alone; its reason goes to the summary
            return {"ok": False, "spec": spec, "reason": self.refs.redact(failure_reason(e), spec.root, spec.files)}
        item["load_s"] = time.perf_counter() - t0
        return item

    def _store(self, root: str) -> Store:
        """A Store opened once per worker process."""
        if root not in self._stores:
            self._stores[root] = Store(root)
        return self._stores[root]

    def _read_store(self, spec: CaseSpec) -> tuple[np.ndarray, np.ndarray | None, dict, dict, list[str]]:
        """Image, truth, stats (as preprocessing computed them and training used), geometry and sources."""
        store = self._store(spec.root)
        attrs = store.info(spec.case_id).attrs
        image, truth = store.read_case(spec.case_id, mask=self.want_image)
        geometry = {"spacing": attrs["spacing"], "origin": attrs["origin"], "direction": attrs["direction"],
                    "nifti": attrs.get("nifti")}
        if geometry["nifti"]:   # one source file, named like the case id: name its slices
            return image, truth, attrs["stats"], geometry, slice_sources(attrs["source_files"][0], len(image))
        return image, truth, attrs["stats"], geometry, self.refs.slices(list(attrs["source_files"]), None)

    def _read_dicom(self, spec: CaseSpec) -> tuple[np.ndarray, np.ndarray | None, dict, dict, list[str]]:
        """Image, truth (for overlays), stats, geometry and sources of a DICOM series."""
        volume = read_series(list(spec.files))
        stats = intensity_stats(volume.image, self.modality)
        geometry = {"spacing": list(volume.spacing), "origin": list(volume.origin),
                    "direction": list(volume.direction)}
        paths = [Path(os.path.relpath(p, spec.root)).as_posix() for p in volume.files]
        sources = self.refs.slices(paths, volume.sop_uids)
        truth = self._truth(spec, volume) if self.want_image else None
        return volume.image, truth, stats, geometry, sources

    def _read_nifti(self, spec: CaseSpec) -> tuple[np.ndarray, np.ndarray | None, dict, dict, list[str]]:
        """Image in canonical (z, y, x) order, stats, geometry (with the source's, written back) and sources."""
        volume = read_volume(Path(spec.files[0]))
        geometry = {"spacing": volume.spacing, "origin": volume.origin, "direction": volume.direction,
                    "nifti": volume.geometry}
        source = Path(os.path.relpath(spec.files[0], spec.root)).as_posix()
        return (volume.data, None, intensity_stats(volume.data, self.modality), geometry,
                slice_sources(source, len(volume.data)))

    def _load(self, spec: CaseSpec) -> dict[str, Any]:
        """Read the case, compute its inputs; keep the image and truth only when overlays need them."""
        read = {"store": self._read_store, "nifti": self._read_nifti}.get(spec.kind, self._read_dicom)
        image, truth, stats, geometry, sources = read(spec)
        if image.shape[0] == 0:
            raise ValueError("series has no slices")
        inputs, mapping = prepare_volume(image, stats, self.modality, self.size, self.norm)
        return {
            "ok": True, "spec": spec, "inputs": torch.from_numpy(inputs), "mapping": mapping,
            "geometry": geometry, "sources": sources, "stats": stats,
            "image": image if self.want_image else None, "truth": truth,
            "preview": preview_stack(image, stats) if self.want_preview else None,
        }

    @staticmethod
    def _truth(spec: CaseSpec, volume: Volume) -> np.ndarray | None:
        """Ground-truth labels aligned with the decoded slices, when the case has them."""
        if spec.mask_files is None:
            return None
        by_image = dict(zip((str(Path(f)) for f in spec.files), spec.mask_files))
        files = [by_image[str(p)] for p in volume.files]
        truth = read_masks(files, spec.modality, spec.labels)
        if truth.shape != volume.image.shape:
            raise ValueError(f"ground truth {truth.shape} does not match the image {volume.image.shape} (overlays)")
        return truth


def _identity(item: Any) -> Any:
    """collate_fn for one case per item (keeps dicts and objects as they are)."""
    return item


def case_loader(specs: list[CaseSpec], meta: dict[str, Any], want_image: bool, workers: int, prefetch: int,
                pin_memory: bool, refs: SourceRefs = SourceRefs(), want_preview: bool = False) -> DataLoader:
    """One case per item; ``workers`` processes prepare ``prefetch`` cases ahead each."""
    return DataLoader(CaseDataset(specs, meta, want_image, refs, want_preview), batch_size=None, shuffle=False,
                      num_workers=workers, collate_fn=_identity, pin_memory=pin_memory,
                      prefetch_factor=prefetch if workers > 0 else None,
                      worker_init_fn=one_core if workers > 0 else None,
                      # spawn: forking after OpenCV/OpenMP thread pools and the progress thread can hang workers
                      multiprocessing_context="spawn" if workers > 0 else None)
