"""Preemption: SIGTERM / SIGUSR1 ask the loop to save and exit 75; the ``PREEMPTED`` file tells the launch scripts.

``launch/common.sh`` repeats these values (``DLSEG_EXIT_PREEMPTED``, ``DLSEG_PREEMPTED_MARKER``).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

EXIT_PREEMPTED = 75             # state saved after SIGTERM/SIGUSR1; requeue and pass --resume auto
PREEMPTED_MARKER = "PREEMPTED"  # written into the run folder with the exit code above (launchers may lose it)


class PreemptFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM's warning signal); the loop agrees on it across ranks at each step."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.requested = False
        self.signal = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name

    def install(self) -> "PreemptFlag":
        """Catch the signals (main thread only), remembering the handlers they replace."""
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def write_marker(run_dir: Path, checkpoint: str) -> None:
    """Record in the run folder that the run was preempted and which checkpoint holds its state."""
    (run_dir / PREEMPTED_MARKER).write_text(json.dumps({"checkpoint": checkpoint, "exit": EXIT_PREEMPTED}))


def clear_marker(run_dir: Path) -> None:
    """A (resumed) run that starts is no longer preempted."""
    (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
