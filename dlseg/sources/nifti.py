"""NIfTI datasets: the Medical Segmentation Decathlon and nnU-Net raw layouts as cases, and folders of NIfTI files.

- MSD: ``dataset.json`` with ``training`` ({image, label} pairs), ``test`` (images), ``labels`` (value → name) and
  ``modality`` (channel → name); ``imagesTr/``, ``labelsTr/``, ``imagesTs/``. nnU-Net v1 (MSD-style JSON, images
  named ``<case>_0000.nii.gz``) reads the same.
- nnU-Net v2: ``dataset.json`` with ``channel_names`` (channel → name), ``labels`` (name → value) and
  ``file_ending``; ``imagesTr/<case>_0000<ending>``, ``labelsTr/<case><ending>``, ``imagesTs/``.

A case is one image (single channel), its id the file stem (nnU-Net's ``_0000`` dropped, sanitized); the patient
is the case. Modality: a channel named CT is ``CT`` (sequence ``ct``), anything else (MRI, MR, T2 …) ``MR``
(sequence ``mr``). ``--labels all`` (or ``organs``) keeps the whole label map (its values must be 0..K-1); a
structure name (``liver``, case and ``_``/space insensitive) keeps that one as label 1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlseg.errors import CaseError, Failure, UsageError
from dlseg.fileio import read_json_object
from dlseg.sources.files import natural_sorted
from dlseg.sources.layout import CaseSource, discover
from dlseg.sources.masks import label_map
from dlseg.sources.nifti_volume import canonical_slices, is_nifti, nifti_stem
from dlseg.store import sanitize_case_id

DATASET_JSON = "dataset.json"
WHOLE_MAP = ("all", "organs")
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>[0-9]{4})$")


@dataclass(frozen=True)
class NiftiDataset:
    """What ``dataset.json`` says: layout, label map, the one channel and its modality."""

    root: Path
    layout: str                 # msd | nnunet
    labels: dict[int, str]      # value → structure name
    channel: str                # the declared channel name (MRI, CT, T2 …)
    modality: str               # CT | MR
    file_ending: str            # nnunet: .nii.gz or .nii

    @property
    def sequence(self) -> str:
        return "ct" if self.modality == "CT" else "mr"


def is_dataset(src: str | os.PathLike) -> bool:
    """A folder holding ``dataset.json``."""
    return (Path(src) / DATASET_JSON).is_file()


def parse_labels(path: Path, labels: Any) -> dict[int, str]:
    """MSD ``{"0": "background"}`` or nnU-Net ``{"background": 0}`` → {value: name}."""
    if not isinstance(labels, dict) or not labels:
        raise UsageError(f"{path}: 'labels' must be a non-empty object")
    try:
        if all(isinstance(v, str) for v in labels.values()):
            out = {int(k): str(v) for k, v in labels.items()}
        elif all(isinstance(v, int) for v in labels.values()):
            out = {int(v): str(k) for k, v in labels.items()}
        else:
            raise UsageError(f"{path}: region-based labels (lists of values) are not supported")
    except ValueError:
        raise UsageError(f"{path}: 'labels' keys must be integers (MSD) or values integers (nnU-Net)") from None
    if 0 not in out or min(out) < 0:
        raise UsageError(f"{path}: 'labels' needs background 0 and no negative values (have {sorted(out)})")
    return out


def read_dataset(src: Path) -> NiftiDataset:
    """Parse ``dataset.json`` (UsageError for unusable or multi-channel datasets)."""
    path = src / DATASET_JSON
    doc = read_json_object(path)
    layout = "nnunet" if "channel_names" in doc else "msd"
    channels = doc.get("channel_names" if layout == "nnunet" else "modality")
    if not isinstance(channels, dict) or not channels:
        raise UsageError(f"{path}: no {'channel_names' if layout == 'nnunet' else 'modality'} object")
    if len(channels) > 1:
        raise UsageError(f"{path}: {len(channels)} input channels ({', '.join(map(str, channels.values()))}); "
                         "dlseg trains single-channel models")
    channel = str(next(iter(channels.values())))
    ending = str(doc.get("file_ending", ".nii.gz"))
    if not is_nifti("x" + ending):
        raise UsageError(f"{path}: file_ending {ending!r}: dlseg reads NIfTI (.nii.gz, .nii) only")
    return NiftiDataset(src, layout, parse_labels(path, doc.get("labels")), channel,
                        "CT" if channel.strip().upper() == "CT" else "MR", ending)


def structure_key(name: str) -> str:
    """``Right Kidney`` and ``right_kidney`` compare equal."""
    return re.sub(r"[\s_-]+", "_", name.strip().lower())


def select_labels(ds: NiftiDataset, labels: str) -> tuple[dict[int, int], dict[int, str]]:
    """(dataset value → store value for every declared value, store label map) for ``--labels``."""
    path = ds.root / DATASET_JSON
    if labels in WHOLE_MAP:
        values = sorted(ds.labels)
        if values != list(range(len(values))):
            raise UsageError(f"{path}: label values {values} are not 0..{len(values) - 1}; pick one structure "
                             "with --labels NAME")
        return {v: v for v in values}, dict(ds.labels)
    hits = [v for v, name in ds.labels.items() if v != 0 and structure_key(name) == structure_key(labels)]
    if not hits:
        names = ", ".join(n for v, n in sorted(ds.labels.items()) if v != 0)
        raise UsageError(f"--labels {labels!r}: {path} has no such structure (have: {names}; or 'all')")
    return {v: int(v == hits[0]) for v in ds.labels}, {0: ds.labels[0], 1: ds.labels[hits[0]]}


def resolve(root: Path, entry: Any, what: str) -> Path:
    """A dataset.json path (``./imagesTr/x.nii.gz``) under ``root``; nnU-Net v1's ``x_0000.nii.gz`` when only it
    exists."""
    if not isinstance(entry, str) or not entry:
        raise UsageError(f"{root / DATASET_JSON}: a {what} entry is not a file name: {entry!r}")
    path = root / entry
    channel0 = path.with_name(f"{nifti_stem(path)}_0000{path.name[len(nifti_stem(path)):]}")
    return channel0 if not path.exists() and channel0.exists() else path


def case_id_of(image: Path) -> str:
    """File stem without nnU-Net's channel suffix, sanitized."""
    stem = nifti_stem(image)
    m = CHANNEL_RE.match(stem)
    return sanitize_case_id(m.group("case") if m and m.group("channel") == "0000" else stem)


def msd_pairs(ds: NiftiDataset, doc: dict[str, Any]) -> list[tuple[Path, Path | None]]:
    """(image, label) of the ``training`` list, then (image, None) of the ``test`` list."""
    pairs: list[tuple[Path, Path | None]] = []
    for entry in doc.get("training") or []:
        if not isinstance(entry, dict):
            raise UsageError(f"{ds.root / DATASET_JSON}: a 'training' entry is not an object: {entry!r}")
        pairs.append((resolve(ds.root, entry.get("image"), "training image"),
                      resolve(ds.root, entry.get("label"), "training label")))
    for entry in doc.get("test") or []:
        image = entry.get("image") if isinstance(entry, dict) else entry
        pairs.append((resolve(ds.root, image, "test image"), None))
    return pairs


def channel_files(folder: Path, ending: str) -> dict[str, list[Path]]:
    """nnU-Net image files of a folder grouped by case: {case stem: [channel files]}."""
    out: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return out
    for p in natural_sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(ending)):
        m = CHANNEL_RE.match(p.name[: -len(ending)])
        if m:
            out.setdefault(m.group("case"), []).append(p)
    return out


def nnunet_pairs(ds: NiftiDataset) -> list[tuple[Path, Path | None]]:
    """(imagesTr/<case>_0000, labelsTr/<case>) pairs, then (imagesTs/<case>_0000, None)."""
    pairs: list[tuple[Path, Path | None]] = []
    for folder, labeled in (("imagesTr", True), ("imagesTs", False)):
        for case, files in channel_files(ds.root / folder, ds.file_ending).items():
            image = ds.root / folder / f"{case}_0000{ds.file_ending}"
            if len(files) > 1 or image not in files:
                raise UsageError(f"{ds.root / folder}: case {case} has channel files "
                                 f"{', '.join(p.name for p in files)}; dlseg trains single-channel models")
            pairs.append((image, ds.root / "labelsTr" / f"{case}{ds.file_ending}" if labeled else None))
    return pairs


def nifti_case(ds: NiftiDataset, image: Path, label: Path | None, values: dict[int, int]) -> CaseSource:
    """One case (raises CaseError when its files are missing or unreadable)."""
    for path in (image, label):
        if path is not None and not path.is_file():
            raise CaseError(path, "file listed in dataset.json not found" if ds.layout == "msd" else
                            "no label file for this image")
    cid = case_id_of(image)
    return CaseSource(
        case_id=cid, patient=cid, modality=ds.modality, sequence=ds.sequence,
        group="train" if label is not None else "test", root=ds.root, image_files=[image],
        mask_files=None if label is None else [label], order="dataset" if ds.layout == "msd" else "stem",
        kind="nifti", label_values=values, slices=canonical_slices(image),
    )


def discover_dataset(src: Path, labels: str) -> tuple[list[CaseSource], list[Failure], dict[int, str]]:
    """The cases of an MSD or nnU-Net dataset, the cases that cannot be read, and the store's label map."""
    ds = read_dataset(src)
    values, names = select_labels(ds, labels)
    pairs = msd_pairs(ds, read_json_object(src / DATASET_JSON)) if ds.layout == "msd" else nnunet_pairs(ds)
    cases: list[CaseSource] = []
    failures: list[Failure] = []
    seen: set[str] = set()
    for image, label in pairs:
        cid = case_id_of(image)
        subject = f"{ds.modality}-{cid}" if label is not None else None
        try:
            if cid in seen:
                raise CaseError(image, f"case id {cid} is already taken by another image")
            cases.append(nifti_case(ds, image, label, values))
        except CaseError as e:
            failures.append(Failure(cid, str(Path(e.path).relative_to(src) if Path(e.path).is_relative_to(src)
                                             else e.path), e.reason, subject))
        seen.add(cid)
    if not cases and not failures:
        where = "imagesTr/ has no <case>_0000 images" if ds.layout == "nnunet" else "dataset.json lists no cases"
        raise UsageError(f"{src}: no cases ({where})")
    return cases, failures, names


def discover_cases(src: str | os.PathLike, modality: str,
                   labels: str) -> tuple[list[CaseSource], list[Failure], dict[int, str]]:
    """A CHAOS tree or a NIfTI dataset (``dataset.json``): cases, failures and the store's label map."""
    if is_dataset(src):
        return discover_dataset(Path(src), labels)
    cases, failures = discover(src, modality, labels)
    return cases, failures, label_map(labels)


# ------------------------------------------------------------------------------------- prediction and evaluation

def nifti_files(path: Path) -> list[Path]:
    """A NIfTI file, or the NIfTI files of a folder (natural order)."""
    if path.is_file():
        return [path] if is_nifti(path) else []
    return natural_sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))


def is_nifti_input(path: Path) -> bool:
    """A NIfTI file or a folder holding some (``imagesTs/``, ``labelsTr/`` …)."""
    return path.exists() and bool(nifti_files(path))


def input_images(path: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """(case id, image) of a NIfTI file or folder, and (case id, reason) of images that cannot be cases.

    In a folder where every name ends in ``_NNNN`` (nnU-Net), ``_0000`` is the image and the suffix is dropped;
    another channel makes its case fail. A single file named ``*_0000`` loses the suffix too.
    """
    files = nifti_files(path)
    channels = [CHANNEL_RE.match(nifti_stem(p)) for p in files]
    found: dict[str, Path] = {}
    failed: list[tuple[str, str]] = []
    nnunet = bool(files) and all(channels) and (path.is_dir() or channels[0].group("channel") == "0000")
    for p, m in zip(files, channels):
        cid = sanitize_case_id(m.group("case") if nnunet else nifti_stem(p))
        if nnunet and m.group("channel") != "0000":
            failed.append((cid, f"{p.name}: channel {m.group('channel')}: dlseg predicts single-channel images"))
        elif cid in found:
            failed.append((cid, f"{p.name}: case id {cid} is already taken by {found[cid].name}"))
        else:
            found[cid] = p
    bad = {c for c, _ in failed}
    return [(c, p) for c, p in found.items() if c not in bad], failed


def header_slices(path: Path) -> int:
    """Canonical slice count from the header (progress only; 0 when unreadable: the case fails when read)."""
    try:
        return canonical_slices(path)
    except CaseError:
        return 0


def slice_sources(image: str, slices: int) -> list[str]:
    """What each canonical slice of a NIfTI case came from (``sources.json``): ``image.nii.gz#z=K``."""
    return [f"{image}#z={k}" for k in range(slices)]


def truth_value(folder: Path, structure: str = "liver") -> int:
    """The label value of ``structure`` in the ``dataset.json`` next to a labels folder, else 1."""
    path = folder.parent / DATASET_JSON
    if not path.is_file():
        return 1
    names = parse_labels(path, read_json_object(path).get("labels"))
    hits = [v for v, n in names.items() if v != 0 and structure_key(n) == structure_key(structure)]
    return hits[0] if hits else 1


def truth_label_names(folder: Path) -> dict[int, str]:
    """Value → name of a labels folder's ``dataset.json`` with the liver's value swapped to 1 (``liver_as_one``)."""
    path = folder.parent / DATASET_JSON
    if not path.is_file():
        return {0: "background", 1: "liver"}
    names = parse_labels(path, read_json_object(path).get("labels"))
    liver = truth_value(folder)
    return {swap_liver(v, liver): n for v, n in sorted(names.items())}


def swap_liver(value: int, liver: int) -> int:
    """Label ``value`` after the liver's value and 1 trade places (scores use 1 for the liver)."""
    return 1 if value == liver else liver if value == 1 else value


def liver_as_one(labels: np.ndarray, liver: int) -> np.ndarray:
    """``labels`` with the liver's value and 1 swapped, so the liver is 1 as in every other truth."""
    if liver == 1:
        return labels
    out = labels.copy()
    out[labels == liver], out[labels == 1] = 1, liver
    return out


def truth_cases(folder: Path) -> list[tuple[str, tuple[str, int]]]:
    """(case id, (label file, the liver's value)) of a ``labelsTr``/``labelsTs`` folder."""
    value = truth_value(folder)
    return [(case_id_of(p), (str(p), value)) for p in nifti_files(folder)]
