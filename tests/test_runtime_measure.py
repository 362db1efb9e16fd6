"""Measurements in mm from a DICOM pixel spacing (none without one), RLE that round-trips, and
the JSON / PNG result files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pydicom
import pytest
from fixtures import random_rgb
from PIL import Image
from test_runtime_support import CASES, boundary_diameter_bruteforce, case_image, pipeline

from citrus_edge.calib_data.dicom_writer import write_us_dicom
from citrus_edge.calib_data.spacing import US_REGIONS, PixelSpacing
from citrus_edge.result import Box, GroundingResult
from citrus_edge.runtime.measure import longest_diameter_mm, measure_mask, measure_masks
from citrus_edge.runtime.result_files import (
    PALETTE,
    decode_rle,
    encode_rle,
    render_overlay,
    result_to_dict,
    write_json,
    write_overlay,
)

ROW_MM, COL_MM = 0.35, 0.2  # anisotropic: rows (Y) 0.035 cm, columns (X) 0.02 cm
SPACING = PixelSpacing(ROW_MM, COL_MM, US_REGIONS)


# ------------------------------------------------------------------------ measure (hand-made)


def test_rectangle_by_hand():
    mask = np.zeros((60, 80), bool)
    mask[10:20, 20:50] = True  # 10 rows x 30 columns
    m = measure_mask(mask, SPACING)
    assert m.area_mm2 == pytest.approx(300 * ROW_MM * COL_MM, rel=1e-12)
    # Opposite corner pixel centres: 9 rows and 29 columns apart.
    assert m.longest_diameter_mm == pytest.approx(np.hypot(9 * ROW_MM, 29 * COL_MM), rel=1e-12)
    assert m.spacing_source == US_REGIONS


def test_anisotropy_picks_the_physically_longest_axis():
    mask = np.zeros((50, 50), bool)
    mask[5:45, 24] = True  # 40 rows tall
    mask[24, 10:40] = True  # 30 columns wide
    assert longest_diameter_mm(mask, 1.0, 1.0) == pytest.approx(39.0, rel=1e-12)
    assert longest_diameter_mm(mask, 0.1, 1.0) == pytest.approx(29.0, rel=1e-12)  # the row
    assert longest_diameter_mm(mask, 1.0, 0.1) == pytest.approx(39.0, rel=1e-12)  # the column


@pytest.mark.parametrize("seed", range(5))
def test_blobs_equal_bruteforce_over_boundary_pixels(seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:70, :90]
    mask = np.zeros((70, 90), bool)
    for _ in range(3):  # union of random ellipses, touching the border sometimes
        cy, cx, ry, rx = rng.uniform(0, 70), rng.uniform(0, 90), *rng.uniform(3, 25, 2)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    expected = boundary_diameter_bruteforce(mask, ROW_MM, COL_MM)
    assert longest_diameter_mm(mask, ROW_MM, COL_MM) == pytest.approx(expected, rel=1e-12)


def test_single_pixel_and_empty_masks():
    one = np.zeros((5, 5), bool)
    one[2, 3] = True
    assert measure_mask(one, SPACING).longest_diameter_mm == 0.0
    assert measure_mask(one, SPACING).area_mm2 == pytest.approx(ROW_MM * COL_MM)
    empty = measure_mask(np.zeros((5, 5), bool), SPACING)
    assert empty.area_mm2 == 0.0 and empty.longest_diameter_mm == 0.0


def test_no_spacing_measures_nothing():
    assert measure_masks([np.ones((4, 4), bool)], None) == []


# ------------------------------------------------------------------------ through the pipeline


def _anisotropic_dicom(path, rgb):
    write_us_dicom(path, rgb, spacing_mm=COL_MM, seed=5)
    ds = pydicom.dcmread(path)
    ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaY = ROW_MM / 10.0  # cm per pixel
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_with_spacing_gets_mm_measurements(tmp_path):
    case = CASES[1]  # two [SEG]s on this image with the "seg" variant
    rgb = case_image(case)
    path = _anisotropic_dicom(tmp_path / "us.dcm", rgb)
    result = pipeline("seg")(path, case[3])
    assert result.n_seg == 2 and len(result.measurements) == 2
    for mask, m in zip(result.masks, result.measurements, strict=True):
        assert mask.any()
        assert m.spacing_source == US_REGIONS
        assert m.area_mm2 == pytest.approx(mask.sum() * ROW_MM * COL_MM, rel=1e-12)
        hand = boundary_diameter_bruteforce(mask, ROW_MM, COL_MM)
        assert m.longest_diameter_mm == pytest.approx(hand, rel=1e-12)
    # The DICOM holds the same pixels as the array: same answer, same masks.
    same = pipeline("seg")(rgb, case[3])
    assert same.token_ids == result.token_ids and same.measurements == []
    out = json.loads(write_json(result, tmp_path / "r.json").read_text())
    assert [m["area_mm2"] for m in out["measurements"]] == [m.area_mm2 for m in result.measurements]
    assert {"mask", "area_mm2", "longest_diameter_mm", "spacing_source"} == set(
        out["measurements"][0]
    )


def test_png_without_spacing_has_no_mm_fields(tmp_path):
    case = CASES[1]
    path = tmp_path / "image.png"
    Image.fromarray(case_image(case)).save(path)
    result = pipeline("seg")(path, case[3])
    assert result.n_seg == 2 and result.measurements == []
    text = write_json(result, tmp_path / "r.json").read_text()
    assert json.loads(text)["measurements"] == []
    assert "mm" not in text.replace("timings_ms", "")


# ------------------------------------------------------------------------ RLE and files


def test_rle_is_coco_column_major():
    mask = np.array([[0, 1], [1, 1]], bool)  # column-major: 0, 1, 1, 1
    assert encode_rle(mask) == {"size": [2, 2], "counts": [1, 3]}
    assert encode_rle(np.ones((2, 3), bool))["counts"] == [0, 6]  # starts with zero zeros
    assert encode_rle(np.zeros((2, 3), bool))["counts"] == [6]


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (64, 97)])
@pytest.mark.parametrize("fill", [0.0, 0.3, 1.0])
def test_rle_round_trips_exactly(shape, fill):
    mask = np.random.default_rng(0).random(shape) < fill
    rle = encode_rle(mask)
    assert sum(rle["counts"]) == mask.size
    back = decode_rle(json.loads(json.dumps(rle)))
    assert back.dtype == bool and np.array_equal(back, mask)


def test_decode_rle_refuses_wrong_lengths():
    with pytest.raises(ValueError, match="sum to"):
        decode_rle({"size": [2, 2], "counts": [1, 2]})


def _result(h=40, w=50):
    mask = np.zeros((h, w), bool)
    mask[5:15, 10:30] = True
    return GroundingResult(
        text="x",
        token_ids=[1],
        boxes=[Box(2.0, 3.0, 20.0, 30.0, "lesion")],
        masks=[mask],
        mask_scores=[0.75],
        timings_ms={"total": 1.0},
        image_hw=(h, w),
        backend="onnxruntime/CPUExecutionProvider",
        bundle_id="abc",
    )


def test_json_file_is_complete_and_atomic(tmp_path):
    result = _result()
    path = write_json(result, tmp_path / "out" / "result.json")
    data = json.loads(path.read_text())
    assert data == result_to_dict(result)
    assert data["bundle_id"] == "abc" and data["backend"].startswith("onnxruntime")
    assert data["boxes"] == [{"bbox": [2.0, 3.0, 20.0, 30.0], "label": "lesion"}]
    assert np.array_equal(decode_rle(data["masks"][0]), result.masks[0])
    assert data["masks"][0]["predicted_iou"] == 0.75 and data["masks"][0]["area_px"] == 200
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]  # no temp left


def test_overlay_tints_masks_and_draws_boxes(tmp_path):
    rgb = random_rgb(40, 50, seed=3)
    result = _result()
    masks_only = dataclasses.replace(result, boxes=[])
    image = np.asarray(render_overlay(rgb, masks_only))
    assert image.shape == rgb.shape
    inside = result.masks[0]
    assert (image[inside] != rgb[inside]).any(axis=-1).mean() > 0.95
    assert np.array_equal(image[~inside], rgb[~inside])
    boxed = np.asarray(render_overlay(rgb, result))
    assert tuple(boxed[3, 12]) == PALETTE[0]  # top edge of the box (y1 = 3), off the mask
    path = write_overlay(rgb, result, tmp_path / "overlay.png")
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), boxed)
