"""Checks on how a run was launched, shared by the trainer and the predictor."""

from __future__ import annotations

import os
from typing import Protocol

from dlseg.config import ConfigError


class HasProcesses(Protocol):
    num_processes: int


def check_launch(state: HasProcesses, consequence: str = "") -> None:
    """Refuse the launch trap: a launcher started N processes but each one runs alone (no process group).

    ``accelerate launch --multi_gpu --num_processes 2`` on a machine without GPUs and without
    ``ACCELERATE_USE_CPU=true`` starts two processes with WORLD_SIZE=2 in their environment that each get
    ``num_processes == 1``: independent runs on all the data, writing the same folder. ``state`` is an
    ``Accelerator`` or a ``PartialState``; ``consequence`` ends the message (what would have gone wrong).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if state.num_processes != launched:
        raise ConfigError(
            f"launch: the launcher started {launched} processes (WORLD_SIZE) but this one sees "
            f"{state.num_processes} (no process group; on CPU-only machines set ACCELERATE_USE_CPU=true "
            f"or use accelerate_configs/cpu_2proc.yaml){consequence}"
        )
