"""DICOM series reading, ground-truth masks, and bad inputs: each a one-line reason naming the file."""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dlseg.errors import CaseError
from dlseg.sources.dicom import find_series, header_meta, read_dataset, read_series
from dlseg.sources.masks import read_masks
from helpers import volume, write_slice, write_sr


def series(tmp_path, n=4, **kw):
    vol = volume(n)
    return vol, [write_slice(tmp_path / f"s{k}.dcm", vol[k], 10.0 - 2.5 * k, instance=k + 1, **kw) for k in range(n)]


def test_int16_when_exact_with_geometry(tmp_path):
    vol, files = series(tmp_path)
    v = read_series(files)
    assert v.image.dtype == np.int16
    np.testing.assert_array_equal(v.image, vol.astype(np.int32) - 1000)
    assert v.spacing == (2.5, 0.8, 0.7)                      # z from positions, (row, col) from PixelSpacing
    assert v.origin == (-100.0, -90.0, 10.0)
    assert v.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)   # file order runs feet-ward
    assert v.warnings == [] and v.modality == "CT"


def test_float32_when_rescale_is_fractional(tmp_path):
    vol, files = series(tmp_path, slope=0.5, intercept=-3.25)
    v = read_series(files)
    assert v.image.dtype == np.float32
    ref = np.stack([apply_modality_lut(pydicom.dcmread(f).pixel_array, pydicom.dcmread(f)) for f in files])
    np.testing.assert_array_equal(v.image, ref.astype(np.float32))


def test_float32_when_out_of_int16_range(tmp_path):
    vol = np.full((2, 4, 4), 40000, np.uint16)
    files = [write_slice(tmp_path / f"{k}.dcm", vol[k], k, slope=None) for k in range(2)]
    v = read_series(files)
    assert v.image.dtype == np.float32 and v.image.max() == 40000.0


def test_non_monotonic_positions_warn_and_keep_file_order(tmp_path):
    vol = volume(4)
    zs = [0.0, 2.0, 1.0, 3.0]
    files = [write_slice(tmp_path / f"{k}.dcm", vol[k], zs[k]) for k in range(4)]
    v = read_series(files)
    np.testing.assert_array_equal(v.image, vol.astype(np.int32) - 1000)
    (note,) = v.warnings
    assert "not monotonic" in note and "2.dcm" in note


def test_spacing_falls_back_to_thickness_for_one_slice(tmp_path):
    _, files = series(tmp_path, n=1)
    assert read_series(files).spacing[0] == 3.0


def test_non_image_objects_skipped_with_note(tmp_path):
    vol, files = series(tmp_path, n=3)
    sr = write_sr(tmp_path / "report.dcm")
    v = read_series([files[0], sr, files[1], files[2]])
    assert v.image.shape == (3, 12, 10) and v.skipped == [sr]
    assert "report.dcm" in v.warnings[0]


def test_mixed_shapes_and_orientations_fail(tmp_path):
    _, files = series(tmp_path, n=2)
    odd = write_slice(tmp_path / "odd.dcm", np.zeros((8, 10), np.uint16), 5.0)
    with pytest.raises(CaseError) as e:
        read_series(files + [odd])
    assert str(e.value) == f"{odd}: slice is 8x10 but the series' first slice is 12x10 (mixed shapes)"
    tilted = write_slice(tmp_path / "tilted.dcm", volume(1)[0], 5.0, orientation=(1, 0, 0, 0, 0, -1))
    with pytest.raises(CaseError, match="mixed orientations"):
        read_series(files + [tilted])


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_pydicom_transfer_syntaxes_decode_natively(name):
    path = get_testdata_file(name)
    v = read_series([path])
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(v.image[0], apply_modality_lut(ds.pixel_array, ds))
    assert v.image.dtype == np.int16


def test_deflated_decodes_natively(tmp_path):
    src = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    path = tmp_path / "deflated.dcm"
    src.save_as(path, implicit_vr=False, little_endian=True)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(read_series([path]).image[0], src.pixel_array)


def _one_line_error(files) -> str:
    with pytest.raises(CaseError) as e:
        read_series(files)
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_truncated_file_is_one_line(tmp_path):
    path = get_testdata_file("MR_truncated.dcm")
    assert _one_line_error([path]).startswith(f"{path}: cannot decode pixel data (")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(open(get_testdata_file("MR_small.dcm"), "rb").read()[:300])
    assert _one_line_error([cut]).startswith(f"{cut}: ")


def test_not_dicom_and_no_images(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_text("hello")
    assert _one_line_error([junk]) == f"{junk}: not a DICOM file (no DICM header)"
    hollow = tmp_path / "hollow.dcm"
    hollow.write_bytes(b"\0" * 128 + b"DICM")
    assert _one_line_error([hollow]) == f"{hollow}: DICOM file with neither SOP class nor pixel data (truncated or damaged)"
    sr = write_sr(tmp_path / "only.dcm")
    assert "no image slices among 1 DICOM files" in _one_line_error([sr])


def test_invalid_geometry_value_is_one_line(tmp_path):
    _, (path,) = series(tmp_path, n=1)
    ds = pydicom.dcmread(path)
    ds.add_new(0x00280030, "LO", "abc\\def")            # PixelSpacing that is not a number
    ds.save_as(path)
    assert _one_line_error([path]).startswith(f"{path}: invalid geometry tag value (")


def _has_jpeg_plugins() -> bool:
    return any(importlib.util.find_spec(m) for m in ("pylibjpeg", "gdcm", "jpeg_ls"))


def test_jpeg_ls_without_plugins_names_the_extra():
    if _has_jpeg_plugins():
        pytest.skip("a JPEG-LS decoder is installed")
    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    assert _one_line_error([path]) == (
        f"{path}: JPEG-LS Lossless Image Compression pixel data needs the optional JPEG decoders: "
        'pip install "dlseg[jpeg]"'
    )


def test_jpeg2000_decodes_or_names_the_extra():
    path = get_testdata_file("JPEG2000.dcm")
    try:
        v = read_series([path])
    except CaseError as e:
        assert 'pip install "dlseg[jpeg]"' in str(e) and "\n" not in str(e)
    else:  # Pillow's OpenJPEG (or pylibjpeg) decoded it
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(v.image[0], apply_modality_lut(ds.pixel_array, ds).astype(v.image.dtype))


def test_find_series_groups_by_uid_and_orders_by_position(tmp_path):
    vol = volume(3)
    for k, z in enumerate([4.0, 0.0, 2.0]):          # names do not follow positions; folder names irrelevant
        write_slice(tmp_path / "a" / "x" / f"f{k}.dcm", vol[k], z, series_uid="1.1", series_number=3)
    for k in range(2):
        write_slice(tmp_path / "b" / f"g{k}.dcm", vol[k], 10.0 * k, series_uid="2.2", series_number=5, modality="MR")
    write_slice(tmp_path / "b" / "stray.dcm", vol[0], 99.0, series_uid="1.1", series_number=3)
    write_sr(tmp_path / "b" / "report.dcm")
    (tmp_path / "notes.txt").write_text("not dicom")
    found = find_series(tmp_path)
    assert [(s.name, s.modality) for s in found] == [("a_x-S3", "CT"), ("b-S5", "MR")]
    assert [p.name for p in found[0].files] == ["f1.dcm", "f2.dcm", "f0.dcm", "stray.dcm"]
    assert [p.name for p in found[1].files] == ["g0.dcm", "g1.dcm"]


def test_masks_lookup_ranges(tmp_path):
    values = np.array([[0, 54, 55, 63, 70, 71, 109, 110], [126, 135, 136, 175, 189, 200, 240, 255]], np.uint8)
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), values)
    organs = read_masks([path], "MR", "organs")[0]
    np.testing.assert_array_equal(organs, [[0, 0, 1, 1, 1, 0, 0, 2], [2, 2, 0, 3, 3, 3, 4, 4]])
    liver = read_masks([path], "MR", "liver")[0]
    np.testing.assert_array_equal(liver, organs == 1)
    np.testing.assert_array_equal(read_masks([path], "CT", "liver")[0], values == 255)
    assert read_masks([path, path], "CT", "organs").shape == (2, 2, 8)


def test_bad_masks_fail_with_file(tmp_path):
    good = tmp_path / "a.png"
    cv2.imwrite(str(good), np.zeros((4, 4), np.uint8))
    bad = tmp_path / "b.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(CaseError, match="cannot read PNG"):
        read_masks([good, bad], "CT", "liver")
    other = tmp_path / "c.png"
    cv2.imwrite(str(other), np.zeros((5, 4), np.uint8))
    with pytest.raises(CaseError, match=r"c.png: PNG is 5x4 but a.png is 4x4"):
        read_masks([good, other], "CT", "liver")
    color = tmp_path / "d.png"
    cv2.imwrite(str(color), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(CaseError, match="8-bit grayscale"):
        read_masks([color], "CT", "liver")


def test_unsupported_pixel_layouts_are_one_line(tmp_path):
    rgb = get_testdata_file("SC_rgb_rle.dcm")
    assert _one_line_error([rgb]) == f"{rgb}: color image (SamplesPerPixel=3); expected grayscale"
    _, (multi, lut) = series(tmp_path, n=2)
    ds = pydicom.dcmread(multi)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(multi)
    assert "multi-frame DICOM (2 frames) is not supported" in _one_line_error([multi])
    ds = pydicom.dcmread(lut)
    ds.ModalityLUTSequence = [pydicom.Dataset()]
    ds.save_as(lut)
    assert "Modality LUT Sequence is not supported" in _one_line_error([lut])


def test_missing_geometry_tags_give_defaults_and_notes(tmp_path):
    _, files = series(tmp_path, n=2)
    for f in files:
        ds = pydicom.dcmread(f)
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
            delattr(ds, tag)
        ds.save_as(f)
    v = read_series(files)
    assert v.spacing == (1.0, 1.0, 1.0) and v.positions is None and v.origin == (0.0, 0.0, 0.0)
    assert v.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert v.warnings == ["no PixelSpacing; in-plane spacing set to 1 mm",
                          "no slice positions, SpacingBetweenSlices or SliceThickness; slice spacing set to 1 mm"]


def test_header_only_read_keeps_the_geometry(tmp_path):
    _, (path,) = series(tmp_path, n=1)
    assert header_meta(read_dataset(path, header_only=True)) == header_meta(read_dataset(path))
