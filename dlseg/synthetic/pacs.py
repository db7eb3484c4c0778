"""A PACS-like export: studies as hospitals send them, for testing series selection and privacy.

``generate_pacs(OUT)`` writes one folder per patient, named like a patient (``DOE^JANE``), each holding an MR
study (or a CT study) with the series a liver exam brings along::

    OUT/<patient name>/<study folder>/SE<number>/IM<k>.dcm
         localizer (3 slices)   T1 dual echo (two series, or both echoes in one series)   T2
         diffusion-like (EPI, two b-values)   secondary capture   T1 dynamic (two phases at the same positions)
         CT: topogram, portal-venous series, coronal MPR (derived)
    OUT/<patient name>/<study folder>/README.TXT   (not DICOM)

MR studies alternate 1.5 T and 3 T with vendor-like echo times (1.5 T: 2.38/4.76 ms, 3 T: 1.23/2.46 ms, so the
3 T in-phase TE sits at the 1.5 T opposed-phase TE). ``expected`` of each returned ``PacsVolume`` says what a
correct selection makes of it. Same seed, same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from dlseg.synthetic.anatomy import Grid, draw_anatomy
from dlseg.synthetic.dicom_writer import SeriesMeta, write_series
from dlseg.synthetic.phantom import build_phantom
from dlseg.synthetic.render import draw_contrast, render_ct, render_t1, render_t2

UID_TAG = "dlseg-synthetic-pacs-v1"
PATIENTS = ("DOE^JANE", "MUSTERMANN^MAX", "O'BRIEN^MARY", "ROSSI^MARIO", "DUPONT^JEAN")
ECHOES = {1.5: (2.38, 4.76), 3.0: (1.23, 2.46)}       # (opposed, in-phase) TE in ms
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class PacsVolume:
    """One volume a selection sees (a series, or one echo of it) and what it should become."""

    patient: str                  # the folder and PatientName (a fake name: what must never reach outputs)
    patient_id: str
    series_number: int            # unique in the export
    echo: str                     # "" or "TE 2.38" for one echo of a dual-echo series
    description: str
    expected: str                 # ct | t1-in | t1-out | t2 | skip: <what the reason says>
    field_strength: float | None


@dataclass
class _Study:
    """Where one study goes and the tags its series share."""

    root: Path
    patient: str
    patient_id: str
    index: int
    seed: int
    b0: float | None
    volumes: list[PacsVolume]

    def uid(self, *parts: str) -> str:
        return generate_uid(entropy_srcs=[UID_TAG, str(self.seed), str(self.index), *parts])

    def write(self, number: int, description: str, volume: np.ndarray, modality: str, extra: dict,
              z_top: float = 80.0, spacing: float = 6.0, part: str = "", series_key: str | None = None) -> None:
        """Write one series (or one part of a series: ``part`` keeps file names and SOP UIDs distinct)."""
        n, rows, cols = volume.shape
        grid = Grid(rows, cols, 420.0 / max(rows, cols), (np.arange(n) + 0.5) / n)
        tags = {"PatientName": self.patient, "PatientBirthDate": "19700101", "InstitutionName": "SYNTHETIC HOSPITAL",
                **({"MagneticFieldStrength": f"{self.b0:g}", "ImagingFrequency": f"{42.577 * self.b0:.3f}"}
                   if modality == "MR" and self.b0 else {}), **extra}
        key = series_key or str(number)
        meta = SeriesMeta(modality, self.patient_id, self.uid("study"), self.uid("series", key), self.uid("frame"),
                          number, description, grid, z_top, spacing * n, spacing, spacing,
                          (UID_TAG, str(self.seed), str(self.index), key, part), extra=tags)
        names = [f"IM{part}{k + 1:04d}.dcm" for k in range(n)]
        write_series(self.root / f"SE{number:04d}", names, volume, meta, range(1, n + 1))

    def expect(self, number: int, description: str, expected: str, echo: str = "") -> None:
        self.volumes.append(PacsVolume(self.patient, self.patient_id, number, echo, description, expected, self.b0))


def _render(seed: int, size: int, slices: int, ct: bool) -> dict[str, np.ndarray]:
    """Co-registered T1 in/out and T2 (or CT) volumes of one drawn patient."""
    rng = np.random.default_rng(seed)
    an, contrast = draw_anatomy(rng), draw_contrast(rng)
    grid = Grid(size, size, 420.0 / size, ((np.arange(slices) + 0.5) / slices).astype(np.float32))
    ph = build_phantom(an, grid)
    if ct:
        return {"ct": render_ct(rng, ph, contrast)}
    inphase, outphase = render_t1(rng, an, ph, grid, contrast)
    return {"in": inphase, "out": outphase, "t2": render_t2(rng, an, ph, grid, contrast)}


def _mr_study(s: _Study, size: int, slices: int, one_series: bool) -> None:
    """Localizer, T1 dual echo (one or two series), T2, diffusion-like, secondary capture, T1 dynamic."""
    v = _render(s.seed * 1000 + s.index, size, slices, ct=False)
    base = 100 * (s.index + 1)
    te_out, te_in = ECHOES[s.b0 or 1.5]
    gre = {"ScanningSequence": "GR", "SequenceVariant": "SP", "RepetitionTime": "150", "FlipAngle": "70"}
    s.write(base + 1, "AX BH", v["t2"][:3], "MR", {"ScanningSequence": "SE", "RepetitionTime": "1400",
                                                    "EchoTime": "90"})
    s.expect(base + 1, "AX BH", "skip: 3 slice(s)")
    desc = "T1_FL2D_DUAL_ECHO"
    for te, echo, vol, part in ((te_out, 1, v["out"], "A"), (te_in, 2, v["in"], "B")):
        number = base + 3 if one_series else base + 3 + echo - 1
        s.write(number, desc, vol, "MR", {**gre, "EchoTime": f"{te:g}", "EchoNumbers": echo}, part=part,
                series_key="dual" if one_series else f"dual{echo}")
        s.expect(number, desc, "t1-out" if echo == 1 else "t1-in", f"TE {te:g}" if one_series else "")
    s.write(base + 5, "T2 HASTE TRA", v["t2"], "MR", {"ScanningSequence": "SE", "SequenceVariant": "SK",
                                                      "RepetitionTime": "1600", "EchoTime": "92"})
    s.expect(base + 5, "T2 HASTE TRA", "t2")
    for b, part in ((50, "A"), (800, "B")):
        s.write(base + 6, "AX RESP TRIG", (v["t2"] // (2 if b == 800 else 1)).astype(np.uint16), "MR",
                {"ScanningSequence": "EP", "RepetitionTime": "4000", "EchoTime": "60", "DiffusionBValue": b,
                 "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]}, part=part, series_key="dwi")
    s.expect(base + 6, "AX RESP TRIG", "skip: diffusion-like")
    s.write(base + 7, "Screen Save", v["in"][:1], "MR", {"SOPClassUID": SECONDARY_CAPTURE,
                                                          "ImageType": ["DERIVED", "SECONDARY"]})
    s.expect(base + 7, "Screen Save", "skip: secondary capture")
    for phase, part in ((0, "A"), (1, "B")):
        s.write(base + 8, "T1 VIBE DYN", v["in"], "MR", {**gre, "RepetitionTime": "4", "EchoTime": f"{te_out:g}",
                                                          "TemporalPositionIdentifier": phase + 1},
                part=part, series_key="dyn")
    s.expect(base + 8, "T1 VIBE DYN", "skip: duplicates")


def _ct_study(s: _Study, size: int, slices: int) -> None:
    """Topogram, portal-venous series, coronal MPR (derived)."""
    ct = _render(s.seed * 1000 + s.index, size, slices, ct=True)["ct"]
    base = 100 * (s.index + 1)
    s.write(base + 1, "Topogram 0.6 T20f", ct[:1], "CT", {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    s.expect(base + 1, "Topogram 0.6 T20f", "skip: localizer")
    s.write(base + 2, "ABDOMEN PV 5mm", ct, "CT", {"KVP": "120"})
    s.expect(base + 2, "ABDOMEN PV 5mm", "ct")
    s.write(base + 3, "COR MPR", ct, "CT", {"ImageType": ["DERIVED", "SECONDARY", "MPR"]})
    s.expect(base + 3, "COR MPR", "skip: derived")


def generate_pacs(out_dir: str | Path, mr_studies: int = 4, ct_studies: int = 1, seed: int = 0, size: int = 40,
                  slices: int = 10, field_strengths: tuple[float, ...] = (1.5, 3.0),
                  patients: tuple[str, ...] = PATIENTS) -> list[PacsVolume]:
    """Write the export under ``out_dir``; returns every volume with its expected selection.

    MR study k is at ``field_strengths[k % len]`` and holds its dual echo in one series when ``k // len`` is odd
    (so 4 studies cover both layouts at both strengths).
    """
    out = Path(out_dir)
    volumes: list[PacsVolume] = []
    for k in range(mr_studies + ct_studies):
        name = patients[k % len(patients)] + ("" if k < len(patients) else f"_{k}")
        mr = k < mr_studies
        b0 = field_strengths[k % len(field_strengths)] if mr else None
        study = _Study(out / name / f"{'MR' if mr else 'CT'} ABDOMEN {name}", name, f"PID-{778899 + k}", k, seed,
                       b0, volumes)
        if mr:
            _mr_study(study, size, slices, one_series=(k // len(field_strengths)) % 2 == 1)
        else:
            _ct_study(study, size, slices)
        (study.root / "README.TXT").write_text(f"Export of {name}, not DICOM\n")
    return volumes
