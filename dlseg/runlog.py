"""What a training run tells its user: ``train.log``, the epoch table, throughput and the data-wait hint."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from dlseg.console import console


class RunLog:
    """``train.log`` in the run folder plus console lines, main process only."""

    def __init__(self, is_main_process: bool, path: Path):
        self.enabled = is_main_process
        self.path = path

    def write(self, message: str, echo: bool = True) -> None:
        """Append one time-stamped line to the log; ``echo`` also prints it."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if echo:
            console.print(message, highlight=False)


@dataclass
class EpochStats:
    """What one process measured during one training epoch."""

    loss_sum: float = 0.0       # sum of the finite step losses
    steps: int = 0              # steps with a finite loss
    images: int = 0             # images trained on by all processes
    wait_s: float = 0.0         # time spent waiting for the next batch
    step_s: float = 0.0         # time spent in steps, waiting included
    skipped: int = 0            # steps skipped for a non-finite loss
    last_loss: float = float("nan")  # loss of the latest step (progress bar)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class RunTotals:
    """Throughput over the epochs this process trained in this session (the closing line)."""

    wait_s: float = 0.0         # mean over processes
    step_s: float = 0.0         # mean over processes
    images: int = 0             # all processes

    def summary(self) -> str:
        """Images per second and the share of step time spent waiting for data."""
        return (f"this session {self.images / max(self.step_s, 1e-9):.1f} images/s, "
                f"{100 * self.wait_s / max(self.step_s, 1e-9):.1f} % of step time waiting for data")


def data_wait_hint(fraction: float, augment_on: str, workers: int) -> str:
    """The one-time hint when an epoch waited for data more than ``wait_warn_fraction`` of its step time.

    The likely cure depends on where the loader's time goes (``python -m dlseg.bench loader`` measures it).
    """
    head = f"hint: {100 * fraction:.0f} % of step time was spent waiting for data; "
    if augment_on == "cpu":
        return head + f"raise loader.workers (now {workers}) or use --augment_on device"
    if workers > 0:
        return head + (f"augmentation already runs on the device, so the {workers} loader worker(s) only copy cached "
                       "slices, and handing batches over from them costs more than building them: try "
                       "--loader.workers 0 (with loader.cache_mb holding this process's share of the split)")
    return head + ("the first epoch reads and prepares every case in this process; if later epochs wait too, raise "
                   "loader.cache_mb so that the split stays cached, or loader.workers for reads that cannot be")


MISSED_DICE = 0.05   # a structure scored below this at the end was not learned: a failed run, not a weak one


def missed_class_warnings(class_dice: dict[str, float]) -> list[str]:
    """One warning per structure the final model barely finds on the validation patients (Dice below 0.05)."""
    return [f"warning: {name}: validation Dice {dice:.2f} at the last epoch: this model has not learned it; "
            "train again with another --seed (or look at its ground truth) before using the model"
            for name, dice in class_dice.items() if dice < MISSED_DICE]


def epoch_table(epoch: int, epochs: int, row: dict[str, Any]) -> Table:
    """The end-of-epoch table printed from a ``metrics.jsonl`` row."""
    table = Table(title=f"epoch {epoch + 1}/{epochs}", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("train loss", f"{row['train_loss']:.4f}")
    table.add_row("val loss", f"{row['val_loss']:.4f}")
    for case, dice in row["val_dice"].items():
        table.add_row(f"val Dice {case}", f"{dice:.4f}")
    for name, dice in class_dice(row).items():
        table.add_row(f"val Dice [cyan]{name}[/] (mean over cases)", f"{dice:.4f}")
    table.add_row("[bold]val Dice mean", f"[bold]{row['val_dice_mean']:.4f}")
    table.add_row("lr", f"{row['lr']:.3g}")
    table.add_row("images/s", f"{row['images_per_s']:.1f}")
    table.add_row("data wait", f"{100 * row['data_wait_fraction']:.1f} %")
    table.add_row("time", f"{row['epoch_time_s']:.1f} s")
    if row["nonfinite_skipped"]:
        table.add_row("non-finite steps skipped", str(row["nonfinite_skipped"]))
    return table


def class_dice(row: dict[str, Any]) -> dict[str, float]:
    """Per-class mean val Dice of a multi-class row (empty for one class: the mean says it all)."""
    classes = row.get("val_dice_class") or {}
    return classes if len(classes) > 1 else {}


def epoch_line(epochs: int, row: dict[str, Any]) -> str:
    """The epoch's line in ``train.log``."""
    return (f"epoch {row['epoch'] + 1}/{epochs} train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
            f"val_dice_mean {row['val_dice_mean']:.4f} "
            + "".join(f"dice_{c} {d:.4f} " for c, d in class_dice(row).items())
            + " ".join(f"{c}={d:.4f}" for c, d in row["val_dice"].items())
            + f" data_wait {row['data_wait_fraction']:.2f} images/s {row['images_per_s']:.1f}"
            + (" best" if row["best"] else ""))


def tracker_values(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` row as trackers take them (``val_dice/CASE``, ``val_dice_class/NAME``)."""
    return ({k: v for k, v in row.items() if isinstance(v, (int, float))}
            | {f"val_dice/{c}": d for c, d in row["val_dice"].items()}
            | {f"val_dice_class/{c}": d for c, d in row.get("val_dice_class", {}).items()})


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → flat ``a.b`` keys with scalar values (what trackers accept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
