"""Errors a user can fix, and how a failed case is reported.

Every entry point catches :class:`UserError` once: it prints ``str(e)`` (one line naming the file or key and the
reason) and exits with :attr:`UserError.exit_status`, never a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class UserError(Exception):
    """Unusable input, arguments or configuration; ``str()`` is one line naming the file or key and the reason."""

    exit_status = 2


class ConfigError(UserError, ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


class UsageError(UserError):
    """Unusable arguments (missing SRC, unknown layout, bad split options)."""


class StoreError(UserError):
    """A path that is not a usable dlseg store, or a store another version wrote."""


class ModelError(UserError):
    """An exported model that is missing, incomplete or of an unknown format."""


class ResumeError(UserError, ValueError):
    """A checkpoint that cannot be resumed from."""


class CaseError(UserError):
    """A case (or one of its files) that cannot be used; ``str()`` is ``"path: reason"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


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
