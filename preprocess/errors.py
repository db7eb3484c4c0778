"""User-facing errors of preprocessing: one line naming the file and the reason."""

from __future__ import annotations

import os
from dataclasses import dataclass


class CaseError(Exception):
    """A case (or one of its files) that cannot be converted; ``str()`` is ``"path: reason"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


class UsageError(Exception):
    """Unusable arguments (missing SRC, unknown layout, bad split options): exit status 2."""


@dataclass(frozen=True)
class Failure:
    """One case that failed: its id, the file at fault and the one-line reason."""

    case_id: str
    path: str
    reason: str
    subject: str | None = None      # labeled split unit it belongs to (``MR-5``), keeps the split stable

    def __str__(self) -> str:
        return f"{self.case_id}: {self.path}: {self.reason}"


def one_line(text: object, limit: int = 300) -> str:
    """A message's lines joined into one, shortened to ``limit`` characters."""
    line = " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 1] + "…"
