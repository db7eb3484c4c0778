"""One writer per folder: ``<folder>/.lock``, created atomically, removed on exit.

A folder that must have a single writer (a store; a training run folder) is held with ``with FolderLock(folder):``.
The lock file is created with ``O_CREAT | O_EXCL`` (one creator wins, also on NFS v3+) and holds JSON
``{"host", "pid", "started", "command"}``; ``command`` is the program and its option names only (no values, so no
paths and no patient identifiers). It is removed when the block ends, also on an exception or Ctrl-C.

A second writer gets a :class:`~dlseg.errors.UsageError` naming the folder, the holder and the fix. A *stale* lock
is taken over with a printed note: one left by a process of this host that is gone, or a lock file that is still
unreadable (half-written) after :data:`UNREADABLE_GRACE_S`. A lock from another host is never taken over (this host
cannot tell whether that job still runs). Take-over is race-safe: the stale file is renamed aside (atomic, one
renamer wins), checked to be the very file judged stale, then the lock is created with ``O_EXCL`` again.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from rich.markup import escape

from dlseg.console import console
from dlseg.errors import UsageError

LOCK_NAME = ".lock"
UNREADABLE_GRACE_S = 5.0   # a lock file still unreadable this long after its last change was left half-written


def is_lock_file(name: str) -> bool:
    """``.lock`` or a stale lock renamed aside during a take-over (``.lock.stale-…``): never data."""
    return name == LOCK_NAME or name.startswith(LOCK_NAME + ".stale-")


def short_command(label: str | None = None) -> str:
    """``label`` (else the program's file name) and the option names of ``sys.argv``, without their values."""
    prog = label or (Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python")
    flags = [a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--")]
    return " ".join([prog, *flags])[:200]


def pid_alive(pid: int) -> bool:
    """The process ``pid`` exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _notice(message: str) -> None:
    console.print(f"[yellow]note[/] {escape(message)}", highlight=False, soft_wrap=True)


class FolderLock:
    """``with FolderLock(folder, "python -m preprocess"):`` — the block runs as the folder's only writer."""

    def __init__(self, folder: str | os.PathLike, command: str | None = None,
                 notice: Callable[[str], None] = _notice):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = short_command(command)
        self.notice = notice
        self._ident: tuple[int, int] | None = None   # (st_dev, st_ino) of the lock file this object created

    # ---- acquiring ----
    def acquire(self) -> None:
        """Create the lock file, taking over a stale one; UsageError when another writer holds the folder."""
        for _ in range(5):   # each turn either wins, raises, or removed a stale lock someone else then won
            if self._create():
                return
            try:
                st = os.stat(self.path)
                raw = self.path.read_bytes()
            except FileNotFoundError:
                continue      # released between our attempt and our look: try again
            holder = _parse(raw)
            stale = self._stale_reason(holder, st)
            if stale is None:
                raise UsageError(self._held_message(holder))
            if self._move_aside((st.st_dev, st.st_ino), raw):
                self.notice(f"{self.folder}: took over a stale lock ({stale})")
        raise UsageError(f"{self.folder}: could not take its lock ({self.path}): other writers keep taking it; "
                         "retry when they are done")

    def _create(self) -> bool:
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.now().astimezone().isoformat(timespec="seconds"), "command": self.command}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            st = os.fstat(fd)
            self._ident = (st.st_dev, st.st_ino)
            os.write(fd, (json.dumps(info) + "\n").encode())
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            self._ident = None
            raise
        os.close(fd)
        return True

    def _stale_reason(self, holder: dict[str, Any] | None, st: os.stat_result) -> str | None:
        """Why the lock is stale (taken over), or None while its holder may still be writing."""
        if holder is None:
            age = time.time() - st.st_mtime
            return f"unreadable lock file, {age:.0f} s old" if age > UNREADABLE_GRACE_S else None
        if holder["host"] != socket.gethostname():
            return None
        if pid_alive(holder["pid"]):   # this very process counts as alive: a lock is not re-entrant
            return None
        return f"pid {holder['pid']} on {holder['host']}, since {holder['started']}, is no longer running"

    def _move_aside(self, ident: tuple[int, int], raw: bytes) -> bool:
        """Rename the stale lock aside and delete it; False when someone else moved or replaced it first."""
        aside = self.folder / f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)   # atomic: of several take-overs, one renames this file
        except FileNotFoundError:
            return False
        st = os.stat(aside)
        if (st.st_dev, st.st_ino) == ident and aside.read_bytes() == raw:
            aside.unlink(missing_ok=True)
            return True
        try:    # we moved a fresh lock another process had just created: put it back (link fails if taken)
            os.link(aside, self.path)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False

    def _held_message(self, holder: dict[str, Any] | None) -> str:
        if holder is None:
            return (f"{self.folder}: another writer is starting (its lock {self.path} is being written); "
                    "wait for it to finish")
        who = (f"pid {holder['pid']} on {holder['host']}, since {holder['started']}"
               + (f", `{holder['command']}`" if holder.get("command") else ""))
        elsewhere = ("it runs on another host, so its lock is never taken over automatically: "
                     if holder["host"] != socket.gethostname() else "")
        return (f"{self.folder}: in use by another writer ({who}); {elsewhere}wait for it, "
                f"or if that job is gone remove {self.path}")

    # ---- releasing ----
    def release(self) -> None:
        """Remove the lock file, if it is still the one this object created."""
        if self._ident is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._ident = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The lock's holder, or None for a half-written or foreign file."""
    try:
        info = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or not isinstance(info.get("host"), str):
        return None
    info.setdefault("started", "?")
    return info

