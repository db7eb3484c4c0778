"""Identities stay out: a cohort whose folder names and DICOM tags hold fake patient names and ids is predicted
(one series damaged, so a failure reason is written too); no output byte, summary, selection table or console line
holds a name, an id, a UID or the source folder, and ``--record-sources`` is what brings paths back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dlseg.inference import outputs
from dlseg.inference.privacy import SALT_FILE, SourceRefs, cohort_salt, salted_hash
from dlseg.predict import main
from dlseg.synthetic.pacs import generate_pacs

from test_predict import make_model

REPO = Path(__file__).resolve().parents[1]
PATIENTS = ("DOE^JANE", "MUSTERMANN^MAX")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """Two MR studies (1.5 T, 3 T) under a source folder that is itself a name; one in-phase slice damaged."""
    root = tmp_path_factory.mktemp("src") / "JANE DOE 1970-01-01"
    generate_pacs(root, mr_studies=2, ct_studies=0, size=32, slices=8, patients=PATIENTS)
    victim = sorted((root / "DOE^JANE").rglob("SE0104/*.dcm"))[2]
    victim.write_bytes(victim.read_bytes()[:-700])         # header intact, pixel data cut short
    return root


def identifiers(root: Path) -> set[str]:
    """Every name, id and UID of the export, and the source folder names."""
    found = {"DOE^JANE", "JANE", "MUSTERMANN", "PID-778899", "778899", "778900", root.name, str(root)}
    for path in root.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found |= {str(ds.PatientName), str(ds.PatientID), ds.StudyInstanceUID, ds.SeriesInstanceUID,
                  ds.SOPInstanceUID, ds.FrameOfReferenceUID}
    found |= {p.name for p in root.rglob("*") if p.is_dir()}
    return found


def test_no_identifier_in_any_output_byte_or_console_line(export, tmp_path):
    model = make_model(tmp_path / "model", "MR", "t1-in")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "dlseg.predict", "--model", str(model), "--input", str(export),
                           "--out", str(out), "--format", "png,npz,nifti", "--overlays", "--batch-size", "16"],
                          capture_output=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]          # the damaged series failed alone
    summary = json.loads(outputs.summary_files(out)[1].read_text())
    assert (summary["predicted"], summary["failed"]) == (1, 1) and summary["skipped"] > 0
    failed = next(r for r in summary["cases"] if r["status"] == "failed")
    assert re.match(r"<file \d of 8>: cannot decode pixel data", failed["reason"])   # by its place, not its path
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".png", ".npz", ".gz", ".json", ".csv"}
    assert any(p.parent.name == outputs.OVERLAYS for p in files)
    sources = [outputs.read_sources(p.parent) for p in files if p.name == outputs.SOURCES]
    assert sources and all(v.startswith("sop-") for s in sources for v in s.values())
    blobs = {str(p.relative_to(out)): p.read_bytes() for p in files}
    blobs |= {"stdout": proc.stdout, "stderr": proc.stderr}
    needles = identifiers(export)
    assert len(needles) > 100
    leaks = [(name, n) for name, data in blobs.items() for n in needles if n.encode() in data]
    assert leaks == []
    assert all(n.encode() not in p.name.encode() for p in files for n in needles)


def test_redact_names_files_and_folders_by_place(tmp_path):
    root = tmp_path / "JANE DOE"
    files = [str(root / "DOE^JANE" / "SE0104" / f"IM{k}.dcm") for k in range(3)]
    refs = SourceRefs("salt")
    assert refs.redact(f"{files[1]}: corrupt DICOM", str(root), files) == "<file 2 of 3>: corrupt DICOM"
    assert refs.redact(f"{root / 'DOE^JANE' / 'SE0104'}: no image slices", str(root), files) == \
        "<source folder>: no image slices"
    assert refs.redact(f"DOE^JANE/SE0104/IM0.dcm and {root}", str(root), files) == "<file 1 of 3> and <input>"
    assert SourceRefs("salt", record_paths=True).redact(files[0], str(root), files) == files[0]
    assert refs.slices(["a", "b"], ["1.2.3", "1.2.4"]) == [f"sop-{salted_hash('salt', u, n=16)}" for u in
                                                            ("1.2.3", "1.2.4")]
    assert refs.slices(["a", "b"], None) == ["slice-0", "slice-1"]
    assert SourceRefs("other").slices(["a"], ["1.2.3"]) != refs.slices(["a"], ["1.2.3"])


def test_salt_of_an_output_folder_first_writer_wins(tmp_path, monkeypatch):
    """Array tasks starting together on one --out agree on one salt: a task that loses the race reads the winner's."""
    def racing_link(src, dst):
        Path(dst).write_text(json.dumps({"salt": "theirs"}))
        raise FileExistsError(dst)

    monkeypatch.setattr(os, "link", racing_link)
    assert cohort_salt(tmp_path, None) == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == [SALT_FILE]          # no temporary left
    assert cohort_salt(tmp_path, "theirs") == "theirs"


def test_record_sources_brings_paths_back(export, tmp_path, capsys):
    """The same check finds the names once --record-sources asks for paths (so the test above can fail)."""
    model = make_model(tmp_path / "model", "MR", "t1-in")
    out = tmp_path / "out"
    assert main(["--model", str(model), "--input", str(export), "--out", str(out), "--record-sources",
                 "--series-description", "HASTE"]) == 0
    sources = [outputs.read_sources(d) for d in out.iterdir() if (d / outputs.SOURCES).is_file()]
    assert len(sources) == 2
    assert {v.split("/")[0] for s in sources for v in s.values()} == set(PATIENTS)      # folder names are back
