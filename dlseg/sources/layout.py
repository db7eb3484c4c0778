"""Finding CHAOS cases under a source folder and pairing DICOM slices with ground-truth PNGs.

Order and pairing come from file names, never from DICOM position tags (sorting CHAOS CT by
ImagePositionPatient silently mis-pairs slices with masks):

1. images and masks are sorted in natural numeric file-name order;
2. when every image has a mask with the identical stem, they pair by stem (``order="stem"``);
3. otherwise, when the counts are equal, they pair by position (``order="position"``);
4. otherwise the case fails, naming both counts.

Unlabeled cases (``Test_Sets/``) keep the natural name order (``order="name"``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dlseg.store import sanitize_case_id

from dlseg.errors import CaseError, Failure, UsageError
from dlseg.sources.dicom import split_image_files
from dlseg.sources.files import natural_sorted

MODALITIES = ("t1-in", "t1-out", "t2", "ct", "all")
LABELS = ("liver", "organs")


@dataclass(frozen=True)
class SequenceLayout:
    """Where one sequence lives inside a patient folder of the CHAOS layout."""

    sequence: str           # ct | t1-in | t1-out | t2
    modality: str           # CT | MR
    image_dir: tuple[str, ...]
    ground_dir: tuple[str, ...]
    suffix: str             # case-id suffix ("" for CT)


SEQUENCE_LAYOUTS = {
    "ct": SequenceLayout("ct", "CT", ("DICOM_anon",), ("Ground",), ""),
    "t1-in": SequenceLayout("t1-in", "MR", ("T1DUAL", "DICOM_anon", "InPhase"), ("T1DUAL", "Ground"), "T1in"),
    "t1-out": SequenceLayout("t1-out", "MR", ("T1DUAL", "DICOM_anon", "OutPhase"), ("T1DUAL", "Ground"), "T1out"),
    "t2": SequenceLayout("t2", "MR", ("T2SPIR", "DICOM_anon"), ("T2SPIR", "Ground"), "T2"),
}


@dataclass
class CaseSource:
    """One case found on disk: its identity and its files in slice order (masks paired to images)."""

    case_id: str
    patient: str
    modality: str                       # CT | MR
    sequence: str                       # ct | t1-in | t1-out | t2
    group: str                          # train (Train_Sets) | test (Test_Sets, unlabeled)
    root: Path                          # relative file names are relative to this folder
    image_files: list[Path]
    mask_files: list[Path] | None
    order: str                          # stem | position | name (NIfTI: dataset | stem)
    notes: list[str] = field(default_factory=list)
    kind: str = "dicom"                 # dicom | nifti (dlseg.sources.nifti)
    label_values: dict[int, int] | None = None   # nifti: declared label value → store value
    slices: int | None = None           # nifti: slice count from the header (progress); dicom: one per file

    @property
    def subject(self) -> str:
        """The split unit: ``MR-5`` / ``CT-3`` (CHAOS numbers CT and MR patients independently)."""
        return f"{self.modality}-{self.patient}"

    @property
    def slice_count(self) -> int:
        return self.slices if self.slices is not None else len(self.image_files)

    @property
    def labeled(self) -> bool:
        return self.mask_files is not None

    def relative(self, paths: list[Path] | None) -> list[str] | None:
        """File names relative to ``root`` (POSIX style), as recorded in the store."""
        if paths is None:
            return None
        return [Path(os.path.relpath(p, self.root)).as_posix() for p in paths]


def case_id_for(patient: str, layout: SequenceLayout, group: str) -> str:
    """``CT-3``, ``MR-5-T1in``; test cases ``CT-test-3``, ``MR-test-5-T1in``."""
    parts = [layout.modality] + (["test"] if group == "test" else []) + [patient]
    if layout.suffix:
        parts.append(layout.suffix)
    return sanitize_case_id("-".join(parts))


def dicom_candidates(folder: Path) -> list[Path]:
    """Files of a DICOM folder that may be DICOM (``*.dcm`` or no suffix, not hidden), natural order."""
    return natural_sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (".dcm", ".dicom", "")
    )


def png_files(folder: Path) -> list[Path]:
    """Ground-truth PNGs of a folder, natural order."""
    return natural_sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def pair_by_name(images: list[Path], masks: list[Path]) -> tuple[list[Path], str] | None:
    """Masks in image order and the rule used, or None when neither stem nor position pairing applies."""
    by_stem = {m.stem: m for m in masks}
    if images and all(p.stem in by_stem for p in images):
        return [by_stem[p.stem] for p in images], "stem"
    if len(images) == len(masks):
        return list(masks), "position"
    return None


def source_sets(src: Path) -> list[tuple[Path, str]]:
    """The folders holding ``CT/``/``MR/`` under SRC, each with its group (train | test)."""
    if not src.is_dir():
        raise UsageError(f"{src}: no such folder")
    sets = [(src / name, group) for name, group in (("Train_Sets", "train"), ("Test_Sets", "test"))
            if (src / name).is_dir()]
    if sets:
        return sets
    if (src / "CT").is_dir() or (src / "MR").is_dir():
        return [(src, "test" if src.name == "Test_Sets" else "train")]
    raise UsageError(
        f"{src}: unknown layout (expected Train_Sets/, Test_Sets/, or CT/ and/or MR/ patient folders inside)"
    )


def discover(src: str | os.PathLike, modality: str = "t1-in", labels: str = "liver") -> tuple[list[CaseSource], list[Failure]]:
    """All cases of the requested sequence(s) under SRC, plus the cases that cannot be paired."""
    if modality not in MODALITIES:
        raise UsageError(f"--modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    if labels not in LABELS:
        raise UsageError(f"--labels {labels!r}: expected one of {', '.join(LABELS)}")
    src = Path(src)
    wanted = list(SEQUENCE_LAYOUTS) if modality == "all" else [modality]
    cases: list[CaseSource] = []
    failures: list[Failure] = []
    for set_dir, group in source_sets(src):
        for seq in wanted:
            layout = SEQUENCE_LAYOUTS[seq]
            mod_dir = set_dir / layout.modality
            if not mod_dir.is_dir():
                continue
            for patient_dir in natural_sorted(p for p in mod_dir.iterdir() if p.is_dir()):
                try:
                    cases.append(find_case(set_dir, patient_dir, layout, group))
                except CaseError as e:
                    subject = f"{layout.modality}-{patient_dir.name}" if group == "train" else None
                    failures.append(Failure(case_id_for(patient_dir.name, layout, group), e.path, e.reason, subject))
    if not cases and not failures:
        raise UsageError(f"{src}: no {modality} cases found (looked for CT/<patient>/ and MR/<patient>/ folders)")
    return cases, failures


def find_case(root: Path, patient_dir: Path, layout: SequenceLayout, group: str) -> CaseSource:
    """One patient's case of one sequence: list, order and pair its files (raises CaseError)."""
    image_dir = patient_dir.joinpath(*layout.image_dir)
    if not image_dir.is_dir():
        raise CaseError(image_dir, "missing DICOM folder")
    images = dicom_candidates(image_dir)
    if not images:
        raise CaseError(image_dir, "no DICOM files in folder")
    patient = patient_dir.name if group == "train" else f"test-{patient_dir.name}"
    case = CaseSource(
        case_id=case_id_for(patient_dir.name, layout, group), patient=patient, modality=layout.modality,
        sequence=layout.sequence, group=group, root=root, image_files=images, mask_files=None, order="name",
    )
    if group == "test":
        return case
    ground_dir = patient_dir.joinpath(*layout.ground_dir)
    if not ground_dir.is_dir():
        raise CaseError(ground_dir, "missing Ground folder (ground-truth PNGs)")
    masks = png_files(ground_dir)
    if not masks:
        raise CaseError(ground_dir, "no ground-truth PNGs in folder")
    paired = pair_by_name(images, masks)
    if paired is None:
        paired = pair_without_non_images(case, masks)
    if paired is None:
        raise CaseError(
            patient_dir,
            f"cannot pair {len(images)} DICOM files in {'/'.join(layout.image_dir)} with {len(masks)} PNGs in "
            f"{'/'.join(layout.ground_dir)} (stems differ and counts differ)",
        )
    case.mask_files, case.order = paired
    if len(case.mask_files) < len(masks):
        case.notes.append(f"{len(masks) - len(case.mask_files)} ground-truth PNGs have no DICOM slice and are unused")
    return case


def pair_without_non_images(case: CaseSource, masks: list[Path]) -> tuple[list[Path], str] | None:
    """Retry pairing after dropping non-image DICOM objects (SR, RT, presentation states) from the folder."""
    images, skipped = split_image_files(case.image_files)
    if not skipped:
        return None
    paired = pair_by_name(images, masks)
    if paired is not None:
        case.image_files = images
        case.notes.append(f"skipped {len(skipped)} non-image DICOM file(s): {', '.join(p.name for p in skipped)}")
    return paired
