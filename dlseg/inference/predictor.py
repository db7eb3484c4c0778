"""The model side of prediction: probabilities (TTA over the model's invariances, autocast, channels-last), post-processing.

In memory, no files: ``Predictor.load(model).predict_volume(image)`` → labels and probabilities at the
scanner's size, through exactly the normalize/resize path that training used.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from dlseg.export import load_model
from dlseg.inference.config import CPU_BATCH
from dlseg.inference.tta import IDENTITY, describe, tta_views
from dlseg.normalize import NormConfig, ResizeMapping, intensity_stats, prepare_volume

AMP_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}   # config.PRECISIONS → autocast dtype


def context_inputs(inputs: torch.Tensor, z0: int, z1: int, k: int) -> torch.Tensor:
    """(n, 2k+1, S, S) network inputs for slices [z0, z1) of a (Z, S, S) volume (edge slices replicate)."""
    if k == 0:
        return inputs[z0:z1, None]
    z = torch.arange(z0, z1, device=inputs.device)[:, None] + torch.arange(-k, k + 1, device=inputs.device)[None]
    return inputs[z.clamp_(0, inputs.shape[0] - 1)]


def largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep, for each class, only its largest 3D connected component (26-connectivity)."""
    out = np.zeros_like(labels)
    structure = ndimage.generate_binary_structure(3, 3)
    for c in np.unique(labels):
        if c == 0:
            continue
        comp, n = ndimage.label(labels == c, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[comp == int(sizes.argmax())] = c
    return out


class Predictor:
    """A loaded model plus the settings that turn its outputs into label volumes."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], device: str | torch.device = "cpu",
                 tta: bool = False, threshold: float | None = None, keep_largest: bool = False,
                 mixed_precision: str = "no"):
        self.device = torch.device(device)
        self.meta = meta
        self.channels_last = bool(meta.get("channels_last", False))
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.num_classes = int(meta["arch"]["num_classes"])
        self.context = int(meta["context_slices"])
        self.size = int(meta["train_size"])
        self.modality = str(meta["modality"]).upper()
        self.norm = NormConfig.from_dict(meta["normalization"])
        self.tta = tta
        self.views = tta_views(meta) if tta else [IDENTITY]   # refuses TTA the model was not trained for
        self.threshold = float(meta["threshold"] if threshold is None else threshold)
        self.keep_largest = keep_largest
        self.mixed_precision = mixed_precision
        self.amp_dtype = AMP_DTYPES[mixed_precision]

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", **options: Any) -> Predictor:
        """Load an exported model (raises ModelError with one line when missing or not matching its JSON)."""
        model, meta = load_model(path)          # on the CPU (safetensors rejects e.g. "cpu:0"); moved below
        return cls(model, meta, device, **options)

    def settings(self) -> dict[str, Any]:
        """What, besides the model, decides the output labels."""
        return {"tta": self.tta, "tta_views": len(self.views), "threshold": self.threshold, "keep_largest": self.keep_largest,
                "mixed_precision": self.mixed_precision}

    def tta_text(self) -> str:
        """Which views ``--tta`` averages (one line)."""
        if not self.tta:
            return "TTA: off"
        return describe(self.meta.get("invariances", []), self.views, self.meta.get("invariance_limits"))

    def _autocast(self):
        """Autocast context for the configured precision (a no-op for ``no``)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits → probabilities (sigmoid for one logit, softmax over classes otherwise), float32."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.num_classes == 1 else torch.softmax(logits, dim=1)

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) inputs → (B, K, S, S) float32 probabilities on the device (mean over the TTA views).

        Each pixel's mean is over the views that saw it (a turned or zoomed view misses the canvas's corners).
        """
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        total, weight = None, 0.0
        with self._autocast():
            for view in self.views:
                p = view.inverse(self._activate(self.model(view.forward(x))))
                seen = view.coverage(p)              # None: the view saw every pixel
                if seen is not None:
                    p = p * seen
                total = p if total is None else total + p
                weight = weight + (1.0 if seen is None else seen)
        return total / weight

    def classify(self, probs: np.ndarray) -> np.ndarray:
        """(…, K, H, W) probabilities → (…, H, W) uint8 labels: threshold for one class, argmax otherwise."""
        if self.num_classes == 1:
            return (probs[..., 0, :, :] > self.threshold).astype(np.uint8)
        return probs.argmax(axis=-3).astype(np.uint8)

    def postprocess(self, labels: np.ndarray) -> np.ndarray:
        """The optional largest-component filter over a whole (Z, H, W) label volume."""
        return largest_component(labels) if self.keep_largest and labels.size else labels

    def labels_from_probs(self, probs: np.ndarray, mapping: ResizeMapping) -> np.ndarray:
        """(Z, K, S, S) probabilities on the training grid → (Z, H, W) uint8 labels at the original size."""
        out = np.empty((probs.shape[0], mapping.height, mapping.width), dtype=np.uint8)
        for i in range(probs.shape[0]):      # one slice at a time: never the whole volume's probabilities
            out[i] = self.classify(mapping.inverse(probs[i], is_mask=False))
        return self.postprocess(out)

    def prepare(self, image: np.ndarray, stats: dict[str, float] | None = None) -> tuple[np.ndarray, ResizeMapping]:
        """Scanner volume → training-grid inputs, exactly as training saw them (stats computed when not given)."""
        if stats is None:
            stats = intensity_stats(image, self.modality)
        return prepare_volume(image, stats, self.modality, self.size, self.norm)

    def grid_probabilities(self, inputs: np.ndarray, batch_size: int = CPU_BATCH) -> np.ndarray:
        """(Z, S, S) prepared inputs → (Z, K, S, S) float32 probabilities on the training grid, on the CPU."""
        t = torch.from_numpy(inputs)
        out = np.zeros((inputs.shape[0], self.num_classes, self.size, self.size), np.float32)
        for z0 in range(0, inputs.shape[0], batch_size):
            z1 = min(z0 + batch_size, inputs.shape[0])
            out[z0:z1] = self.probabilities(context_inputs(t, z0, z1, self.context)).cpu().numpy()
        return out

    def segment(self, image: np.ndarray, stats: dict[str, float] | None = None,
                batch_size: int = CPU_BATCH) -> np.ndarray:
        """Scanner volume (Z, H, W) → (Z, H, W) uint8 labels, what a prediction folder holds for it."""
        inputs, mapping = self.prepare(image, stats)
        return self.labels_from_probs(self.grid_probabilities(inputs, batch_size), mapping)

    def predict_volume(self, image: np.ndarray, stats: dict[str, float] | None = None,
                       batch_size: int = CPU_BATCH) -> tuple[np.ndarray, np.ndarray]:
        """Scanner volume (Z, H, W) → (labels (Z, H, W) uint8, probabilities (Z, K, H, W) float32).

        ``stats`` are the volume's intensity statistics (``dlseg.normalize.intensity_stats``; a store keeps
        them per case); computed from ``image`` when not given.
        """
        inputs, mapping = self.prepare(image, stats)
        grid = self.grid_probabilities(inputs, batch_size)
        probs = np.zeros((grid.shape[0], self.num_classes, mapping.height, mapping.width), np.float32)
        for i in range(grid.shape[0]):
            probs[i] = mapping.inverse(grid[i], is_mask=False)
        return self.postprocess(self.classify(probs)), probs
