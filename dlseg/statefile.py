"""State without pickle: any nest of dicts, lists, tuples, numbers, strings, arrays and tensors as JSON + safetensors.

``save_state(folder, name, obj)`` writes ``name.json`` (the structure; tensors as references) and
``name.safetensors`` (the tensors, possibly none); ``load_state`` reads them back with ``json`` and
``safetensors`` only, so a planted file can at worst fail to parse, never run code. Tuples, non-string dict keys
and numpy arrays are tagged so the value comes back with the same Python types (``random.setstate`` and
``np.random.set_state`` need their tuples); floats round-trip exactly (``repr``), also NaN and infinities.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

FORMAT = "dlseg-state"
VERSION = 1
_TAGS = ("__tensor__", "__tuple__", "__items__", "__ndarray__")


def state_files(name: str) -> tuple[str, str]:
    """The two file names ``save_state`` writes for ``name``."""
    return f"{name}.json", f"{name}.safetensors"


def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """``obj`` as JSON-able data; its tensors moved into ``tensors`` under their path in the structure."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, f"{path}.k{i}"), encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot save a {type(obj).__name__} at {path or 'the top'} without pickle")


def decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        return tensors[data["__tensor__"]]
    if "__tuple__" in data:
        return tuple(decode(v, tensors) for v in data["__tuple__"])
    if "__items__" in data:
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in data["__items__"]}
    if "__ndarray__" in data:
        return np.asarray(data["__ndarray__"], dtype=np.dtype(data["dtype"])).reshape(data["shape"])
    return {k: decode(v, tensors) for k, v in data.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def write_state(folder: Path, name: str, obj: Any, write_bytes) -> list[str]:
    """Write ``obj`` as ``name.json`` + ``name.safetensors`` through ``write_bytes(path, data)``; returns the names."""
    tensors: dict[str, torch.Tensor] = {}
    tree = encode(obj, tensors)
    json_name, tensor_name = state_files(name)
    payload = json.dumps({"format": FORMAT, "version": VERSION, "tree": tree}, allow_nan=True)
    write_bytes(folder / tensor_name, _safetensors_bytes(tensors))
    write_bytes(folder / json_name, payload.encode())
    return [tensor_name, json_name]


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors)


def read_state(folder: Path, name: str, device: str = "cpu") -> Any:
    """What :func:`write_state` wrote; ValueError naming the file when it is not such a file."""
    json_name, tensor_name = state_files(name)
    data = read_json(folder / json_name)
    if data.get("format") != FORMAT or not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise ValueError(f"{folder / json_name}: not a {FORMAT} file of version <= {VERSION}")
    try:
        tensors = load_file(str(folder / tensor_name), device=device)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{folder / tensor_name}: unreadable tensors ({type(e).__name__}: {e})") from None
    try:
        return decode(data["tree"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / json_name}: inconsistent with its tensors ({e})") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_bytes().decode())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def check_safetensors(path: Path) -> None:
    """Open a safetensors file's header (no tensors read); ValueError naming the file when it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception as e:
        raise ValueError(f"{path}: not a safetensors file ({type(e).__name__})") from None


def save_model_file(path: Path, model: torch.nn.Module, write_bytes) -> None:
    """A model's state dict as safetensors bytes (contiguous copies: channels_last weights are strided)."""
    write_bytes(path, save({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}))


def load_model_file(path: Path, model: torch.nn.Module) -> None:
    """Weights from a safetensors file into ``model`` (strict: same names and shapes; copied to its device)."""
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path}: unreadable tensors ({type(e).__name__}: {e})") from None
    model.load_state_dict(tensors)

