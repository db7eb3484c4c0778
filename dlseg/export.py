"""The exported-model format: ``model.safetensors`` (weights, no pickle) + ``model.json`` (what prediction needs).

Written by the trainer for the best checkpoint; read by the predictor, the evaluator and the benchmarks.

The pair is replaced as one unit: each export writes a fresh hidden version folder beside ``model/``
(``.model.v-<hex>/``) and then switches the ``model`` symlink to it with one rename, so a reader that resolves
the link once reads weights and JSON of the same export; the previous version stays until the next export
(a reader still reading it finishes). A reader hashes the bytes it loaded (``Exported.fingerprint``), never a
second read of files that may since have been replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes, save_file

from dlseg.model import build_model
from dlseg.errors import ModelError
from dlseg.fileio import atomic_save, atomic_write, install_dir, temp_path

FORMAT_NAME = "dlseg-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"
VERSION_PREFIX = ".v-"             # .model.v-<hex>/ beside model/
READ_TRIES = 5                     # a version removed under a reader is re-resolved this many times
REQUIRED = ("arch", "normalization", "train_size", "context_slices", "labels", "modality", "threshold")


@dataclass
class Exported:
    """One exported model as read: its folder (as named), JSON, weights and the fingerprint of those bytes."""

    folder: Path
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    fingerprint: str


def fingerprint_bytes(weights: bytes, meta: bytes) -> str:
    """SHA-256 of the weights and JSON bytes (the records' ``model_fingerprint``)."""
    h = hashlib.sha256(b"dlseg-model\n")
    for block in (weights, meta):
        h.update(block)
        h.update(b"\1")
    return h.hexdigest()


def export_model(model: torch.nn.Module, meta: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write weights + JSON into a new version folder and switch ``out_dir`` (a symlink) to it in one rename."""
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"model metadata lacks {', '.join(missing)}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    version = out.with_name(f".{out.name}{VERSION_PREFIX}{uuid.uuid4().hex[:12]}")
    tmp = version.with_name(version.name + ".tmp")
    tmp.mkdir()
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        atomic_save(tmp / WEIGHTS, lambda t: save_file(state, str(t)), fsync=True)
        doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **meta}
        atomic_write(tmp / META, json.dumps(doc, indent=2, sort_keys=True), fsync=True)
        os.rename(tmp, version)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = os.readlink(out) if out.is_symlink() else None
    _switch(out, version)
    _prune(out, keep={version.name, previous})
    return out


def _switch(out: Path, version: Path) -> None:
    """Point ``out`` at ``version`` with one rename (a folder exported before versions is swapped in whole)."""
    link = temp_path(out)
    try:
        os.symlink(version.name, link)
    except OSError:                      # no symlinks on this file system: the folder itself is swapped in
        install_dir(version, out, temp_path(out))
        return
    if out.is_dir() and not out.is_symlink():
        _check_only_model_files(out)
        aside = temp_path(out)
        os.rename(out, aside)
        os.replace(link, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(link, out)


def _check_only_model_files(folder: Path) -> None:
    """Refuse to replace a folder that holds anything but an exported model (it would be deleted)."""
    other = [p.name for p in folder.iterdir() if p.name not in (WEIGHTS, META) and not p.name.endswith(".tmp")]
    if other:
        raise ValueError(f"{folder}: holds {', '.join(sorted(other)[:3])}, not only an exported model; "
                         f"export into another folder")


def _prune(out: Path, keep: set[str | None]) -> None:
    """Remove version folders of ``out`` other than ``keep`` (the new one and the one readers may still read)."""
    for p in out.parent.glob(f".{out.name}{VERSION_PREFIX}*"):
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """Accept a run folder, its ``model/`` folder, or the weights/JSON file itself."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if (p / "model" / META).is_file():
        p = p / "model"
    return p


def parse_meta(text: bytes | str, meta_path: Path) -> dict[str, Any]:
    """The checked contents of a ``model.json`` (ModelError naming ``meta_path`` otherwise)."""
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise ModelError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelError(f"{meta_path}: not a dlseg model description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{meta_path}: model format version {meta.get('format_version')} (this dlseg reads {FORMAT_VERSION})")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ModelError(f"{meta_path}: lacks {', '.join(missing)}")
    return meta


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checked ``model.json`` of an exported model."""
    d = resolve_model_dir(path)
    if not (d / META).is_file():
        raise ModelError(f"{path}: no exported model here (expected {META} and {WEIGHTS}; train first)")
    return parse_meta((d / META).read_bytes(), d / META)


def _read_pair(d: Path, named: str | os.PathLike) -> tuple[bytes, bytes]:
    """JSON and weights bytes of one version: the link is resolved once; a version pruned meanwhile is re-read."""
    for attempt in range(READ_TRIES):
        real = d.resolve()
        try:
            return (real / META).read_bytes(), (real / WEIGHTS).read_bytes()
        except FileNotFoundError:
            if attempt == READ_TRIES - 1 or d.resolve() == real:
                break
        except OSError as e:
            raise ModelError(f"{d}: cannot read the exported model ({e.strerror or e})") from None
    if not (d / META).is_file():
        raise ModelError(f"{named}: no exported model here (expected {META} and {WEIGHTS}; train first)")
    raise ModelError(f"{d / WEIGHTS}: weights file missing")


def read_exported(path: str | os.PathLike) -> Exported:
    """Read one exported model (JSON, weights, fingerprint of exactly those bytes); ModelError when unusable."""
    d = resolve_model_dir(path)
    meta_bytes, weight_bytes = _read_pair(d, path)
    meta = parse_meta(meta_bytes, d / META)
    try:
        state = load_bytes(weight_bytes)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelError(f"{d / WEIGHTS}: unreadable weights ({e})") from None
    return Exported(d, meta, state, fingerprint_bytes(weight_bytes, meta_bytes))


def build_exported(exp: Exported, where: Path) -> torch.nn.Module:
    """The architecture of ``exp.meta`` with its weights loaded strictly (ModelError naming ``where``)."""
    try:
        model = build_model(exp.meta["arch"])
    except (TypeError, ValueError, KeyError) as e:
        raise ModelError(f"{where / META}: unusable arch ({e})") from None
    try:
        model.load_state_dict(exp.state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "shape/key mismatch"
        raise ModelError(f"{where / WEIGHTS}: weights do not match {META} ({first})") from None
    return model


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Exported]:
    """The model (eval mode, on ``device``) and what was read: meta and the fingerprint of the loaded bytes."""
    exp = read_exported(path)
    model = build_exported(exp, exp.folder)
    return model.to(device).eval(), exp


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the architecture from ``model.json`` and load the safetensors weights into it (strictly)."""
    model, exp = load_exported(path, device)
    return model, exp.meta
