"""The exported-model format: ``model.safetensors`` (weights, no pickle) + ``model.json`` (what prediction needs).

Written by the trainer for the best checkpoint; read by the predictor, the evaluator and the benchmarks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dlseg.model import build_model
from dlseg.errors import ModelError
from dlseg.fileio import atomic_save, atomic_write

FORMAT_NAME = "dlseg-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"
REQUIRED = ("arch", "normalization", "train_size", "context_slices", "labels", "modality", "threshold")


def export_model(model: torch.nn.Module, meta: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write weights + JSON into ``out_dir`` (each to a temporary name, then renamed; JSON last)."""
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"model metadata lacks {', '.join(missing)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_save(out / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **meta}
    atomic_write(out / META, json.dumps(doc, indent=2, sort_keys=True))
    return out


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """Accept a run folder, its ``model/`` folder, or the weights/JSON file itself."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if (p / "model" / META).is_file():
        p = p / "model"
    return p


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    d = resolve_model_dir(path)
    meta_path = d / META
    if not meta_path.is_file():
        raise ModelError(f"{path}: no exported model here (expected {META} and {WEIGHTS}; train first)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ModelError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT_NAME:
        raise ModelError(f"{meta_path}: not a dlseg model description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{meta_path}: model format version {meta.get('format_version')} (this dlseg reads {FORMAT_VERSION})")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ModelError(f"{meta_path}: lacks {', '.join(missing)}")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the architecture from ``model.json`` and load the safetensors weights into it (strictly)."""
    d = resolve_model_dir(path)
    meta = read_meta(d)
    weights = d / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{weights}: weights file missing")
    try:
        model = build_model(meta["arch"])
    except (TypeError, ValueError, KeyError) as e:
        raise ModelError(f"{d / META}: unusable arch ({e})") from None
    try:
        state = load_file(str(weights), device="cpu")  # safetensors rejects "cpu:0"; move after
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelError(f"{weights}: unreadable weights ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "shape/key mismatch"
        raise ModelError(f"{weights}: weights do not match {META} ({first})") from None
    return model.to(device).eval(), meta
