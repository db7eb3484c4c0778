"""Per-case flags (pure functions, summary.csv, the screen) and OUT/report.html in headless Chromium."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from dlseg.inference import case_flags, outputs, report_html
from dlseg.inference.case_flags import FlagConfig
from dlseg.predict import main as predict_main
from dlseg.train import main as train_main
from tests.helpers import TINY_RUN


def test_measures_of_a_label_volume():
    labels = np.zeros((6, 20, 20), np.uint8)
    labels[1:4, 2:10, 2:10] = 1            # 192 voxels
    labels[2, 15:17, 15:19] = 1            # 8 voxels, a second piece
    labels[5, 0, 0] = 2                    # another organ touching the last slice: not liver
    m = case_flags.measure(labels, 0.8123456)
    assert m == {"components": 2, "largest_share": round(192 / 200, 4), "mean_probability": 0.8123,
                 "first_slice_share": 0.0, "last_slice_share": 0.0}
    labels[0, 5, 5] = 1                    # one voxel on the first slice; the largest slice holds 64 + 8
    labels[5, 2:8, 2:8] = 1                # 36 on the last
    assert case_flags.end_slice_shares(labels == 1) == (pytest.approx(1 / 72), pytest.approx(36 / 72))
    assert case_flags.components(np.zeros((2, 3, 3), bool)) == (0, None)


def test_mean_foreground_probability():
    probs = np.zeros((2, 1, 2, 2), np.float32)
    probs[0, 0, 0, 0], probs[1, 0, 1, 1], probs[1, 0, 0, 1] = 0.9, 0.7, 0.4
    assert case_flags.mean_foreground_probability(probs, 0.5) == pytest.approx(0.8)
    assert case_flags.mean_foreground_probability(probs * 0, 0.5) is None
    multi = np.zeros((1, 3, 1, 2), np.float32)
    multi[0, :, 0, 0] = [0.2, 0.5, 0.3]    # class 1 wins with 0.5
    multi[0, :, 0, 1] = [0.6, 0.1, 0.3]    # background
    assert case_flags.mean_foreground_probability(multi, 0.5) == pytest.approx(0.5)


def test_rules_fire_with_their_reason():
    cfg = FlagConfig()
    ok = {"status": "predicted", "liver_volume_ml": 1500.0, "components": 1, "largest_share": 1.0,
          "mean_probability": 0.95, "first_slice_share": 0.05, "last_slice_share": 0.0}
    assert case_flags.rules_fired(ok, cfg) == []
    assert case_flags.rules_fired({**ok, "liver_volume_ml": 0.0}, cfg) == ["empty prediction (no liver)"]
    bad = {**ok, "liver_volume_ml": 4100.4, "components": 3, "largest_share": 0.62, "mean_probability": 0.55,
           "last_slice_share": 0.4}
    assert case_flags.rules_fired(bad, cfg) == [
        "liver 4100 mL > 3500 mL", "largest piece 62% of 3 < 90%", "mean probability 0.55 < 0.7",
        "liver on the last slice (cut off?)"]
    assert case_flags.rules_fired({**ok, "liver_volume_ml": 250.0}, cfg) == ["liver 250 mL < 600 mL"]
    both = {**bad, "first_slice_share": 0.1}
    assert case_flags.rules_fired(both, cfg)[-1] == "liver on the first and last slices (cut off?)"
    assert case_flags.rules_fired(both, FlagConfig(cut_off_share=1.5))[-1].startswith("mean")
    rows = [bad, ok, {"case_id": "x", "status": "failed", "liver_volume_ml": None}]
    assert case_flags.flag_rows(rows, cfg) == 1 and rows[1]["flags"] == "" and rows[2]["flags"] == ""


def test_thumbnail_strip_draws_the_prediction():
    image = np.full((8, 40, 30), 100, np.int16)
    labels = np.zeros((8, 40, 30), np.uint8)
    labels[2:6, 10:30, 5:20] = 1
    preview = report_html.preview_stack(image, {"p0_5": 0.0, "p99_5": 200.0}, height=80)
    assert preview.shape == (8, 80, 60) and preview.dtype == np.uint8 and (preview == 127).all()   # 100 of 0..200: 127.5
    strip = report_html.thumbnail_strip(preview, labels, count=3)
    assert strip.shape == (80, 3 * 60 + 2 * 2, 3)        # 3 tiles of 80x60 with 2-pixel separators
    green = (strip[..., 1] > 200) & (strip[..., 0] < 100)
    assert green.any() and not green[:, :5].any()          # contour drawn inside the tile, not at its border


@pytest.fixture(scope="module")
def predicted(synthetic_store, synthetic_root, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model's predictions of the synthetic CHAOS tree (model run folder, output folder)."""
    base = tmp_path_factory.mktemp("report")
    run = base / "run"
    assert train_main(["--data", str(synthetic_store), "--out", str(run), "--epochs", "1", *TINY_RUN]) == 0
    out = base / "pred"
    assert predict_main(["--model", str(run), "--input", str(synthetic_root), "--out", str(out),
                         "--format", "npz"]) == 0
    return run, out


def read_summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_summary_measures_match_the_labels(predicted):
    _, out = predicted
    rows = read_summary(out)
    assert len(rows) == 6
    for row in rows:
        labels = outputs.read_labels(out / row["case_id"])
        liver = labels == 1
        _, n = ndimage.label(liver, structure=np.ones((3, 3, 3), bool))
        assert int(row["components"]) == n
        areas = liver.sum(axis=(1, 2))
        assert float(row["last_slice_share"]) == pytest.approx(areas[-1] / max(areas.max(), 1), abs=1e-4)
        numbers = ("liver_volume_ml", "largest_share", "mean_probability", "first_slice_share", "last_slice_share")
        fired = case_flags.rules_fired({**row, **{k: float(row[k]) if row[k] else None for k in numbers}},
                                       FlagConfig())
        assert row["flags"] == "; ".join(fired)
        assert (out / row["case_id"] / outputs.THUMBNAILS).is_file()


def test_changed_rules_reuse_every_case(predicted, synthetic_root, capsys):
    run, out = predicted
    capsys.readouterr()
    assert predict_main(["--model", str(run), "--input", str(synthetic_root), "--out", str(out), "--format", "npz",
                         "--flags.liver-min-ml", "0", "--flags.liver-max-ml", "0.5", "--flags.cut-off-share", "2",
                         "--flags.min-mean-probability", "0", "--flags.min-largest-share", "0"]) == 0
    rows = read_summary(out)
    assert {r["status"] for r in rows} == {"reused"}
    screen = capsys.readouterr().out
    for row in rows:
        volume = float(row["liver_volume_ml"])
        want = "empty prediction (no liver)" if volume == 0 else f"liver {volume:.0f} mL > 0.5 mL" if volume > 0.5 else ""
        assert row["flags"] == want
        if want:
            assert f"flagged {row['case_id']}: {want}" in " ".join(screen.split())


def chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    return subprocess.run([exe, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=120)


def test_report_page_in_headless_chromium(predicted, tmp_path):
    _, out = predicted
    page = out / report_html.REPORT
    text = page.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    res = chromium("--dump-dom", page.as_uri())
    assert res.returncode == 0
    assert [line for line in res.stderr.splitlines() if ":CONSOLE" in line] == []    # no errors or logs
    rows = re.findall(r'<tr class="(\w+) case-row">', res.stdout)
    assert len(rows) == 6
    assert rows == sorted(rows, key=lambda c: c != "flagged")                      # flagged first
    assert res.stdout.count('src="data:image/jpeg;base64,') == 6 and "<svg" in res.stdout

    clicked = tmp_path / "sorted.html"                      # the same page after a click on "liver mL"
    clicked.write_text(text.replace("</body>", "<script>document.querySelectorAll('th')[3].click();</script>"
                                               "</body>"))
    res = chromium("--dump-dom", clicked.as_uri())
    volumes = [float(v) for v in re.findall(r'<tr class="\w+ case-row">(?:<td[^>]*>[^<]*</td>){3}<td class="num" '
                                            r'data-v="([0-9.e+-]+)"', res.stdout)]
    assert len(volumes) == 6 and volumes == sorted(volumes)

    shot = tmp_path / "report.png"
    res = chromium(f"--screenshot={shot}", "--window-size=1200,900", page.as_uri())
    assert res.returncode == 0
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (900, 1200) and img.std() > 10
