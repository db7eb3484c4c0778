"""The exported model is replaced as one unit, and a load's fingerprint is that of the bytes it loaded."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from dlseg.errors import ModelError
from dlseg.export import META, WEIGHTS, export_model, load_exported, load_model
from dlseg.model import build_model
from dlseg.normalize import NormConfig

ARCH = {"name": "unet", "in_channels": 1, "num_classes": 1, "base_width": 4, "depth": 2, "bilinear": True}


def tiny(seed: int, epoch: int) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    meta = {"arch": ARCH, "normalization": NormConfig().to_dict(), "train_size": 32, "context_slices": 0,
            "labels": "liver", "modality": "MR", "sequence": "t1-in", "threshold": 0.5, "epoch": epoch}
    return build_model(ARCH), meta


def first_weight(model: torch.nn.Module) -> torch.Tensor:
    return next(iter(model.state_dict().values())).detach().clone()


def test_loads_during_exports_are_consistent(tmp_path):
    versions = {e: tiny(seed, e) for seed, e in ((1, 1), (2, 2))}
    expected = {}
    for e, (model, meta) in versions.items():       # each version's fingerprint, exported alone
        _, exp = load_exported(export_model(model, meta, tmp_path / f"alone{e}" / "model"))
        expected[e] = (first_weight(model), exp.fingerprint)
    assert expected[1][1] != expected[2][1]

    out = tmp_path / "run" / "model"
    export_model(*versions[1], out)
    exports, stop = [0], threading.Event()

    def exporter():
        while not stop.is_set():
            export_model(*versions[2 - exports[0] % 2], out)   # 1, 2, 1, 2, …
            exports[0] += 1

    thread = threading.Thread(target=exporter)
    thread.start()
    seen, loads = set(), 0
    try:
        while loads < 60 or exports[0] < 60:
            model, exp = load_exported(out)
            weight, fingerprint = expected[exp.meta["epoch"]]
            torch.testing.assert_close(first_weight(model), weight, rtol=0, atol=0)
            assert exp.fingerprint == fingerprint
            seen.add(exp.meta["epoch"])
            loads += 1
    finally:
        stop.set()
        thread.join()
    assert seen == {1, 2}
    versions_left = [p for p in out.parent.iterdir() if p.name.startswith(".model.v-")]
    assert len(versions_left) <= 2 and os.readlink(out) in {p.name for p in versions_left}


def test_a_folder_from_before_versions_is_replaced_whole(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / WEIGHTS).write_bytes(b"old")
    (out / META).write_text("{}")
    model, meta = tiny(3, 7)
    export_model(model, meta, out)
    assert out.is_symlink()
    assert load_model(tmp_path)[1]["epoch"] == 7          # a run folder resolves to its model/
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes.txt"):
        export_model(model, meta, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_missing_weights_is_one_line(tmp_path):
    model, meta = tiny(4, 1)
    out = export_model(model, meta, tmp_path / "model")
    os.unlink(out / WEIGHTS)
    with pytest.raises(ModelError, match="weights file missing"):
        load_exported(out)
    with pytest.raises(ModelError, match="no exported model here"):
        load_exported(tmp_path / "nothing")
