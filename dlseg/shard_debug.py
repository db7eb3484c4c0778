"""``--debug_shards``: per rank and epoch, the slice ids it trained on and a digest of its weights.

Written to ``<out>/debug/rank<R>.jsonl`` for the distributed tests, which check that ranks see disjoint shards
and hold identical weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the names and bytes of a model's state dict (to compare ranks and runs)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def write_shard_record(out: Path, epoch: int, rank: int, world_size: int, batches: list[list[str]],
                       model: torch.nn.Module) -> None:
    """Append one epoch's record (its batches' slice ids, the weights' digest) to this rank's file."""
    debug = out / "debug"
    debug.mkdir(parents=True, exist_ok=True)
    record = {"epoch": epoch, "rank": rank, "world_size": world_size, "batches": batches,
              "weights": weights_digest(model)}
    with open(debug / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
