"""TTA that cannot hurt: only the symmetries the model was trained with, refused when there are none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dlseg import trainer
from dlseg.augment import AugmentConfig, invariances
from dlseg.inference.predictor import Predictor
from dlseg.inference.tta import IDENTITY, views_for
from dlseg.normalize import NormConfig
from dlseg.predict import main as predict_main
from dlseg.store import Store
from dlseg.train import parse
from helpers import TINY_RUN
from test_predict import make_model


def test_invariances_follow_the_augmentation_config():
    assert invariances(AugmentConfig()) == ["hflip", "vflip", "transpose", "rotate90"]
    assert invariances(AugmentConfig(enabled=False)) == []
    assert invariances(AugmentConfig(hflip=0.5, vflip=0.0, transpose=0.0, rotate90=0.0)) == ["hflip"]


@pytest.mark.parametrize("inv, n", [(["hflip"], 2), (["vflip"], 2), (["hflip", "vflip"], 4), (["transpose"], 2),
                                    (["rotate90"], 4), (["hflip", "transpose"], 8),
                                    (["hflip", "vflip", "transpose", "rotate90"], 8)])
def test_views_are_the_group_the_transforms_generate(inv, n):
    views = views_for(inv)
    assert len(views) == n and views[0] == IDENTITY and len(set(views)) == n
    x = torch.arange(2 * 5 * 5.0).reshape(2, 1, 5, 5)
    for v in views:
        assert torch.equal(v.inverse(v.forward(x)), x)
    if inv == ["rotate90"]:          # exactly the four quarter turns
        turns = {torch.rot90(x, k, (-2, -1)).numpy().tobytes() for k in range(4)}
        assert {v.forward(x).numpy().tobytes() for v in views} == turns


def pointwise_predictor(inv: list[str], kernel: int) -> Predictor:
    """A one-layer 'model' (k×k conv, 2 classes) behind a Predictor with TTA over ``inv``."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 2, kernel, padding=kernel // 2)
    meta = {"arch": {"num_classes": 2}, "context_slices": 0, "train_size": 8, "modality": "MR",
            "normalization": NormConfig().to_dict(), "threshold": 0.5, "invariances": inv}
    return Predictor(conv, meta, tta=True)


def test_tta_maps_every_view_back():
    x = torch.randn(3, 1, 8, 8)
    full = ["hflip", "vflip", "transpose", "rotate90"]
    one_by_one = pointwise_predictor(full, 1)       # a 1×1 conv commutes with every symmetry: TTA changes nothing
    plain = Predictor(one_by_one.model, {**one_by_one.meta}, tta=False)
    assert torch.allclose(one_by_one.probabilities(x), plain.probabilities(x), atol=1e-6)
    rot = pointwise_predictor(["rotate90"], 3)      # a 3×3 conv does not: the mean of the four quarter turns
    with torch.no_grad():
        by_hand = torch.stack([torch.rot90(torch.softmax(rot.model(torch.rot90(x, k, (-2, -1))), 1), -k, (-2, -1))
                               for k in range(4)]).mean(0)
    assert torch.allclose(rot.probabilities(x), by_hand, atol=1e-6)


@pytest.mark.parametrize("inv, says", [([], "trained without flips, transposes or rotations"),
                                       (None, "does not record which flips/rotations")])
def test_tta_refused_in_one_line(tmp_path, capsys, inv, says):
    model = make_model(tmp_path / "m", "MR", "t1-in", invariances=() if inv == [] else ("hflip",))
    if inv is None:                 # a model exported before dlseg recorded its invariances
        meta = json.loads((model / "model.json").read_text())
        del meta["invariances"]
        (model / "model.json").write_text(json.dumps(meta))
    code = predict_main(["--model", str(model), "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--tta"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and says in err and "--tta refused" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    Predictor.load(model, tta=False)      # without --tta the same model predicts


def dice(labels: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * np.sum(labels & truth) / max(labels.sum() + truth.sum(), 1))


def test_tta_with_flips_is_not_worse_than_without(synthetic_store, tmp_path, capsys):
    out = tmp_path / "flips"
    args = ["--data", str(synthetic_store), "--out", str(out), *TINY_RUN, "--loader.workers", "0", "--epochs", "1",
            "--optim.lr", "1e-2", "--augment.transpose", "0", "--augment.rotate90", "0", "--augment.scale", "0",
            "--augment.brightness_contrast", "0", "--keep_last", "1"]
    assert trainer.run(parse(args)) == 0
    assert json.loads((out / "model" / "model.json").read_text())["invariances"] == ["hflip", "vflip"]
    store = Store(synthetic_store)
    scores = {}
    for tta in (False, True):
        pred = Predictor.load(out, tta=tta)
        assert len(pred.views) == (4 if tta else 1)
        scores[tta] = np.mean([dice(pred.predict_volume(*read(store, c))[0] == 1, store.read_case(c)[1] == 1)
                               for c in store.split_cases("val")])
    assert scores[False] > 0.1                       # the model learned something, so the comparison means something
    assert scores[True] >= scores[False] - 0.02      # noise, not the 0.35 a wrong symmetry costs


def read(store: Store, case: str) -> tuple[np.ndarray, dict]:
    return store.read_case(case, mask=False)[0], store.info(case).attrs["stats"]
