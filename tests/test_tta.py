"""TTA that cannot hurt: only the symmetries the model was trained with, refused when there are none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dlseg import trainer
from dlseg.augment import AugmentConfig, invariance_limits, invariances
from dlseg.errors import ModelError
from dlseg.inference.predictor import Predictor
from dlseg.inference.tta import IDENTITY, AffineView, tta_views, views_for
from dlseg.normalize import NormConfig
from dlseg.predict import main as predict_main
from dlseg.store import Store
from dlseg.train import parse
from helpers import TINY_RUN
from test_predict import make_model

NO_SYMMETRY = {"hflip": 0.0, "vflip": 0.0, "transpose": 0.0, "rotate90": 0.0}


def test_invariances_follow_the_augmentation_config():
    assert invariances(AugmentConfig()) == ["hflip", "vflip", "transpose", "rotate90", "scale"]
    assert invariances(AugmentConfig(enabled=False)) == []
    assert invariances(AugmentConfig(hflip=0.5, vflip=0.0, transpose=0.0, rotate90=0.0, scale=0.0)) == ["hflip"]
    small = AugmentConfig(**NO_SYMMETRY, rotate=0.5, rotate_limit=12.0, scale=0.3, scale_limit=0.2)
    assert invariances(small) == ["rotate", "scale"]
    assert invariance_limits(small) == {"rotate": 12.0, "scale": 0.2}
    assert invariances(AugmentConfig(**NO_SYMMETRY, rotate=0.5, rotate_limit=0.0, scale_limit=0.0)) == []


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


def test_small_views_sit_halfway_to_the_training_limits():
    views = views_for(["hflip", "rotate", "scale"], {"rotate": 15.0, "scale": 0.2})
    assert views[:2] == views_for(["hflip"])       # the symmetry group first, then two views per small transform
    assert views[2:] == [AffineView(7.5, 1.0), AffineView(-7.5, 1.0), AffineView(0.0, 0.9), AffineView(0.0, 1.1)]


def test_affine_view_turns_like_rot90_and_maps_back():
    x = torch.randn(2, 3, 9, 9)
    quarter = AffineView(90.0, 1.0)                 # a quarter turn lands exactly on pixel centres
    assert torch.allclose(quarter.forward(x), torch.rot90(x, 1, (-2, -1)), atol=1e-5)
    assert torch.allclose(quarter.inverse(quarter.forward(x)), x, atol=1e-5)
    assert quarter.coverage(x).min() == 1            # a square turned by 90° covers itself
    yy, xx = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    smooth = torch.sin(xx / 6 + yy / 9)[None, None]
    for view in (AffineView(7.5, 1.0), AffineView(0.0, 0.9), AffineView(0.0, 1.1)):
        back = view.inverse(view.forward(smooth))
        inner = view.coverage(smooth).bool()[..., 4:-4, 4:-4]   # seen, and away from the replicated edges
        assert inner.sum() > 500 and (back - smooth)[..., 4:-4, 4:-4][inner].abs().max() < 0.03


def test_coverage_drops_what_a_view_never_saw():
    zoom_in = AffineView(0.0, 1.25).coverage(torch.zeros(1, 1, 10, 10))[0, 0]
    assert zoom_in[0].sum() == 0 and zoom_in[:, 0].sum() == 0 and zoom_in[2:8, 2:8].min() == 1   # a crop: no edge
    assert AffineView(0.0, 0.8).coverage(torch.zeros(1, 1, 10, 10)).min() == 1        # zoomed out: saw everything
    turned = AffineView(30.0, 1.0).coverage(torch.zeros(1, 1, 10, 10))[0, 0]
    assert turned[0, 0] == 0 and turned[5, 5] == 1 and turned[0, 5] == 1               # only the corners are lost


def pointwise_predictor(inv: list[str], kernel: int, limits: dict[str, float] | None = None) -> Predictor:
    """A one-layer 'model' (k×k conv, 2 classes) behind a Predictor with TTA over ``inv``."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 2, kernel, padding=kernel // 2)
    meta = {"arch": {"num_classes": 2}, "context_slices": 0, "train_size": 8, "modality": "MR",
            "normalization": NormConfig().to_dict(), "threshold": 0.5, "invariances": inv,
            "invariance_limits": limits or {}}
    return Predictor(conv, meta, tta=True)


def test_tta_over_small_views_is_the_mean_over_views_that_saw_each_pixel():
    x = torch.randn(2, 1, 12, 12)
    pred = pointwise_predictor(["scale"], 3, {"scale": 0.4})         # views: identity, ×0.8, ×1.2
    views = pred.views
    with torch.no_grad():
        probs = [v.inverse(torch.softmax(pred.model(v.forward(x)), 1)) for v in views]
    seen = views[2].coverage(x)                                     # the ×1.2 crop misses the border
    by_hand = (probs[0] + probs[1] + probs[2] * seen) / (2 + seen)
    assert torch.allclose(pred.probabilities(x), by_hand, atol=1e-6)
    assert torch.allclose(pred.probabilities(x)[..., 0, 0], ((probs[0] + probs[1]) / 2)[..., 0, 0], atol=1e-6)
    assert pred.tta_text().startswith("TTA: zoom ×0.8/×1.2 (3 views")


@pytest.mark.parametrize("limits, says", [({}, "invariance_limits['rotate'] = None"),
                                          ({"rotate": 120.0}, "expected a number in (0, 90.0]")])
def test_small_transform_without_a_sound_limit_is_refused(limits, says):
    meta = {"invariances": ["rotate"], "invariance_limits": limits}
    with pytest.raises(ModelError, match=r"model.json: invariance_limits") as err:
        tta_views(meta)
    assert says in str(err.value) and "\n" not in str(err.value)


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


@pytest.mark.parametrize("inv, says", [([], "trained without flips, transposes, rotations or zooms"),
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


FLIPS = ["--augment.transpose", "0", "--augment.rotate90", "0", "--augment.scale", "0"]
SMALL = ["--augment.hflip", "0", "--augment.vflip", "0", "--augment.transpose", "0", "--augment.rotate90", "0",
         "--augment.rotate", "0.5", "--augment.rotate_limit", "15", "--augment.scale", "0.5", "--augment.scale_limit",
         "0.15"]


# a tiny model learns the turned and zoomed samples more slowly: three epochs at a lower rate
@pytest.mark.parametrize("augment, epochs, lr, inv, n", [(FLIPS, 1, "1e-2", ["hflip", "vflip"], 4),
                                                         (SMALL, 3, "3e-3", ["rotate", "scale"], 5)])
def test_tta_is_not_worse_than_without(synthetic_store, tmp_path, capsys, augment, epochs, lr, inv, n):
    out = tmp_path / "run"
    args = ["--data", str(synthetic_store), "--out", str(out), *TINY_RUN, "--loader.workers", "0", "--epochs", str(epochs),
            "--optim.lr", lr, *augment, "--augment.brightness_contrast", "0", "--keep_last", "1"]
    assert trainer.run(parse(args)) == 0
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["invariances"] == inv
    assert meta["invariance_limits"] == ({"rotate": 15.0, "scale": 0.15} if "rotate" in inv else {})
    store = Store(synthetic_store)
    scores = {}
    for tta in (False, True):
        pred = Predictor.load(out, tta=tta)
        assert len(pred.views) == (n if tta else 1)
        scores[tta] = np.mean([dice(pred.predict_volume(*read(store, c))[0] == 1, store.read_case(c)[1] == 1)
                               for c in store.split_cases("val")])
    assert scores[False] > 0.1                       # the model learned something, so the comparison means something
    print(f"TTA {inv}: Dice {scores[False]:.4f} without, {scores[True]:.4f} with")
    assert scores[True] >= scores[False] - 0.02      # noise, not the 0.35 a wrong symmetry costs


def read(store: Store, case: str) -> tuple[np.ndarray, dict]:
    return store.read_case(case, mask=False)[0], store.info(case).attrs["stats"]
