"""Identities stay out of outputs: the cohort's id salt (``OUT/id-salt.json``), slice references, redaction.

Folder names of an export can be patient names and UIDs link records across sites, so by default outputs name
source slices by a salted hash of their SOPInstanceUID (else their index) and failure reasons name files by their
place in the series; ``--record-sources`` keeps the paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from dlseg.errors import ConfigError
from dlseg.fileio import temp_path

SALT_FILE = "id-salt.json"


def salted_hash(salt: str, *parts: str, n: int = 12) -> str:
    """``n`` hex digits of SHA-256 over the salt and the parts (NUL-separated)."""
    return hashlib.sha256("\0".join(("dlseg-id", salt, *parts)).encode()).hexdigest()[:n]


def read_salt(out: Path) -> str | None:
    """The salt recorded in ``out`` (None when there is none yet)."""
    path = out / SALT_FILE
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["salt"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: unreadable id salt (delete it only together with the case folders)") from None


def cohort_salt(out: Path, given: str | None) -> str:
    """The output folder's salt: the recorded one, else ``given``, else a new random one, recorded atomically.

    Created with a hard link, so array tasks starting together on one ``out`` agree on the first one written.
    """
    recorded = read_salt(out)
    if recorded is None:
        tmp = temp_path(out / SALT_FILE)
        tmp.write_text(json.dumps({"salt": given or secrets.token_hex(16),
                                   "note": "case ids of generic DICOM series and slice references are salted "
                                           "with this value; keep it with the outputs"}))
        try:
            os.link(tmp, out / SALT_FILE)
        except FileExistsError:       # another task recorded one first
            pass
        finally:
            tmp.unlink()
        recorded = read_salt(out)
    if given and given != recorded:
        raise ConfigError(f"--id-salt differs from the salt recorded in {out / SALT_FILE}; use another --out "
                          f"(one output folder holds ids of one salt)")
    return recorded


@dataclass(frozen=True)
class SourceRefs:
    """How outputs refer to source slices and files: salted SOPInstanceUID hashes and indices, or paths."""

    salt: str = ""
    record_paths: bool = False

    def slices(self, paths: list[str], sop_uids: list[str] | None) -> list[str]:
        """Per output slice: its source path (``record_paths``), ``sop-<16 hex>``, or ``slice-<index>``."""
        if self.record_paths:
            return list(paths)
        if sop_uids and len(sop_uids) == len(paths) and all(sop_uids):
            return [f"sop-{salted_hash(self.salt, u, n=16)}" for u in sop_uids]
        return [f"slice-{k}" for k in range(len(paths))]

    def redact(self, text: str, root: str, files: Iterable[str]) -> str:
        """``text`` with each source file named by its place in the case and the input root as ``<input>``."""
        if self.record_paths:
            return text
        files = list(files)
        names = [(str(Path(f)), f"<file {k + 1} of {len(files)}>") for k, f in enumerate(files)]
        folders = {d for f in files for d in Path(f).parents if Path(root) in d.parents}
        names += [(str(d), "<source folder>") for d in folders]
        names += [(os.path.relpath(f, root), n) for f, n in names]
        for old, new in sorted(names, key=lambda p: -len(p[0])):
            text = text.replace(old, new)
        for old in sorted({str(Path(root)), str(Path(root).resolve())}, key=len, reverse=True):
            text = text.replace(old, "<input>")
        return text
