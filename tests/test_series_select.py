"""Series selection of generic DICOM trees: the TE rules at 1.5 T and 3 T, the skip rules, a PACS-like export
(exactly which series each model predicts, and why the others are skipped), overrides, dry run, salted ids."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pydicom
import pytest

from dlseg.inference import outputs
from dlseg.inference.privacy import SALT_FILE, read_salt
from dlseg.inference.selection import SELECTION_FILE, SeriesChoice, read_selection, select_series
from dlseg.predict import main
from dlseg.sources.dicom import find_series
from dlseg.sources.series_select import (content_skip, echo_phase, fat_water_period_ms, field_strength, geometry_skip,
                                         series_volumes, weighting)
from dlseg.synthetic.pacs import generate_pacs

from test_predict import make_model


# ---------------------------------------------------------------------------------------------- TE rules

def test_fat_water_period():
    assert fat_water_period_ms(1.5) == pytest.approx(4.605, abs=0.01)
    assert fat_water_period_ms(3.0) == pytest.approx(2.303, abs=0.01)


@pytest.mark.parametrize("te, b0, phase", [
    (2.38, 1.5, "out"), (4.76, 1.5, "in"), (2.3, 1.5, "out"), (4.6, 1.5, "in"), (6.9, 1.5, "out"), (9.2, 1.5, "in"),
    (1.23, 3.0, "out"), (2.46, 3.0, "in"), (1.15, 3.0, "out"), (2.3, 3.0, "in"), (3.45, 3.0, "out"),
    (2.38, 3.0, "in"),            # the 1.5 T opposed-phase TE is in phase at 3 T
    (3.45, 1.5, None), (1.7, 3.0, None), (0.4, 1.5, None), (4.6, None, None), (None, 1.5, None),
])
def test_echo_phase(te, b0, phase):
    assert echo_phase(te, b0) == phase


def test_field_strength_from_tesla_gauss_or_frequency():
    assert field_strength({"field_strength": 1.5, "frequency": None}) == 1.5
    assert field_strength({"field_strength": 30000.0, "frequency": None}) == 3.0
    assert field_strength({"field_strength": None, "frequency": 127.74}) == pytest.approx(3.0, abs=0.01)
    assert field_strength({"field_strength": None, "frequency": None}) is None


def header(**kw) -> dict:
    """A file's selection fields (series_select.header_fields) with plain defaults."""
    h = {"sop_class": "1.2.840.10008.5.1.4.1.1.4", "modality": "MR", "image_type": ("ORIGINAL", "PRIMARY"),
         "description": "", "series_number": 1, "study_uid": "1.2", "field_strength": 1.5, "frequency": None,
         "echo_time": 4.6, "echo_number": None, "repetition_time": 150.0, "scanning_sequence": ("GR",),
         "sequence_name": "", "b_value": None, "rows": 8, "cols": 8, "frames": 1,
         "orientation": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), "position": (0.0, 0.0, 0.0)}
    return {**h, **kw}


def stack(n: int = 10, **kw) -> list[dict]:
    return [header(position=(0.0, 0.0, 5.0 * k), **kw) for k in range(n)]


@pytest.mark.parametrize("fields, kind", [
    (dict(echo_time=80.0, repetition_time=1600.0), "t2"), (dict(echo_time=4.6, repetition_time=150.0), "t1"),
    (dict(echo_time=12.0, repetition_time=500.0), "t1"), (dict(echo_time=None, repetition_time=None,
                                                              description="T2 SPIR"), "t2"),
    (dict(echo_time=30.0, repetition_time=3000.0, description="T1 FLAIR"), "t1"),
    (dict(echo_time=30.0, repetition_time=3000.0, description="PD"), None),
    (dict(echo_time=2.3, repetition_time=None, scanning_sequence=("GR",)), "t1"),
    (dict(echo_time=2.3, repetition_time=None, scanning_sequence=("SE",)), None),
])
def test_weighting(fields, kind):
    assert weighting(header(**fields))[0] == kind


def test_dual_echo_without_field_strength_takes_the_shorter_te_as_opposed_phase():
    files = [Path(f"f{k}") for k in range(20)]
    headers = [header(echo_time=te, field_strength=None, position=(0.0, 0.0, 5.0 * k))
               for te in (2.2, 4.4) for k in range(10)]
    volumes = series_volumes([("1.9", files, headers)])
    assert [(v.echo, v.sequence) for v in volumes] == [("TE 2.2", "t1-out"), ("TE 4.4", "t1-in")]
    assert all("shorter" in v.why and v.skip is None for v in volumes)


def test_two_series_of_one_acquisition_pair_up_by_positions():
    a = [Path(f"a{k}") for k in range(10)]
    b = [Path(f"b{k}") for k in range(10)]
    volumes = series_volumes([("1.1", a, stack(echo_time=1.7, field_strength=None)),
                              ("1.2", b, stack(echo_time=3.4, field_strength=None))])
    assert [v.sequence for v in volumes] == ["t1-out", "t1-in"]
    alone = series_volumes([("1.1", a, stack(echo_time=1.7, field_strength=None))])[0]
    assert alone.sequence is None and "neither in- nor opposed-phase" in alone.skip


def test_dixon_image_type_decides_the_phase():
    files = [Path(f"d{k}") for k in range(10)]
    dixon = ("DERIVED", "PRIMARY", "DIXON", "OPP_PHASE")
    v = series_volumes([("1.3", files, stack(image_type=dixon, echo_time=None, description="T1 VIBE DIXON"))])[0]
    assert (v.sequence, v.skip, v.why) == ("t1-out", None, "ImageType")


def test_skip_rules():
    assert content_skip(header(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), 20, 8) == "localizer"
    assert content_skip(header(description="3-plane loc"), 20, 8) == "localizer"
    assert "3 slice(s)" in content_skip(header(), 3, 8)
    assert content_skip(header(sop_class="1.2.840.10008.5.1.4.1.1.7"), 20, 8) == "secondary capture"
    assert "derived" in content_skip(header(image_type=("DERIVED", "PRIMARY", "MPR")), 20, 8)
    assert content_skip(header(image_type=("DERIVED", "PRIMARY", "DIXON", "IN_PHASE")), 20, 8) is None
    assert content_skip(header(b_value=800.0), 20, 8) == "diffusion-like"
    assert content_skip(header(description="DWI b50 b800"), 20, 8) == "diffusion-like"
    assert "echo-planar" in content_skip(header(scanning_sequence=("EP",)), 20, 8)
    assert content_skip(header(), 20, 8) is None
    assert "orientations" in geometry_skip(stack(3) + [header(orientation=(1.0, 0, 0, 0, 0, -1.0))])
    assert "sizes" in geometry_skip(stack(3) + [header(rows=16, position=(0.0, 0.0, 99.0))])
    assert "duplicates" in geometry_skip(stack(3) + stack(3))
    assert geometry_skip(stack(5)) is None


# ---------------------------------------------------------------------------------------------- a PACS export

@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """4 MR studies (1.5 T / 3 T × dual echo in two series / in one series) and a CT study."""
    root = tmp_path_factory.mktemp("pacs")
    volumes = generate_pacs(root, size=32, slices=8)
    return root, volumes, find_series(root)


@pytest.fixture(scope="module")
def small_pacs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small_pacs")
    generate_pacs(root, mr_studies=1, ct_studies=0, size=32, slices=8)
    return root


def expected_selection(volumes, sequence: str) -> tuple[set, dict]:
    """(series number, echo) of the volumes a model of ``sequence`` should predict; the others' expected reasons."""
    chosen = {(v.series_number, v.echo) for v in volumes if v.expected == sequence}
    reasons = {(v.series_number, v.echo): v.expected[len("skip: "):] for v in volumes if v.expected.startswith("skip")}
    return chosen, reasons


@pytest.mark.parametrize("modality, sequence", [("MR", "t1-in"), ("MR", "t1-out"), ("MR", "t2"), ("CT", "ct")])
def test_pacs_export_selects_exactly_the_models_series(pacs, modality, sequence):
    _, volumes, series = pacs
    decisions = select_series(series, {"modality": modality, "sequence": sequence}, SeriesChoice(), "s")
    got = {(d.row()["series_number"], d.volume.echo) for d in decisions if d.predict}
    chosen, reasons = expected_selection(volumes, sequence)
    assert got == chosen and len(chosen) == (1 if modality == "CT" else 4)
    assert len(decisions) == len(volumes) == 31           # every volume accounted for, the README files not
    for d in decisions:
        key = (d.row()["series_number"], d.volume.echo)
        if key in reasons:
            assert not d.predict and reasons[key] in d.reason, (key, d.reason)
    assert len({d.study for d in decisions}) == 5 and len({d.case_id for d in decisions}) == 31


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_pacs_export_skipped_is_not_failed(pacs, tmp_path, capsys):
    root, volumes, _ = pacs
    model = make_model(tmp_path / "model", "MR", "t1-in")
    out = tmp_path / "out"
    code = main(["--model", str(model), "--input", str(root), "--out", str(out), "--batch-size", "16"])
    assert code == 0
    rows = {r["case_id"]: r for r in read_csv(outputs.summary_files(out)[0])}
    selection = read_selection(out)
    predicted = {r["case_id"] for r in selection if r["decision"] == "predict"}
    assert {(int(r["series_number"]), r["echo"]) for r in selection if r["decision"] == "predict"} == \
        expected_selection(volumes, "t1-in")[0]
    assert {c for c, r in rows.items() if r["status"] == "predicted"} == predicted and len(predicted) == 4
    assert {c for c, r in rows.items() if r["status"] == "skipped"} == {r["case_id"] for r in selection} - predicted
    assert all(rows[r["case_id"]]["reason"] == r["reason"] for r in selection if r["decision"] == "skip")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(predicted)
    totals = json.loads(outputs.summary_files(out)[1].read_text())
    assert (totals["predicted"], totals["skipped"], totals["failed"]) == (4, 27, 0)
    text = capsys.readouterr().out
    assert "selection: 4 of 31 series volumes in 5 studies to predict, 27 skipped" in text
    assert "fat-water period 2.30 ms at 3 T" in text


def test_dry_run_and_overrides(pacs, tmp_path, capsys):
    root, _, _ = pacs
    model = make_model(tmp_path / "model", "MR", "t1-in")
    out = tmp_path / "out"
    args = ["--model", str(model), "--input", str(root), "--out", str(out), "--dry-run"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([SELECTION_FILE, SALT_FILE])
    first = read_selection(out)
    assert sum(r["decision"] == "predict" for r in first) == 4
    assert "study-" in capsys.readouterr().out
    assert main(args + ["--series-description", "haste"]) == 0          # case-insensitive regular expression
    haste = read_selection(out)
    assert {int(r["series_number"]) for r in haste if r["decision"] == "predict"} == {105, 205, 305, 405}
    assert [r["case_id"] for r in haste] == [r["case_id"] for r in first]   # same salt, same ids
    uid = pydicom.dcmread(next(root.rglob("SE0303/*.dcm")), stop_before_pixels=True)
    (tmp_path / "uids.txt").write_text(f"# one series\n{uid.SeriesInstanceUID}\n")
    assert main(args + ["--series-uids", str(tmp_path / "uids.txt")]) == 0
    chosen = read_selection(out)
    assert {(int(r["series_number"]), r["echo"]) for r in chosen if r["decision"] == "predict"} == \
        {(303, "TE 2.38"), (303, "TE 4.76")}                              # both echoes of the chosen series
    assert main(args + ["--series-uids", str(tmp_path / "missing.txt")]) == 2
    assert main(args + ["--series-description", "("]) == 2


def test_case_ids_are_salted_per_output_folder(small_pacs, tmp_path, capsys):
    root = small_pacs
    model = make_model(tmp_path / "model", "MR", "t1-in")

    def ids(out: Path, *extra: str) -> list[str]:
        assert main(["--model", str(model), "--input", str(root), "--out", str(out), "--dry-run", *extra]) == 0
        return [r["case_id"] for r in read_selection(out)]

    a, b = ids(tmp_path / "a"), ids(tmp_path / "b")
    assert set(a).isdisjoint(b)                      # two cohorts (sites) cannot be linked by id
    assert ids(tmp_path / "a") == a                  # a resume keeps them
    given = ids(tmp_path / "c", "--id-salt", "site-7")
    assert ids(tmp_path / "d", "--id-salt", "site-7") == given
    assert read_salt(tmp_path / "c") == "site-7"
    capsys.readouterr()
    assert main(["--model", str(model), "--input", str(root), "--out", str(tmp_path / "c"), "--dry-run",
                 "--id-salt", "other"]) == 2
    assert "--id-salt differs" in capsys.readouterr().err
