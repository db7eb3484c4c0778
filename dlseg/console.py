"""Console output: rich progress bars and tables, printed by the main process only.

Works before and inside Accelerate: the main process is the one whose ``RANK`` (set by accelerate/torchrun
for each rank) is 0 or unset.
"""

from __future__ import annotations

import os
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dlseg.errors import UserError


def is_main_process() -> bool:
    """True unless a launcher (accelerate/torchrun) marked this process as a non-zero global rank."""
    return os.environ.get("RANK", "0") in ("", "0")


console = Console(stderr=False, quiet=not is_main_process())
err_console = Console(stderr=True)


class RateColumn(TextColumn):
    """Items per second with a unit, e.g. ``412.3 slices/s``."""

    def __init__(self, unit: str = "it"):
        super().__init__("")
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


def make_progress(unit: str = "it", transient: bool = False, disable: bool | None = None) -> Progress:
    """A progress bar with count, percentage, rate and ETA; silent on non-main processes."""
    if disable is None:
        disable = not is_main_process()
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        RateColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console, transient=transient, disable=disable,
    )


def print_error(message: str) -> None:
    """One error line on stderr, no traceback (main process only)."""
    if is_main_process():
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def run_entry(body: Callable[[], int]) -> int:
    """An entry point's body; a :class:`~dlseg.errors.UserError` becomes its one line and its exit status."""
    try:
        return body()
    except UserError as e:
        print_error(str(e))
        return e.exit_status
