"""Several exported models as one predictor: the mean of their probabilities, in one pass over the data.

``dlseg/predict.py --model A --model B …`` (e.g. the K fold models of a cross-validation) loads every model and
predicts each batch with all of them. The models must agree on what they predict (classes and class names,
modality); each may have been trained with its own input size and number of context slices:

* cohort prediction prepares each case once, on the first model's grid (its size and normalization), with the
  largest context any model needs; a model with fewer context slices takes the centre channels (exactly its own
  input), a model trained at another size takes that grid resized bilinearly to its size, and its probabilities
  are resized back; models must share the normalization (the grid's intensities are already normalized);
* in memory, :meth:`Ensemble.predict_volume` runs every model through its own preparation (normalization, size)
  and averages the probabilities at the scanner's size, so there any mix is exact.

Each model keeps its own test-time augmentation (``--tta``: the views it was trained for).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dlseg.errors import ModelError
from dlseg.export import load_exported
from dlseg.inference.config import CPU_BATCH
from dlseg.inference.predictor import Predictor

AGREE = ("labels", "class_names", "modality")       # what every model of an ensemble must predict alike


def check_members(paths: Sequence[str], metas: list[dict[str, Any]]) -> None:
    """ModelError naming the first model that predicts something else than the first, or normalizes otherwise."""
    first = metas[0]
    for path, meta in zip(paths[1:], metas[1:]):
        if meta["arch"]["num_classes"] != first["arch"]["num_classes"]:
            raise ModelError(f"{path}: predicts {meta['arch']['num_classes']} output(s), {paths[0]} "
                             f"{first['arch']['num_classes']}: an ensemble's models must agree on labels")
        for key in AGREE:
            if meta.get(key) != first.get(key):
                raise ModelError(f"{path}: {key} {meta.get(key)!r} differs from {paths[0]}'s {first.get(key)!r}: "
                                 "an ensemble's models must agree on labels")
        if meta["normalization"] != first["normalization"]:
            raise ModelError(f"{path}: normalization {meta['normalization']} differs from {paths[0]}'s "
                             f"{first['normalization']}: cohort prediction prepares each case once for all models")


class Ensemble(Predictor):
    """Mean of the members' probabilities; post-processing (threshold, largest component) once, on the mean."""

    def __init__(self, members: list[Predictor], keep_largest: bool = False):
        first = members[0]
        grid = {**first.meta, "context_slices": max(m.context for m in members)}
        super().__init__(first.model, grid, first.device, tta=False, threshold=first.threshold,
                         keep_largest=keep_largest, mixed_precision=first.mixed_precision)
        self.members = members
        self.tta = first.tta

    def settings(self) -> dict[str, Any]:
        return {**self.members[0].settings(), "keep_largest": self.keep_largest, "models": len(self.members)}

    def tta_text(self) -> str:
        texts = list(dict.fromkeys(m.tta_text() for m in self.members))
        return texts[0] if len(texts) == 1 else "; ".join(f"model {i + 1}: {t}" for i, t in enumerate(
            m.tta_text() for m in self.members))

    def _member_inputs(self, member: Predictor, x: torch.Tensor) -> torch.Tensor:
        """The grid batch as ``member`` takes it: its centre context channels, at its size."""
        k = self.context
        x = x[:, k - member.context:k + member.context + 1]
        if member.size != self.size:
            x = F.interpolate(x, size=(member.size, member.size), mode="bilinear", align_corners=False)
        return x

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) grid inputs → (B, K, S, S) mean of the members' probabilities."""
        x = x.to(self.device, non_blocking=True)
        total = None
        for member in self.members:
            p = member.probabilities(self._member_inputs(member, x))
            if member.size != self.size:
                p = F.interpolate(p, size=(self.size, self.size), mode="bilinear", align_corners=False)
            total = p if total is None else total + p
        return total / len(self.members)

    def predict_volume(self, image: np.ndarray, stats: dict[str, float] | None = None,
                       batch_size: int = CPU_BATCH) -> tuple[np.ndarray, np.ndarray]:
        """Each member through its own preparation; the mean of their probabilities at the scanner's size."""
        probs = None
        for member in self.members:
            p = member.predict_volume(image, stats, batch_size)[1]
            probs = p if probs is None else probs + p
        probs /= len(self.members)
        return self.postprocess(self.classify(probs)), probs


def load_models(paths: Sequence[str | os.PathLike], device: str | torch.device = "cpu",
                **options: Any) -> tuple[Predictor, str]:
    """One model as a Predictor, several as an Ensemble (ModelError when they do not agree), with the fingerprint
    of the bytes loaded (an ensemble's: one over its models' fingerprints in order)."""
    loaded = [load_exported(p) for p in paths]      # on the CPU (safetensors rejects e.g. "cpu:0"); moved below
    if len(loaded) == 1:
        model, exp = loaded[0]
        return Predictor(model, exp.meta, device, **options), exp.fingerprint
    keep_largest = options.pop("keep_largest", False)
    members = [Predictor(model, exp.meta, device, **options) for model, exp in loaded]
    check_members([str(p) for p in paths], [m.meta for m in members])
    h = hashlib.sha256(b"dlseg-ensemble\n")
    for _, exp in loaded:
        h.update(exp.fingerprint.encode() + b"\n")
    return Ensemble(members, keep_largest), h.hexdigest()


def load_predictor(paths: Sequence[str | os.PathLike], device: str | torch.device = "cpu",
                   **options: Any) -> Predictor:
    """One model as a Predictor, several as an Ensemble (ModelError when they do not agree)."""
    return load_models(paths, device, **options)[0]
