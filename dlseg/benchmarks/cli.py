"""``python -m dlseg.bench [loader|augment|preprocess|predict|train|all]``: every hot path against its baselines.

Each figure is measured in the same run as its baselines and the table leads with the ratio. By default the
data is a synthetic CHAOS cohort generated and preprocessed once under ``runs/_bench/`` (reused afterwards).
Each stage runs in a fresh process, so that the peak resident memory printed beside it is its own; runs whose
memory matters on their own (prediction at two cohort sizes, preprocessing with 1 and N workers) get their own
process too. See ``dlseg/benchmarks/`` for what each stage measures exactly.

Exit status: 0 measured (goals met or not: the table says), 1 a stage failed, 2 unusable arguments.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dlseg.benchmarks.common import (
    STAGES, BenchConfig, BenchSkip, Cohort, isolated, machine_info, run_stage,
)
from dlseg.benchmarks.cohort import ensure_cohort
from dlseg.config import FlagParser, build_parser, config_from_namespace
from dlseg.console import console, run_entry
from dlseg.errors import ConfigError
from dlseg.fileio import atomic_write

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TABLE_WIDTH = 150   # the tables stay readable when the output is a file or a narrow terminal


def bench_parser() -> FlagParser:
    """The command-line interface: the stage, where the JSON goes, and BenchConfig's fields as flags."""
    p = build_parser(BenchConfig, "python -m dlseg.bench", __doc__.splitlines()[0], values_for_bools=False)
    p.add_argument("stage", nargs="?", default="all", choices=(*STAGES, "all"))
    p.add_argument("--json", help="write the results here (default: runs/_bench/bench-<time>.json)")
    return p


def parse_args(argv: list[str] | None) -> tuple[list[str], BenchConfig, str | None]:
    """Stages to run, the config and the JSON path."""
    ns = bench_parser().parse_args(argv)
    stage, json_path = ns.__dict__.pop("stage"), ns.__dict__.pop("json", None)
    cfg = config_from_namespace(BenchConfig, ns, BenchConfig())
    if cfg.quick and "memory_cases" not in vars(ns):
        cfg.memory_cases = (2, 8)
    return (list(STAGES) if stage == "all" else [stage]), cfg.with_predict_defaults(), json_path


def check_config(cfg: BenchConfig) -> None:
    """ConfigError naming the option that cannot work."""
    for key in ("size", "base_width", "depth", "batch_size", "predict_batch_size", "patients", "train_epochs"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.warmup_epochs < cfg.train_epochs:
        raise ConfigError(f"--warmup-epochs {cfg.warmup_epochs}: must be >= 0 and below --train-epochs")
    if min(cfg.workers, cfg.predict_workers, cfg.preprocess_workers, cfg.threads) < 0:
        raise ConfigError("--workers, --predict-workers, --preprocess-workers and --threads must be >= 0")
    if cfg.size % (2 ** cfg.depth):
        raise ConfigError(f"--size {cfg.size}: must be a multiple of 2**depth = {2 ** cfg.depth}")
    if not 1 <= cfg.memory_cases[0] < cfg.memory_cases[1]:
        raise ConfigError(f"--memory-cases {cfg.memory_cases}: expected 1 <= SMALL < LARGE")
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device visible here")
    if cfg.store and not Path(cfg.store, "zarr.json").is_file():
        raise ConfigError(f"--store {cfg.store}: no dlseg store here")
    if cfg.source and not Path(cfg.source).is_dir():
        raise ConfigError(f"--source {cfg.source}: no such folder")


def measure_stages(stages: list[str], cfg: BenchConfig, cohort: Cohort) -> dict[str, dict[str, Any]]:
    """Every requested stage, each in its own process; a failure is recorded and the others go on."""
    results: dict[str, dict[str, Any]] = {}
    for name in stages:
        with console.status(f"[bold]{name}[/] …"):
            try:
                result, memory = isolated(run_stage, name, cfg, cohort, isolate=cfg.isolate, threads=cfg.threads,
                                          env={"ACCELERATE_USE_CPU": "true"} if cfg.device == "cpu" else {})
                result["memory_mb"] = {"stage_peak_rss_mb": memory["peak_rss_mb"],
                                       "stage_workers_peak_rss_mb": memory["children_peak_rss_mb"],
                                       **result["memory_mb"]}
                results[name] = result
                console.print(f"{name}: done in {result['wall_s']:.0f} s", highlight=False)
            except BenchSkip as e:
                results[name] = {"stage": name, "skipped_stage": str(e)}
                console.print(f"[yellow]{name}: skipped[/] ({e})", highlight=False)
            except (RuntimeError, OSError, ValueError) as e:
                results[name] = {"stage": name, "error": str(e)}
                console.print(f"[red]{name}: failed[/] ({e})", highlight=False, soft_wrap=True)
    return results


def fmt_rate(x: float) -> str:
    """A rate with sensible digits."""
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "–"
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def fmt_ratio(x: float) -> str:
    """A ratio: ``12.3×`` above 1.5, else two decimals."""
    if not math.isfinite(x):
        return "–"
    return f"{x:,.1f}×" if x >= 1.5 else f"{x:.2f}"


def goal_text(row: dict[str, Any]) -> str:
    """``≥ 10`` / ``≤ 1.1`` with a tick or a cross; blank when informational."""
    parts = []
    if row.get("goal_min") is not None:
        parts.append(f"≥ {row['goal_min']:.2g}")
    if row.get("goal_max") is not None:
        parts.append(f"≤ {row['goal_max']:.2g}")
    if not parts:
        return ""
    return " ".join(parts) + (" [green]✓[/]" if row["met"] else " [red]✗ not met[/]")


def results_table(results: dict[str, dict[str, Any]]) -> Table:
    """One row per comparison: ratio first, then the goal, both rates and the stage's peak memory."""
    table = Table(title="dlseg benchmark: ratio = ours ÷ baseline, both measured in this run", header_style="bold")
    for col, just in (("ratio", "right"), ("goal", "left"), ("stage", "left"), ("comparison", "left"),
                      ("ours", "right"), ("baseline", "right"), ("unit", "left"), ("stage peak RSS", "right")):
        table.add_column(col, justify=just, no_wrap=col != "comparison")
    for name, res in results.items():
        if "comparisons" not in res:
            table.add_row("–", "", name, res.get("skipped_stage") or f"[red]{res.get('error')}[/]", "", "", "", "")
            continue
        peak = res["memory_mb"].get("stage_peak_rss_mb", float("nan"))
        for i, row in enumerate(res["comparisons"]):
            scale = row["baseline_scale"]
            base = fmt_rate(row["baseline_rate"]) + (f" ({scale:g}×{fmt_rate(row['baseline_rate'] / scale)})"
                                                      if scale != 1 else "")
            table.add_row(f"[bold]{fmt_ratio(row['ratio'])}", goal_text(row), name, row["name"],
                          fmt_rate(row["ours_rate"]), base, res["unit"], f"{peak:,.0f} MB" if i == 0 else "")
        for key, why in res.get("skipped", {}).items():
            table.add_row("–", "", name, f"{key}: skipped ({why})", "", "", "", "")
    return table


def memory_table(results: dict[str, dict[str, Any]]) -> Table:
    """The memory checks (every peak behind them is in the JSON)."""
    table = Table(title="memory: peak resident set size", header_style="bold")
    for col, just in (("ratio", "right"), ("goal", "left"), ("stage", "left"), ("check", "left"),
                      ("value", "right"), ("reference", "right")):
        table.add_column(col, justify=just, no_wrap=col != "check")
    for name, res in results.items():
        for row in res.get("memory_checks", []):
            table.add_row(f"[bold]{fmt_ratio(row['ratio'])}", goal_text(row), name, row["name"],
                          f"{row['value_mb']:,.1f} MB", f"{row['reference_mb']:,.1f} MB")
    return table


def table_console() -> Console:
    """The console for the tables: at least ``TABLE_WIDTH`` columns (logs and narrow terminals stay readable)."""
    if console.width >= TABLE_WIDTH:
        return console
    return Console(width=TABLE_WIDTH, quiet=console.quiet, force_terminal=console.is_terminal)


def header_lines(machine: dict[str, Any], cfg: BenchConfig, cohort: Cohort) -> list[str]:
    """What was measured on, at which sizes."""
    return [
        f"machine: {machine['cpu']}, {machine['cpu_cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), device {machine['device_name']}, load average "
        f"{machine['load_average_1min']:.1f}",
        f"sizes: {cfg.size}×{cfg.size} px, U-Net base width {cfg.base_width} depth {cfg.depth}, "
        f"batch {cfg.batch_size} "
        f"(predict {cfg.predict_batch_size}), precision {cfg.mixed_precision}, channels_last {cfg.channels_last}, "
        f"trainer workers {cfg.workers} ({cfg.train_epochs} epochs, {cfg.warmup_epochs} warm-up), augment on {cfg.augment_on}, "
        f"predict workers {cfg.predict_workers}, "
        f"memory cohorts {cfg.memory_cases[0]}/{cfg.memory_cases[1]} cases{' (quick)' if cfg.quick else ''}",
        f"data: store {cohort.store}" + (f", sources {cohort.chaos}" if cohort.chaos else ", no DICOM sources"),
    ]


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write the results atomically."""
    atomic_write(path, json.dumps(doc, indent=2, default=str))


def run(stages: list[str], cfg: BenchConfig, json_path: str | None) -> tuple[dict[str, Any], Path]:
    """Measure, print the tables, write the JSON; returns the document and where it went."""
    machine = machine_info(cfg.device)
    cohort = ensure_cohort(cfg, lambda msg: console.print(msg, highlight=False))
    for line in header_lines(machine, cfg, cohort):
        console.print(line, highlight=False, soft_wrap=True)
    results = measure_stages(stages, cfg, cohort)
    doc = {"format": "dlseg-bench", "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": "python -m dlseg.bench " + " ".join(sys.argv[1:]), "machine": machine,
           "config": asdict(cfg), "stages": results}
    wide = table_console()
    wide.print(results_table(results))
    wide.print(memory_table(results))
    path = Path(json_path) if json_path else Path(cfg.cache_dir) / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(path, doc)
    console.print(f"results: {path}", highlight=False)
    return doc, path


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when every stage measured, 1 when one failed, 2 for unusable arguments."""

    def measure() -> int:
        stages, cfg, json_path = parse_args(argv)
        check_config(cfg)
        doc, _ = run(stages, cfg, json_path)
        return EXIT_FAILED if any("error" in r for r in doc["stages"].values()) else EXIT_OK

    return run_entry(measure)


if __name__ == "__main__":
    sys.exit(main())
