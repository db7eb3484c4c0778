"""``python -m dlseg.benchmarks.report``: a benchmark JSON rendered as Markdown tables between the page's markers."""

import json

import pytest

from dlseg.benchmarks.report import BEGIN, END, main

MACHINE = {"cpu": "Test CPU 9000", "cpu_cores": 3, "torch_threads": 3, "python": "3.11.7", "platform": "Linux-test",
           "torch": "2.13.0+cpu", "numpy": "2.4.6", "zarr": "3.1.6", "pydicom": "3.0.2", "albumentations": "2.0.8",
           "opencv": "5.0.0", "device": "cpu", "load_average_1min": 0.4, "device_name": "CPU (Test CPU 9000)"}


def comparison(name, ours, base, goal_min=None, scale=1.0):
    ratio = ours / (base * scale)
    met = None if goal_min is None else ratio >= goal_min
    return {"name": name, "ours": "a", "baseline": "b", "ours_rate": ours, "baseline_rate": base * scale,
            "baseline_scale": scale, "ratio": ratio, "goal_min": goal_min, "goal_max": None, "met": met,
            "meaning": ""}


def bench_doc():
    """A small document shaped like the one ``python -m dlseg.bench --json`` writes."""
    loader = {"stage": "loader", "unit": "samples/s", "rates": {}, "timings": {},
              "comparisons": [comparison("warm vs DICOM", 12000.0, 400.0, goal_min=10.0),
                              comparison("cold vs DICOM", 800.0, 400.0, goal_min=10.0)],
              "memory_mb": {"stage_peak_rss_mb": 321.4},
              "memory_checks": [{"name": "cache within budget", "value_mb": 5.0, "reference_mb": 4.0, "ratio": 1.25,
                                 "goal_max": 1.0, "met": False, "meaning": ""}],
              "details": {}, "notes": ["items through __getitem__"], "skipped": {}}
    preprocess = {"stage": "preprocess", "unit": "slices/s", "rates": {}, "timings": {},
                  "comparisons": [comparison("2 workers vs 2 × 1 worker", 90.0, 50.0, goal_min=0.8, scale=2.0)],
                  "memory_mb": {"stage_peak_rss_mb": 100.0}, "memory_checks": [], "details": {}, "notes": [],
                  "skipped": {}}
    return {"format": "dlseg-bench", "version": 1, "created": "2030-01-01T00:00:00+0000",
            "command": "python -m dlseg.bench all", "machine": MACHINE,
            "config": {"size": 128, "base_width": 16, "depth": 4, "batch_size": 16, "predict_batch_size": 8,
                       "mixed_precision": "no", "channels_last": False, "workers": 0, "augment_on": "cpu",
                       "predict_workers": 0, "memory_cases": [10, 40], "quick": False},
            "stages": {"loader": loader, "preprocess": preprocess,
                       "train": {"stage": "train", "error": "boom"}}}


def row(page, text):
    """The cells of the one table row containing ``text``."""
    rows = [line for line in page.splitlines() if line.startswith("|") and text in line]
    assert len(rows) == 1, rows
    return [c.strip() for c in rows[0].strip("|").split("|")]


@pytest.fixture
def rendered(tmp_path):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(bench_doc()))
    page = tmp_path / "performance.md"
    page.write_text(f"# Performance\n\nprose before\n\n{BEGIN}\nstale tables\n{END}\n\nprose after\n")
    assert main([str(src), "--out", str(page)]) == 0
    return src, page


def test_tables_carry_ratio_goal_and_rates(rendered):
    _, page = rendered
    text = page.read_text()
    assert row(text, "warm vs DICOM") == ["**30.0×**", "≥ 10 ✓", "loader", "warm vs DICOM", "12,000", "400",
                                          "samples/s", "321 MB"]
    assert row(text, "cold vs DICOM")[:2] == ["**2.0×**", "≥ 10 ✗ not met"]
    assert row(text, "2 workers vs 2 × 1 worker")[:6] == ["**0.90**", "≥ 0.8 ✓", "preprocess",
                                                          "2 workers vs 2 × 1 worker", "90.0", "100 (2×50.0)"]
    assert row(text, "cache within budget") == ["**1.25**", "≤ 1 ✗ not met", "loader", "cache within budget",
                                                "5.0 MB", "4.0 MB"]
    assert "boom" in row(text, "| train |")[3]
    assert "items through \\_\\_getitem\\_\\_" in text


def test_machine_line_and_surrounding_prose(rendered):
    _, page = rendered
    text = page.read_text()
    machine = [line for line in text.splitlines() if line.startswith("- Machine:")]
    assert machine == ["- Machine: Test CPU 9000, 3 cores, device cpu, 1-min load average 0.4 at the start"]
    assert ("- Libraries: Python 3.11.7, torch 2.13.0+cpu (3 threads), numpy 2.4.6, zarr 3.1.6, pydicom 3.0.2, "
            "albumentations 2.0.8, OpenCV 5.0.0") in text
    assert "- Command: `python -m dlseg.bench all`" in text
    assert text.startswith("# Performance\n\nprose before\n\n" + BEGIN + "\n")
    assert text.endswith(END + "\n\nprose after\n")
    assert "stale tables" not in text


def test_rendering_again_changes_nothing(rendered):
    src, page = rendered
    first = page.read_text()
    assert main([str(src), "--out", str(page)]) == 0
    assert page.read_text() == first


def test_unusable_input_exits_2(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("no markers here\n")
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(bench_doc()))
    assert main([str(src), "--out", str(page)]) == 2
    assert page.read_text() == "no markers here\n"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}))
    assert main([str(other)]) == 2
    assert "not a dlseg-bench JSON" in capsys.readouterr().err
