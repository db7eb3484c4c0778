"""Files that are never seen half-written: temporary name, write, rename; folders installed whole; file hashing.

A temporary file is ``.<name>.<8 hex>.tmp`` beside its target (readers and resume logic skip such names).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from dlseg.errors import UsageError, one_line


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path``: ``.<name>.<8 hex>.tmp``."""
    p = Path(path)
    return p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_save(path: str | os.PathLike, save: Callable[[Path], Any], fsync: bool = False) -> Path:
    """Call ``save(tmp)`` on a temporary name, then rename it to ``path``; nothing is left behind on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        save(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write(path: str | os.PathLike, data: bytes | str, fsync: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary name."""
    payload = data.encode() if isinstance(data, str) else data
    return atomic_save(path, lambda tmp: tmp.write_bytes(payload), fsync=fsync)


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (inside a folder not yet visible) and fsync it, so a crash cannot leave it short."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new, renamed, removed names) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_dir(tmp: Path, final: Path, aside: Path, fsync: bool = False) -> None:
    """Rename the complete folder ``tmp`` to ``final``; an existing ``final`` is first renamed to ``aside``
    (same file system) and removed after, so ``final`` is always one whole version. With ``fsync``, ``tmp``'s
    entries are flushed before the rename and the parent's after it (the files themselves must be flushed already)."""
    if fsync:
        fsync_dir(tmp)
    if final.exists():
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    if fsync:
        fsync_dir(final.parent)


def hash_file(h: Any, path: str | os.PathLike) -> None:
    """Feed a file's bytes to the hash object ``h`` in 1 MiB blocks."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def read_json_object(path: Path, what: str = "") -> dict[str, Any]:
    """A user-given JSON object file (``what`` names it in the message); UsageError with one line otherwise."""
    name = f" {what}" if what else ""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"{path}: cannot read{name} ({e.strerror})") from None
    except ValueError as e:
        raise UsageError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data
