"""File order: names sorted with their embedded numbers compared as numbers."""

from __future__ import annotations

import re
from pathlib import Path


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers numerically: ``2 < 10``, ``i0009 < i0010``."""
    parts = tuple((0, int(t), "") if t.isdigit() else (1, 0, t.casefold()) for t in re.split(r"(\d+)", name) if t)
    return parts + ((2, 0, name),)


def natural_sorted(paths) -> list[Path]:
    """Paths sorted by the natural order of their names."""
    return sorted((Path(p) for p in paths), key=lambda p: natural_key(p.name))
