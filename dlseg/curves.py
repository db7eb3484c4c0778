"""Run records: ``metrics.jsonl`` (one JSON object per epoch) and ``curves.png`` (loss and Dice per epoch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dlseg.fileio import atomic_save, atomic_write

METRICS = "metrics.jsonl"
CURVES = "curves.png"


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Epoch records of a run (a torn last line, from a kill mid-write, is ignored)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def truncate_metrics(run_dir: str | os.PathLike, before_epoch: int) -> None:
    """Keep only records of epochs < ``before_epoch`` (a resumed run re-does the later ones)."""
    path = Path(run_dir) / METRICS
    if path.is_file():
        _write_rows(path, [r for r in read_metrics(run_dir) if int(r.get("epoch", 0)) < before_epoch])


def append_metrics(run_dir: str | os.PathLike, row: dict[str, Any]) -> None:
    """Add one epoch record (the file is rewritten through a temporary name)."""
    path = Path(run_dir) / METRICS
    _write_rows(path, read_metrics(run_dir) + [row])


def class_names(rows: list[dict[str, Any]]) -> list[str]:
    """Foreground classes with a Dice of their own in the records (none for a one-class model)."""
    names: list[str] = []
    for r in rows:
        names += [n for n in r.get("val_dice_class", {}) if n not in names]
    return names if len(names) > 1 else []


def plot_curves(run_dir: str | os.PathLike) -> Path:
    """Draw train/val loss and mean val Dice per epoch (and each class's, for several) into ``curves.png``.

    A bare ``Figure`` (no pyplot) draws with Agg without touching the process's global backend.
    """
    rows = read_metrics(run_dir)
    epochs = [r["epoch"] + 1 for r in rows]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_dice = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "s-", label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_dice.plot(epochs, [r["val_dice_mean"] for r in rows], "o-", color="tab:green", label="mean", linewidth=2)
    names = class_names(rows)
    for name in names:
        ax_dice.plot(epochs, [r.get("val_dice_class", {}).get(name, float("nan")) for r in rows], ".--", label=name)
    if names:
        ax_dice.legend(fontsize="small")
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("mean val Dice (training grid)")
    ax_dice.set_ylim(0, 1)
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return atomic_save(Path(run_dir) / CURVES, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
