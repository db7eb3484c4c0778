"""Which series of a generic DICOM tree a model should see: pure rules over header fields.

Each series becomes one or more volumes (a series holding two echoes is split per echo). A volume is either
skipped with a reason (localizer, derived or secondary capture, diffusion-like, inconsistent geometry) or given a
sequence: ``ct``, ``t1-in``, ``t1-out``, ``t2``. T1 in- vs opposed-phase comes from EchoTime against the fat-water
period at the field strength; within one dual-echo acquisition the shorter TE is the opposed phase when the
period cannot decide.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pydicom

FAT_WATER_PPM = 3.4
GYROMAGNETIC_MHZ_PER_T = 42.577
PHASE_TOLERANCE = 0.2            # a TE within this fraction of a period from a (half-)multiple decides the phase
MIN_SLICES = 8                   # fewer slices: a localizer, not a volume to segment
T2_MIN_TE_MS = 50.0
T1_MAX_TE_MS, T1_MAX_TR_MS = 20.0, 1000.0
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"   # and its multi-frame variants (…7.1 – …7.4)
DIFFUSION_TYPES = {"DIFFUSION", "ADC", "TRACEW", "TRACE", "EADC", "FA", "DWI"}
IN_TYPES, OUT_TYPES = {"IN_PHASE", "IP"}, {"OUT_PHASE", "OPP_PHASE", "OP"}
LOCALIZER_RE = re.compile(r"\b(localizer|localiser|locali[sz]er|scout|survey|topogram|tri-?pilot|3-?plane|loc)\b", re.I)
DIFFUSION_RE = re.compile(r"(diff|dwi|\badc\b|trace|\bdti\b|\bb\s*=?\s*\d{2,4}\b|ep_b)", re.I)
T2_RE = re.compile(r"(t2|haste|ssfse|ss-fse|stir)", re.I)
T1_RE = re.compile(r"(t1|dual|in.?phase|opp|dixon|vibe|lava|thrive|flash)", re.I)


@dataclass
class SeriesVolume:
    """One volume of a series (the whole series, or one echo of it) and what the rules made of it."""

    uid: str                              # SeriesInstanceUID (grouping and hashing only; never printed)
    study: str                            # StudyInstanceUID (grouping and hashing only; never printed)
    echo: str                             # "" for a single-echo series, else the echo's key ("TE 2.3")
    files: list[Path]
    headers: list[dict[str, Any]]
    sequence: str | None = None           # ct | t1-in | t1-out | t2 | None
    why: str = ""                         # why this sequence, or why it is skipped
    skip: str | None = None               # the skip reason (None: usable)

    @property
    def first(self) -> dict[str, Any]:
        return self.headers[0]


# ---------------------------------------------------------------------------------------------- header fields

def _float(ds: pydicom.Dataset, name: str) -> float | None:
    v = ds.get(name)
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        v = v[0] if len(v) else None
    try:
        return float(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _round(v: float | None, digits: int) -> float | None:
    """``v`` rounded (so that 2.38 and 2.3800001 are one echo), None stays None."""
    return None if v is None else round(v, digits)


def _floats(ds: pydicom.Dataset, name: str, digits: int) -> tuple[float, ...] | None:
    """A multi-valued number tag, rounded; None when absent or unreadable."""
    try:
        return tuple(round(float(x), digits) for x in ds.get(name) or ()) or None
    except (TypeError, ValueError):
        return None


def _words(ds: pydicom.Dataset, name: str) -> tuple[str, ...]:
    v = ds.get(name)
    if v in (None, ""):
        return ()
    values = v if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else str(v).split("\\")
    return tuple(str(x).strip().upper() for x in values)


def header_fields(ds: pydicom.Dataset) -> dict[str, Any]:
    """What the selection rules read from one file's header, as plain Python."""
    return {
        "sop_class": str(ds.get("SOPClassUID", "") or ""), "modality": str(ds.get("Modality", "") or ""),
        "image_type": _words(ds, "ImageType"), "description": str(ds.get("SeriesDescription", "") or ""),
        "series_number": None if _float(ds, "SeriesNumber") is None else int(_float(ds, "SeriesNumber")),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "field_strength": _float(ds, "MagneticFieldStrength"), "frequency": _float(ds, "ImagingFrequency"),
        "echo_time": _round(_float(ds, "EchoTime"), 3), "echo_number": _float(ds, "EchoNumbers"),
        "repetition_time": _float(ds, "RepetitionTime"), "scanning_sequence": _words(ds, "ScanningSequence"),
        "sequence_name": str(ds.get("SequenceName", "") or ""), "b_value": _float(ds, "DiffusionBValue"),
        "rows": ds.get("Rows"), "cols": ds.get("Columns"), "frames": int(_float(ds, "NumberOfFrames") or 1),
        "orientation": _floats(ds, "ImageOrientationPatient", 4), "position": _floats(ds, "ImagePositionPatient", 2),
    }


# ---------------------------------------------------------------------------------------------- physics

def fat_water_period_ms(b0: float) -> float:
    """The TE period (ms) after which fat and water are in phase again: 1 / (3.4 ppm × 42.58 MHz/T × B0)."""
    return 1000.0 / (FAT_WATER_PPM * 1e-6 * GYROMAGNETIC_MHZ_PER_T * 1e6 * b0)


def field_strength(h: dict[str, Any]) -> float | None:
    """B0 in tesla from MagneticFieldStrength (gauss values converted), else ImagingFrequency / 42.58."""
    b0 = h.get("field_strength")
    if b0:
        return b0 / 10000.0 if b0 > 100 else b0
    return h["frequency"] / GYROMAGNETIC_MHZ_PER_T if h.get("frequency") else None


def echo_phase(te_ms: float | None, b0: float | None) -> str | None:
    """``in`` near a whole multiple of the fat-water period, ``out`` near an odd multiple of half of it, else None."""
    if not te_ms or not b0:
        return None
    cycles = te_ms / fat_water_period_ms(b0)
    frac = cycles % 1.0
    if abs(frac - 0.5) <= PHASE_TOLERANCE:
        return "out"
    if (frac <= PHASE_TOLERANCE or frac >= 1 - PHASE_TOLERANCE) and cycles > 0.5:
        return "in"
    return None


def weighting(h: dict[str, Any]) -> tuple[str | None, str]:
    """``t1`` / ``t2`` / None of an MR series and why (TE/TR first, then the description)."""
    te, tr, desc = h.get("echo_time"), h.get("repetition_time"), h.get("description", "")
    if te is not None and te >= T2_MIN_TE_MS:
        return "t2", f"TE {te:g} ms ≥ {T2_MIN_TE_MS:g}"
    if te is not None and tr is not None and te <= T1_MAX_TE_MS and tr <= T1_MAX_TR_MS:
        return "t1", f"TR {tr:g} ms, TE {te:g} ms"
    if te is not None and tr is None and te <= T1_MAX_TE_MS and "GR" in h.get("scanning_sequence", ()):
        return "t1", f"gradient echo, TE {te:g} ms"
    if T2_RE.search(desc):
        return "t2", "description says T2"
    if T1_RE.search(desc):
        return "t1", "description says T1"
    return None, f"cannot tell T1 from T2 (TR {'?' if tr is None else f'{tr:g}'} ms, " \
                 f"TE {'?' if te is None else f'{te:g}'} ms, description without T1/T2)"


# ---------------------------------------------------------------------------------------------- skip rules

def is_dixon_phase(h: dict[str, Any]) -> bool:
    """A scanner-derived in/opposed-phase image (Dixon reconstructions are DERIVED but are what T1 models want)."""
    return bool(set(h["image_type"]) & (IN_TYPES | OUT_TYPES))


def content_skip(h: dict[str, Any], slices: int, min_slices: int) -> str | None:
    """Why the series is not an image volume to segment (None when it is one)."""
    types, desc = set(h["image_type"]), h["description"]
    if h["sop_class"].startswith(SECONDARY_CAPTURE):
        return "secondary capture"
    if h["image_type"][:1] == ("DERIVED",) and not is_dixon_phase(h) or "SECONDARY" in h["image_type"][1:2]:
        return f"derived image (ImageType {'/'.join(h['image_type'][:2])})"
    if "LOCALIZER" in types or LOCALIZER_RE.search(desc):
        return "localizer"
    if h["frames"] > 1:
        return f"multi-frame object ({h['frames']} frames)"
    if types & DIFFUSION_TYPES or h["b_value"] is not None or DIFFUSION_RE.search(desc) \
            or DIFFUSION_RE.search(h["sequence_name"]):
        return "diffusion-like"
    if "EP" in h["scanning_sequence"]:
        return "diffusion-like (echo-planar)"
    if slices < min_slices:
        return f"localizer-like: {slices} slice(s), fewer than {min_slices}"
    return None


def geometry_skip(headers: list[dict[str, Any]]) -> str | None:
    """Why the slices do not make one volume: mixed orientation or size, duplicate positions."""
    if len({h["orientation"] for h in headers}) > 1:
        return "inconsistent geometry: mixed slice orientations"
    if len({(h["rows"], h["cols"]) for h in headers}) > 1:
        return "inconsistent geometry: mixed image sizes"
    positions = [h["position"] for h in headers if h["position"] is not None]
    if len(positions) == len(headers) and len(set(positions)) < len(positions):
        return f"inconsistent geometry: {len(positions)} slices at {len(set(positions))} positions (duplicates)"
    return None


# ---------------------------------------------------------------------------------------------- volumes

def split_echoes(uid: str, files: list[Path], headers: list[dict[str, Any]]) -> list[SeriesVolume]:
    """One volume per EchoTime (else per EchoNumbers) when a series holds several; else the series itself."""
    study = headers[0]["study_uid"]
    for key, label in (("echo_time", "TE {:g}"), ("echo_number", "echo {:g}")):
        values = {h[key] for h in headers}
        if len(values) > 1 and None not in values:
            groups: dict[float, list[int]] = defaultdict(list)
            for i, h in enumerate(headers):
                groups[h[key]].append(i)
            return [SeriesVolume(uid, study, label.format(v), [files[i] for i in idx], [headers[i] for i in idx])
                    for v, idx in sorted(groups.items())]
    return [SeriesVolume(uid, study, "", list(files), list(headers))]


def classify_mr_t1(volumes: list[SeriesVolume]) -> None:
    """In- vs opposed-phase for the T1 volumes of one study (``sequence`` is ``t1`` on entry)."""
    for v in volumes:
        h = v.first
        b0, te = field_strength(h), h["echo_time"]
        types = set(h["image_type"])
        phase = "in" if types & IN_TYPES else "out" if types & OUT_TYPES else echo_phase(te, b0)
        if phase:
            how = "ImageType" if types & (IN_TYPES | OUT_TYPES) else \
                f"TE {te:g} ms, fat-water period {fat_water_period_ms(b0):.2f} ms at {b0:g} T"
            v.sequence, v.why = f"t1-{phase}", how
    pairs: dict[tuple, list[SeriesVolume]] = defaultdict(list)
    for v in volumes:                           # one dual-echo acquisition: same TR and slice positions
        pairs[(v.first["repetition_time"], tuple(h["position"] for h in v.headers))].append(v)
    for group in pairs.values():
        tes = sorted({v.first["echo_time"] for v in group if v.first["echo_time"] is not None})
        if len(tes) != 2:
            continue
        for v in group:
            if v.sequence == "t1" and v.first["echo_time"] is not None:
                phase = "out" if v.first["echo_time"] == tes[0] else "in"
                v.sequence = f"t1-{phase}"
                v.why = f"dual echo TE {tes[0]:g}/{tes[1]:g} ms: the shorter is opposed phase"
    for v in volumes:
        if v.sequence == "t1":
            te = v.first["echo_time"]
            v.sequence, v.skip = None, f"T1 with TE {te if te is not None else '?'} ms is neither in- nor opposed-phase"


def classify(volume: SeriesVolume, min_slices: int) -> None:
    """Skip reason or a first sequence guess (``t1`` until the study's echoes are compared)."""
    h = volume.first
    volume.skip = content_skip(h, len(volume.headers), min_slices) or geometry_skip(volume.headers)
    if volume.skip:
        return
    modality = h["modality"].upper()
    if modality == "CT":
        volume.sequence, volume.why = "ct", "Modality CT"
    elif modality == "MR":
        kind, why = weighting(h)
        if kind is None:
            volume.skip = why
        volume.sequence, volume.why = kind, why
    else:
        volume.skip = f"modality {modality or 'unknown'}"


def series_volumes(series: Iterable[tuple[str, list[Path], list[dict[str, Any]]]],
                   min_slices: int = MIN_SLICES) -> list[SeriesVolume]:
    """Every (uid, files, headers) series as classified volumes, in the given order."""
    volumes = [v for uid, files, headers in series for v in split_echoes(uid, files, headers)]
    for v in volumes:
        classify(v, min_slices)
    by_study: dict[str, list[SeriesVolume]] = defaultdict(list)
    for v in volumes:
        if v.sequence == "t1":
            by_study[v.study].append(v)
    for group in by_study.values():
        classify_mr_t1(group)
    return volumes

