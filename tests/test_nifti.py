"""NIfTI datasets in (MSD and nnU-Net layouts) and NIfTI predictions out.

Synthetic datasets are built here: tiny volumes, anisotropic spacing, orientations that are not the store's
canonical one (RAS, a permuted and flipped axis order, LPS). Expected canonical arrays come from nibabel's own
``as_closest_canonical`` (RAS) flipped to LPS, a path independent of dlseg's orientation code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dlseg.evaluate import main as evaluate_main
from dlseg.export import export_model
from dlseg.inference import outputs
from dlseg.inference.config import PredictConfig
from dlseg.inference.runner import predict_cohort
from dlseg.model import build_model
from dlseg.normalize import NormConfig
from dlseg.predict import main as predict_main
from dlseg.sources.nifti import input_images
from dlseg.sources.nifti_volume import HEADER_FIELDS, from_canonical, read_volume, to_canonical
from dlseg.store import Store
from preprocess.cli import main as preprocess_main

from conftest import SHARED

DEV = SHARED / "data" / "chaos_t2_dev"
SHAPE = (12, 10, 6)                                    # source voxel axes (i, j, k)
AFFINES = {
    # RAS axes: x and y flip to reach LPS
    "ras": np.array([[0.8, 0, 0, -4.0], [0, 0.7, 0, 6.0], [0, 0, 3.0, 12.0], [0, 0, 0, 1]]),
    # i → Inferior, j → Left, k → Anterior: a permutation with flips, anisotropic
    "perm": np.array([[0, -0.8, 0, 10.0], [0, 0, 0.7, -5.0], [-3.0, 0, 0, 20.0], [0, 0, 0, 1]]),
    # already the canonical orientation (L, P, S)
    "lps": np.array([[-0.9, 0, 0, 1.0], [0, -0.6, 0, 2.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]]),
}
LPS = np.diag([-1.0, -1.0, 1.0])


def expected_canonical(img: nib.Nifti1Image) -> np.ndarray:
    """(z, y, x) in L, P, S order through nibabel's RAS canonical image."""
    ras = np.asarray(nib.as_closest_canonical(img).dataobj)
    return ras[::-1, ::-1, :].transpose(2, 1, 0)


def phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Source (i, j, k) image (integers stored as float) and labels 0..2 with a one-voxel marker (label 2)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 500, SHAPE).astype(np.float64)
    labels = np.zeros(SHAPE, np.float64)
    labels[2:8, 3:7, 1:4] = 1
    labels[9, 1, 4] = 2
    return image, labels


def save(path: Path, data: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 1) -> nib.Nifti1Image:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return nib.load(str(path))


def msd_dataset(root: Path, cases: dict[str, str], labels: dict[str, str] | None = None) -> Path:
    """An MSD dataset: one case per (name → orientation key)."""
    training = []
    for n, (name, orient) in enumerate(cases.items()):
        image, lab = phantom(n)
        save(root / "imagesTr" / f"{name}.nii.gz", image, AFFINES[orient])
        save(root / "labelsTr" / f"{name}.nii.gz", lab, AFFINES[orient])
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    doc = {"name": "synthetic", "modality": {"0": "MRI"}, "training": training, "test": [],
           "labels": labels or {"0": "background", "1": "liver", "2": "marker"}}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root


def nnunet_dataset(root: Path, channels: dict[str, str] | None = None) -> Path:
    """An nnU-Net v2 raw dataset: two training cases (RAS, permuted) and one test image."""
    for n, (case, orient) in enumerate((("abd_001", "ras"), ("abd_002", "perm"))):
        image, lab = phantom(n)
        save(root / "imagesTr" / f"{case}_0000.nii.gz", image.astype(np.int16), AFFINES[orient])
        save(root / "labelsTr" / f"{case}.nii.gz", lab.astype(np.uint8), AFFINES[orient])
    save(root / "imagesTs" / "abd_101_0000.nii.gz", phantom(5)[0].astype(np.int16), AFFINES["lps"])
    doc = {"channel_names": channels or {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
           "numTraining": 2, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root


def preprocess(src: Path, out: Path, *args: str) -> int:
    return preprocess_main([str(src), str(out), "--workers", "1", *args])


def lps_position(geom: dict, z: int, y: int, x: int) -> np.ndarray:
    """World (LPS) position of a canonical voxel from the store's DICOM-style geometry."""
    dz, dy, dx = geom["spacing"]
    d = np.asarray(geom["direction"], float).reshape(3, 3)
    return np.asarray(geom["origin"]) + x * dx * d[0] + y * dy * d[1] + z * dz * d[2]


# ---------------------------------------------------------------------------------------------- orientation

@pytest.mark.parametrize("orient", sorted(AFFINES))
def test_canonical_orientation_and_geometry(orient, tmp_path):
    image, labels = phantom(0)
    img = save(tmp_path / "a.nii.gz", image, AFFINES[orient])
    vol = read_volume(tmp_path / "a.nii.gz")
    assert vol.data.dtype == np.int16                               # integral floats are stored exactly
    assert np.array_equal(vol.data, expected_canonical(img))
    assert np.array_equal(from_canonical(vol.data, vol.geometry["transform"]), image)
    # the marker voxel keeps its world position: source affine vs the store's (spacing, origin, direction)
    marker = tuple(np.argwhere(to_canonical(labels, vol.geometry["transform"]) == 2)[0])
    world = LPS @ (AFFINES[orient] @ [9, 1, 4, 1])[:3]
    assert np.allclose(lps_position(vars(vol), *marker), world, atol=1e-5)
    # spacing kept: the source's voxel sizes, reordered to (z, y, x)
    assert sorted(vol.spacing) == pytest.approx(sorted(np.linalg.norm(AFFINES[orient][:3, :3], axis=0)))
    assert nib.aff2axcodes(outputs.nifti_affine(vol.spacing, vol.origin, vol.direction)) == ("L", "P", "S")


# ---------------------------------------------------------------------------------------------- datasets in

def test_msd_dataset_to_store(tmp_path, capsys):
    src = msd_dataset(tmp_path / "msd", {"p1": "ras", "p2": "perm", "p3": "lps", "p4": "ras", "p5": "perm"})
    bad = tmp_path / "msd" / "labelsTr" / "p4.nii.gz"
    save(bad, phantom(3)[1] + 0.5 * (phantom(3)[1] == 2), AFFINES["ras"])          # 2.5: not an integer
    undeclared = tmp_path / "msd" / "labelsTr" / "p5.nii.gz"
    save(undeclared, np.where(phantom(4)[1] == 2, 7.0, phantom(4)[1]), AFFINES["perm"])
    out = tmp_path / "s.zarr"
    assert preprocess(src, out, "--labels", "all", "--val-fraction", "0.34", "--qa") == 1
    err = capsys.readouterr().out
    assert "labelsTr/p4.nii.gz" in err and "label values are not integers: 2.5" in err
    assert "labelsTr/p5.nii.gz" in err and "label values 7 are not declared" in err
    store = Store(out)
    assert store.cases == ["p1", "p2", "p3"]
    assert store.label_map == {"0": "background", "1": "liver", "2": "marker"}
    split = store.attrs["split"]
    assert sorted(split["train"] + split["val"]) == ["p1", "p2", "p3"] and len(split["val"]) >= 1
    assert split["patients"]["val"][0].startswith("MR-")                        # patient = case
    for n, cid in enumerate(store.cases):
        attrs = store.info(cid).attrs
        img = nib.load(str(src / "imagesTr" / f"{cid}.nii.gz"))
        image, mask = store.read_case(cid)
        assert np.array_equal(image, expected_canonical(img))
        lab = nib.load(str(src / "labelsTr" / f"{cid}.nii.gz"))
        assert np.array_equal(mask, expected_canonical(lab).astype(np.uint8))
        assert attrs["modality"] == "MR" and attrs["sequence"] == "mr" and attrs["order"] == "dataset"
        assert attrs["source_files"] == [f"imagesTr/{cid}.nii.gz"]
        assert np.allclose(attrs["nifti"]["affine"], img.affine) and attrs["nifti"]["shape"] == list(SHAPE)
        assert (tmp_path / "s.qa" / f"{cid}.png").is_file()
    # resumable: a second run converts nothing
    before = store.fingerprint
    assert preprocess(src, out, "--labels", "all", "--val-fraction", "0.34") == 1
    assert "0 written, 3 unchanged, 2 failed" in capsys.readouterr().out.replace("\n", " ")
    assert Store(out).fingerprint == before


def test_msd_one_structure_and_bad_label_choice(tmp_path, capsys):
    src = msd_dataset(tmp_path / "msd", {"p1": "perm", "p2": "ras"})
    out = tmp_path / "marker.zarr"
    assert preprocess(src, out, "--labels", "Marker", "--val-fraction", "0.5") == 0
    store = Store(out)
    assert store.label_map == {"0": "background", "1": "marker"}
    _, mask = store.read_case("p1")
    assert mask.sum() == 1 and mask.max() == 1                                  # only the marker voxel
    # dataset.json now calls value 1 the marker: the label selection is in the fingerprint, the cases are redone
    doc = json.loads((src / "dataset.json").read_text())
    doc["labels"] = {"0": "background", "1": "marker", "2": "liver"}
    (src / "dataset.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert preprocess(src, out, "--labels", "Marker", "--val-fraction", "0.5") == 0
    assert "2 written, 0 unchanged" in " ".join(capsys.readouterr().out.split())
    assert Store(out).read_case("p1")[1].sum() == 6 * 4 * 3                     # the value-1 box
    assert preprocess(src, tmp_path / "x.zarr", "--labels", "kidney") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--labels 'kidney'" in err[0] and "have: marker, liver" in err[0]
    assert not (tmp_path / "x.zarr").exists()


def test_nnunet_dataset_to_store(tmp_path):
    src = nnunet_dataset(tmp_path / "nn")
    out = tmp_path / "nn.zarr"
    assert preprocess(src, out, "--labels", "spleen", "--val-fraction", "0.5") == 0
    store = Store(out)
    assert store.cases == ["abd_001", "abd_002", "abd_101"]
    assert store.split_cases("unlabeled") == ["abd_101"]
    assert store.label_map == {"0": "background", "1": "spleen"}
    attrs = store.info("abd_002").attrs
    assert attrs["modality"] == "CT" and attrs["sequence"] == "ct" and attrs["order"] == "stem"
    assert attrs["source_files"] == ["imagesTr/abd_002_0000.nii.gz"]
    assert attrs["spacing"] == pytest.approx([3.0, 0.7, 0.8])                   # k → A (y), j → L (x), i → I (z)
    image, mask = store.read_case("abd_002")
    assert image.dtype == np.int16
    assert np.array_equal(mask, expected_canonical(nib.load(str(src / "labelsTr" / "abd_002.nii.gz"))) == 2)


def test_multichannel_dataset_is_one_line(tmp_path, capsys):
    src = nnunet_dataset(tmp_path / "nn", channels={"0": "T2", "1": "ADC"})
    assert preprocess(src, tmp_path / "o.zarr") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset.json" in err[0] and "2 input channels (T2, ADC)" in err[0]


def test_real_development_set(tmp_path):
    if not (DEV / "dataset.json").is_file():
        pytest.skip(f"real CHAOS T2 development set not found at {DEV}")
    src = tmp_path / "dev"
    doc = json.loads((DEV / "dataset.json").read_text())
    doc["training"] = doc["training"][:2]
    for folder in ("imagesTr", "labelsTr"):
        (src / folder).mkdir(parents=True)
        for entry in doc["training"]:
            shutil.copy(DEV / entry["image" if folder == "imagesTr" else "label"], src / folder)
    (src / "dataset.json").write_text(json.dumps(doc))
    out = tmp_path / "dev.zarr"
    assert preprocess(src, out, "--labels", "organs", "--val-fraction", "0.5") == 0
    store = Store(out)
    assert store.label_map == {"0": "background", "1": "liver", "2": "right kidney", "3": "left kidney",
                               "4": "spleen"}
    for cid in store.cases:
        _, mask = store.read_case(cid)
        assert store.info(cid).spacing == pytest.approx((7.7, 1.25, 1.25), rel=1e-3)
        assert set(np.unique(mask)) == {0, 1, 2, 3, 4}
        centre = {k: np.argwhere(mask == k).mean(axis=0) for k in (1, 2, 3, 4)}   # (z, y, x)
        # canonical x runs to the patient's left: liver and right kidney left of the spleen and left kidney
        assert centre[1][2] < centre[4][2] and centre[2][2] < centre[3][2]


# ---------------------------------------------------------------------------------------------- predict, evaluate

def make_model(out: Path, modality: str, num_classes: int) -> Path:
    """A tiny random U-Net (plumbing, not accuracy) with logits spread enough for every class to appear."""
    torch.manual_seed(0)
    arch = {"name": "unet", "in_channels": 1, "num_classes": num_classes, "base_width": 4, "depth": 2,
            "bilinear": True}
    model = build_model(arch).eval()
    with torch.no_grad():
        y = model(torch.randn(8, 1, 16, 16))
        k = 4.0 / float(y.std())
        model.outc.conv.weight.mul_(k)
        model.outc.conv.bias.copy_((model.outc.conv.bias - y.mean(dim=(0, 2, 3))) * k)
    meta = {"arch": arch, "normalization": NormConfig().to_dict(), "train_size": 16, "context_slices": 0,
            "labels": "organs", "modality": modality, "sequence": modality.lower(), "threshold": 0.5,
            "channels_last": False}
    export_model(model, meta, out)
    return out


def assert_overlays_source(pred_file: Path, source: Path, npz_labels: np.ndarray) -> None:
    """Same grid, affine and geometry header fields as the source; labels on the voxels the npz says."""
    out, src = nib.load(str(pred_file)), nib.load(str(source))
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    for key in HEADER_FIELDS:
        assert np.array_equal(out.header[key], src.header[key]), key
    assert out.get_data_dtype() == np.uint8
    assert np.array_equal(expected_canonical(out), npz_labels)


def test_predict_nifti_folder_and_store_round_trip(tmp_path):
    src = nnunet_dataset(tmp_path / "nn")
    model = make_model(tmp_path / "model", "CT", 3)
    out = tmp_path / "pred"
    cfg = PredictConfig(model=str(model), input=str(src / "imagesTr"), out=str(out), workers=0, batch_size=8,
                        formats=("npz", "nifti"))
    summary = predict_cohort(cfg)
    assert summary["failed"] == 0 and summary["predicted"] == 2
    for case in ("abd_001", "abd_002"):
        folder = out / case
        labels = outputs.read_labels(folder)
        source = src / "imagesTr" / f"{case}_0000.nii.gz"
        assert labels.shape == expected_canonical(nib.load(str(source))).shape
        assert len(np.unique(labels)) > 1
        assert_overlays_source(folder / outputs.NIFTI, source, labels)
        sources = json.loads((folder / outputs.SOURCES).read_text())
        assert len(sources) == labels.shape[0] and list(sources.values())[0] == f"{case}_0000.nii.gz#z=0"
    # the same cases through a store: the store's recorded geometry is written back
    store = tmp_path / "nn.zarr"
    assert preprocess(src, store, "--labels", "all", "--val-fraction", "0.5") == 0
    out2 = tmp_path / "pred_store"
    predict_cohort(PredictConfig(model=str(model), input=str(store), out=str(out2), workers=0, batch_size=8,
                                 formats=("npz", "nifti")))
    for case in ("abd_001", "abd_002"):
        labels = outputs.read_labels(out2 / case)
        assert np.array_equal(labels, outputs.read_labels(out / case))
        assert_overlays_source(out2 / case / outputs.NIFTI, src / "imagesTr" / f"{case}_0000.nii.gz", labels)
    # evaluate against labelsTr: paired by case id, liver = dataset.json's value, Dice from the canonical grids
    assert evaluate_main(["--pred", str(out), "--truth", str(src / "labelsTr"), "--classes", "liver"]) == 0
    doc = json.loads((out / "evaluation.summary.json").read_text())
    assert doc["scored"] == 2 and doc["predictions_without_truth"] == []
    for row in doc["per_case"]:
        pred = outputs.read_labels(out / row["case"]) == 1
        truth = expected_canonical(nib.load(str(src / "labelsTr" / f"{row['case']}.nii.gz"))) == 1
        assert row["Dice"] == pytest.approx(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))


def test_predict_single_file_and_channel_suffixes(tmp_path):
    src = nnunet_dataset(tmp_path / "nn")
    model = make_model(tmp_path / "model", "CT", 3)
    out = tmp_path / "pred"
    single = src / "imagesTs" / "abd_101_0000.nii.gz"
    summary = predict_cohort(PredictConfig(model=str(model), input=str(single), out=str(out), workers=0,
                                           formats=("npz", "nifti")))
    assert summary["predicted"] == 1 and summary["failed"] == 0
    assert_overlays_source(out / "abd_101" / outputs.NIFTI, single, outputs.read_labels(out / "abd_101"))
    # a folder of nnU-Net names: _0000 dropped, another channel fails that case alone
    shutil.copy(src / "imagesTr" / "abd_001_0000.nii.gz", src / "imagesTr" / "abd_001_0001.nii.gz")
    found, failed = input_images(src / "imagesTr")
    assert [c for c, _ in found] == ["abd_002"]
    assert failed and failed[0][0] == "abd_001" and "channel 0001" in failed[0][1]


def test_grid_mismatch_and_missing_files_fail_alone(tmp_path, capsys):
    src = msd_dataset(tmp_path / "msd", {"p1": "ras", "p2": "perm", "p3": "lps"})
    save(src / "labelsTr" / "p2.nii.gz", phantom(1)[1], AFFINES["ras"])             # another voxel grid
    (src / "imagesTr" / "p3.nii.gz").unlink()
    assert preprocess(src, tmp_path / "s.zarr", "--val-fraction", "0") == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "labelsTr/p2.nii.gz" in text and "different affines" in text
    assert "imagesTr/p3.nii.gz" in text and "not found" in text
    assert Store(tmp_path / "s.zarr").cases == ["p1"]


def test_predict_refuses_a_dataset_root(tmp_path, capsys):
    src = nnunet_dataset(tmp_path / "nn")
    model = make_model(tmp_path / "model", "CT", 3)
    assert predict_main(["--model", str(model), "--input", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a NIfTI dataset; pass its imagesTs/" in err[0]
