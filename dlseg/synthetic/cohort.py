"""The cohort: what to generate, which patients, and writing each patient's series into the CHAOS layout.

Every random number comes from ``numpy.random.SeedSequence([seed, modality, patient, is_test])`` and every UID
from ``pydicom.uid.generate_uid(entropy_srcs=…)``; nothing reads the clock, so the same seed gives the same bytes,
and a patient's files do not depend on how many other patients are generated.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.uid import generate_uid

from dlseg.errors import ConfigError
from dlseg.synthetic.anatomy import Anatomy, Grid, draw_anatomy
from dlseg.synthetic.dicom_writer import SeriesMeta, write_ground, write_series
from dlseg.synthetic.phantom import add_table, build_phantom
from dlseg.synthetic.render import Contrast, ct_ground, draw_contrast, mr_ground, render_ct, render_t1, render_t2
from dlseg.workers import spawn_pool

MODALITIES = ("mr", "ct", "both")
MR_SEQUENCES = ("t1-in", "t1-out", "t2")   # what an MR patient can have written (CT has its one series)
# Patient numbers of the real CHAOS training sets, extended with larger numbers; test patients get the
# smallest numbers not used for training. Gaps and two-digit ids exercise natural ordering.
CHAOS_MR_IDS = (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)
CHAOS_CT_IDS = (1, 2, 5, 6, 8, 10, 14, 16, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30)
UID_TAG = "dlseg-synthetic-v1"
MR_TAGS = {"MagneticFieldStrength": "1.5", "MRAcquisitionType": "2D", "ImagingFrequency": "63.9",
           "ImagedNucleus": "1H"}   # what every MR series shares


@dataclass(frozen=True)
class CohortSpec:
    """What to generate (validated)."""

    patients: int
    modality: str = "mr"
    seed: int = 0
    size_range: tuple[int, int] = (192, 256)
    slices_range: tuple[int, int] = (26, 36)
    test_patients: int = 0
    sequences: tuple[str, ...] = MR_SEQUENCES   # MR series to write; the others are still drawn, not written

    def __post_init__(self) -> None:
        """Reject values that cannot make a cohort (ConfigError naming the option)."""
        if self.modality not in MODALITIES:
            raise ConfigError(f"modality: {self.modality!r} is not one of {', '.join(MODALITIES)}")
        unknown = [q for q in self.sequences if q not in MR_SEQUENCES]
        if unknown or not self.sequences:
            raise ConfigError(f"sequences: {list(self.sequences)} must be a non-empty subset of "
                              f"{', '.join(MR_SEQUENCES)}")
        if self.patients < 1:
            raise ConfigError(f"patients: {self.patients} must be at least 1")
        if self.test_patients < 0:
            raise ConfigError(f"test_patients: {self.test_patients} must be 0 or more")
        lo, hi = self.size_range
        if not 32 <= lo <= hi <= 1024:
            raise ConfigError(f"size: ({lo}, {hi}) must satisfy 32 <= min <= max <= 1024")
        lo, hi = self.slices_range
        if not 6 <= lo <= hi <= 512:
            raise ConfigError(f"slices: ({lo}, {hi}) must satisfy 6 <= min <= max <= 512")


@dataclass(frozen=True)
class PatientJob:
    """One patient to write."""

    modality: str          # "CT" | "MR"
    patient: int
    test: bool
    spec: CohortSpec

    @property
    def folder(self) -> Path:
        """Path relative to the output root."""
        return Path("Test_Sets" if self.test else "Train_Sets") / self.modality / str(self.patient)

    def rng(self) -> np.random.Generator:
        """This patient's own random stream."""
        code = 1 if self.modality == "CT" else 0
        entropy = [self.spec.seed, code, self.patient, int(self.test)]
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def patient_ids(modality: str, train: int, test: int) -> tuple[list[int], list[int]]:
    """CHAOS-like patient numbers for the train and test sets of one modality."""
    base = CHAOS_CT_IDS if modality == "CT" else CHAOS_MR_IDS
    ids = list(base[:train]) + list(range(max(base) + 1, max(base) + 1 + max(0, train - len(base))))
    used = set(ids)
    free = (n for n in range(1, 10 ** 6) if n not in used)
    return ids, [next(free) for _ in range(test)]


def plan(spec: CohortSpec) -> list[PatientJob]:
    """Every patient of the cohort, CT first."""
    mods = {"mr": ["MR"], "ct": ["CT"], "both": ["CT", "MR"]}[spec.modality]
    jobs = []
    for mod in mods:
        train, test = patient_ids(mod, spec.patients, spec.test_patients)
        jobs += [PatientJob(mod, pid, False, spec) for pid in train]
        jobs += [PatientJob(mod, pid, True, spec) for pid in test]
    return jobs


def _draw_grid(rng: np.random.Generator, an: Anatomy, size_range: tuple[int, int], t: np.ndarray) -> Grid:
    """In-plane size (occasionally non-square, 8:9) and a pixel spacing whose field of view holds the body."""
    lo, hi = size_range
    rows = int(rng.integers(lo, hi + 1))
    cols = rows
    if rng.uniform() < 0.25 and round(rows * 9 / 8) <= hi:
        cols = round(rows * 9 / 8)
    smax = 1.0 + abs(an.taper) / 2
    need = max((2 * (an.a * smax + abs(an.cx)) + 24) / cols, (2 * (an.b * smax + abs(an.cy)) + 40) / rows)
    return Grid(rows, cols, round(float(need * rng.uniform(1.0, 1.12)), 4), t)


def _slice_t(n: int, offset: float = 0.0, span: float = 1.0) -> np.ndarray:
    """Slice centres in t for n slices covering ``offset .. offset + span``."""
    return (offset + (np.arange(n) + 0.5) / n * span).astype(np.float32)


def _uids(job: PatientJob, *parts: str) -> str:
    """A deterministic UID for this patient and the given parts."""
    return generate_uid(entropy_srcs=[UID_TAG, str(job.spec.seed), job.modality, str(job.patient), *parts])


def write_ct_patient(job: PatientJob, root: Path) -> int:
    """One CT patient (DICOM_anon + Ground); returns the number of slices."""
    rng = job.rng()
    an, contrast = draw_anatomy(rng), draw_contrast(rng)
    n = int(rng.integers(job.spec.slices_range[0], job.spec.slices_range[1] + 1))
    grid = _draw_grid(rng, an, job.spec.size_range, _slice_t(n))
    spacing = round(float(rng.uniform(4.0, 7.5)), 2)
    ph = build_phantom(an, grid)
    add_table(an, grid, ph.tissue)
    volume = render_ct(rng, ph, contrast)
    meta = SeriesMeta(
        "CT", f"SYN-CT-{job.patient:04d}", _uids(job, "study"), _uids(job, "series", "ct"), _uids(job, "frame"),
        int(rng.integers(2, 6)), "ABDOMEN PORTAL VENOUS", grid, round(float(rng.uniform(1400, 1800)), 1),
        spacing * n, spacing, spacing, (UID_TAG, str(job.spec.seed), "CT", str(job.patient)),
        extra={"KVP": "120", "ConvolutionKernel": "B", "WindowCenter": "50", "WindowWidth": "400",
               "ReconstructionDiameter": f"{grid.spacing * max(grid.rows, grid.cols):.1f}"},
    )
    write_series(root / "DICOM_anon", [f"i{k:04d},0000b.dcm" for k in range(n)], volume, meta, range(1, n + 1))
    if not job.test:
        write_ground(root / "Ground", [f"liver_GT_{k:03d}.png" for k in range(n)], ct_ground(ph.organ))
    return n


@dataclass(frozen=True)
class MRAcquisition:
    """Where an MR patient's T1-DUAL and T2-SPIR series sample it, and their series numbers."""

    grid1: Grid                   # T1-DUAL
    grid2: Grid                   # T2-SPIR
    spacing1: float               # slice spacing (mm)
    spacing2: float
    gap1: float                   # spacing - thickness (mm)
    gap2: float
    length: float                 # extent (mm) of t in [0, 1]
    z_top: float                  # z (mm) of t = 0
    s1: int                       # T1-DUAL series number
    s2: int                       # T2-SPIR series number


def _draw_mr_acquisition(rng: np.random.Generator, an: Anatomy, spec: CohortSpec) -> MRAcquisition:
    """Slice counts, grids (T2 on its own grid half of the time), spacings, gaps, position and series numbers."""
    lo, hi = spec.slices_range
    n1, n2 = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    grid1 = _draw_grid(rng, an, spec.size_range, _slice_t(n1))
    offset, span = float(rng.uniform(-0.02, 0.02)), float(rng.uniform(0.97, 1.03))
    grid2 = _draw_grid(rng, an, spec.size_range, _slice_t(n2, offset, span)) if rng.uniform() < 0.5 else \
        Grid(grid1.rows, grid1.cols, grid1.spacing, _slice_t(n2, offset, span))
    spacing1 = round(float(rng.uniform(5.5, 9.0)), 2)
    length = spacing1 * n1
    spacing2 = round(length * span / n2, 2)
    gap1, gap2 = float(rng.choice([0.0, 0.5, 1.0])), float(rng.choice([0.0, 0.5, 1.0]))
    z_top = round(float(rng.uniform(-60, 60)), 1)
    s2 = int(rng.choice([2, 3]))
    s1 = s2 + int(rng.choice([1, 2, 3]))
    return MRAcquisition(grid1, grid2, spacing1, spacing2, gap1, gap2, length, z_top, s1, s2)


def _mr_meta(job: PatientJob, acq: MRAcquisition, series: str, number: int, description: str, grid: Grid,
             spacing: float, gap: float, extra: dict) -> SeriesMeta:
    """One MR series' shared tags; ``series`` names it in its UIDs."""
    return SeriesMeta("MR", f"SYN-MR-{job.patient:04d}", _uids(job, "study"), _uids(job, "series", series),
                      _uids(job, "frame"), number, description, grid, acq.z_top, acq.length, spacing - gap, spacing,
                      (UID_TAG, str(job.spec.seed), "MR", str(job.patient), series), extra={**MR_TAGS, **extra})


def write_mr_patient(job: PatientJob, root: Path) -> int:
    """One MR patient (T1DUAL in/out phase + T2SPIR, each with Ground); returns the number of slices written.

    Only the series in ``spec.sequences`` are written. Everything up to T1 is drawn whatever is written (the
    random stream stays the same) and T2 comes last, so a written series has the same bytes with or without
    the others.
    """
    rng = job.rng()
    an, contrast = draw_anatomy(rng), draw_contrast(rng)
    acq = _draw_mr_acquisition(rng, an, job.spec)
    n_t1 = _write_t1(job, root, rng, an, contrast, acq)
    if "t2" not in job.spec.sequences:
        return n_t1
    return n_t1 + _write_t2(job, root, rng, an, contrast, acq)


def _write_t1(job: PatientJob, root: Path, rng: np.random.Generator, an: Anatomy, contrast: Contrast,
              acq: MRAcquisition) -> int:
    """The wanted T1-DUAL phases and their Ground (in-phase stems); returns the slices written."""
    wanted, grid, s1 = job.spec.sequences, acq.grid1, acq.s1
    n1 = len(grid.t)
    ph1 = build_phantom(an, grid)
    inphase, outphase = render_t1(rng, an, ph1, grid, contrast)
    t1 = {"ScanningSequence": "GR", "SequenceVariant": "SP", "RepetitionTime": "150", "FlipAngle": "70"}
    for phase, volume, te, echo, parity in (("InPhase", inphase, "4.6", 2, 2), ("OutPhase", outphase, "2.3", 1, 1)):
        if ("t1-in" if phase == "InPhase" else "t1-out") not in wanted:
            continue
        meta = _mr_meta(job, acq, phase, s1, f"T1 DUAL {phase.lower()}", grid, acq.spacing1, acq.gap1,
                        {**t1, "EchoTime": te, "EchoNumbers": echo})
        numbers = [2 * k + parity for k in range(n1)]
        write_series(root / "T1DUAL" / "DICOM_anon" / phase, [f"IMG-{s1:04d}-{m:05d}.dcm" for m in numbers],
                     volume, meta, numbers)
    n_t1 = n1 * sum(q in wanted for q in ("t1-in", "t1-out"))
    if n_t1 and not job.test:
        stems = [f"IMG-{s1:04d}-{2 * k + 2:05d}" for k in range(n1)]
        write_ground(root / "T1DUAL" / "Ground", [f"{s}.png" for s in stems], mr_ground(ph1.organ))
    return n_t1


def _write_t2(job: PatientJob, root: Path, rng: np.random.Generator, an: Anatomy, contrast: Contrast,
              acq: MRAcquisition) -> int:
    """T2-SPIR and its Ground (same stems); returns the slices written."""
    grid, s2 = acq.grid2, acq.s2
    n2 = len(grid.t)
    ph2 = build_phantom(an, grid)
    t2 = render_t2(rng, an, ph2, grid, contrast)
    meta = _mr_meta(job, acq, "T2SPIR", s2, "T2 SPIR", grid, acq.spacing2, acq.gap2,
                    {"ScanningSequence": "SE", "SequenceVariant": "SK", "RepetitionTime": "1600", "EchoTime": "80",
                     "EchoNumbers": 1, "FlipAngle": "90"})
    names2 = [f"IMG-{s2:04d}-{k + 1:05d}" for k in range(n2)]
    write_series(root / "T2SPIR" / "DICOM_anon", [f"{s}.dcm" for s in names2], t2, meta, range(1, n2 + 1))
    if not job.test:
        write_ground(root / "T2SPIR" / "Ground", [f"{s}.png" for s in names2], mr_ground(ph2.organ))
    return n2


def write_patient(job: PatientJob, out_dir: Path) -> int:
    """Write one patient in ``OUT_DIR/.synthetic-tmp/`` (which no CHAOS reader looks at), then move it into place.

    A run killed half-way leaves no partial patient folder; returns the patient's slice count.
    """
    final = out_dir / job.folder
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / ".synthetic-tmp"
    scratch.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{job.modality}-{job.patient}-", dir=scratch))
    try:
        n = (write_ct_patient if job.modality == "CT" else write_mr_patient)(job, tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            scratch.rmdir()
        except OSError:          # another run is still using it
            pass
    return n


def generate(out_dir, patients: int, modality: str = "mr", seed: int = 0,
             size_range: tuple[int, int] = (192, 256), slices_range: tuple[int, int] = (26, 36),
             test_patients: int = 0, sequences: Sequence[str] = MR_SEQUENCES, workers: int = 1) -> Path:
    """Write a synthetic CHAOS cohort under ``out_dir`` (Train_Sets/, and Test_Sets/ when test_patients > 0).

    ``patients`` and ``test_patients`` count per modality; ``sequences`` picks the MR series written (a series'
    bytes do not depend on it); ``workers`` > 1 writes patients in that many processes (same bytes). Patient
    folders of the same ids are replaced, others are left alone. Raises ConfigError for unusable values (before
    writing anything), OSError when writing fails. Returns ``out_dir``.
    """
    spec = CohortSpec(int(patients), modality, int(seed), (int(size_range[0]), int(size_range[1])),
                      (int(slices_range[0]), int(slices_range[1])), int(test_patients), tuple(sequences))
    if int(workers) < 1:
        raise ConfigError(f"workers: {workers} must be at least 1")
    out = Path(out_dir)
    jobs = plan(spec)
    if int(workers) == 1 or len(jobs) == 1:
        for job in jobs:
            write_patient(job, out)
        return out
    # spawned, one core each, gone with this process (dlseg.workers): the caller (e.g. the trainer) may hold
    # OpenMP/OpenCV thread pools that fork does not copy safely
    with spawn_pool(min(int(workers), len(jobs))) as pool:
        for _ in pool.map(write_patient, jobs, [out] * len(jobs)):
            pass
    return out
