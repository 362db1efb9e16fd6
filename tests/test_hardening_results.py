"""Results a cart can trust (issue 15 §3): answer-token log-probabilities (runtime = reference),
the answer's format check per task, "low confidence", SAM2's predicted IoU in the JSON, "not an
ultrasound image", millimetres only inside one plausible calibrated region, and a pixel spacing
for in-memory frames through the public API."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pydicom
import pytest
from fixtures import random_rgb
from pydicom import examples
from test_runtime_support import CASES, case_image, pipeline, reference

from citrus_edge.calib_data.dicom_writer import write_us_dicom
from citrus_edge.calib_data.load import load_image
from citrus_edge.calib_data.spacing import (
    CALLER,
    MAX_MM_PER_PIXEL,
    US_REGIONS,
    Calibration,
    ImplausibleSpacingError,
    PixelSpacing,
    dicom_calibration,
    dicom_spacing,
)
from citrus_edge.config import TokenIds
from citrus_edge.quality import (
    DEFAULT_THRESHOLDS,
    answer_quality,
    answer_warnings,
    assess,
    mask_warnings,
    recognise_task,
)
from citrus_edge.result import GroundingResult, Measurement
from citrus_edge.runtime.decode import greedy_generate, token_logprob
from citrus_edge.runtime.inputs import from_array
from citrus_edge.runtime.measure import measure_calibrated, measure_image
from citrus_edge.runtime.result_files import result_to_dict
from citrus_edge.runtime.runtime_errors import InputImageError
from citrus_edge.tasks import (
    DETECT_PROMPT,
    NO_LESION,
    REPORT_PROMPT,
    SEGMENT_ANSWER,
    SEGMENT_PROMPT,
)
from citrus_edge.timing import StageTimer

LOGPROB_ATOL = 1e-3  # runtime (ONNX Runtime fp32) vs PyTorch reference, per token and mean
DETECT_OK = '```json\n[{"bbox_2d": [12, 40, 80, 96], "label": "lesion"}]\n```'
REPORT_OK = "1 lesion. Lesion 1: hypoechoic, upper left, circumscribed, 12 mm, posterior shadowing."


# ------------------------------------------------------------------------ log-probabilities


def test_token_logprob_is_a_stable_log_softmax():
    # log softmax([2, 1, 0])[0] = 2 - log(e^2 + e + 1)
    assert token_logprob(np.array([2.0, 1.0, 0.0], np.float32), 0) == pytest.approx(
        -0.40760596444438, abs=1e-12
    )
    # Huge logits overflow a naive exp: -log(1 + e^-1) for two logits 1 apart.
    big = np.array([1e4, 1e4 - 1, -1e4], np.float32)
    assert token_logprob(big, 0) == pytest.approx(-0.31326168751822, abs=1e-9)
    assert token_logprob(big, 2) == pytest.approx(-2e4 - 0.31326168751822, rel=1e-9)


class ScriptedRunner:
    """A KvStepRunner that returns fixed logits step after step (hidden state: the step)."""

    def __init__(self, logits: list[list[float]]):
        self.logits = [np.array(row, np.float32) for row in logits]
        self.cache_len = 0

    def reset(self) -> None:
        self.cache_len = 0

    def __call__(self, feeds):
        row = self.logits[self.cache_len]
        self.cache_len += 1
        return row, np.full(4, float(self.cache_len), np.float32)


def test_greedy_generate_keeps_the_logprob_of_every_kept_token():
    tokens = TokenIds(seg=3, image=6, video=7, vision_start=4, vision_end=5, eos=0, pad=0)
    steps = [[0.0, 5.0, 1.0, 0.0], [0.0, 0.0, 0.0, 2.0], [9.0, 0.0, 0.0, 0.0]]  # 1, [SEG], EOS
    runner = ScriptedRunner(steps)
    prefill = {k: np.zeros((1, 1), np.int64) for k in ("inputs_embeds", "position_ids")}
    prefill["attention_mask"] = np.ones((1, 1), np.int64)
    gen = greedy_generate(
        runner,
        prefill,
        np.zeros((1, 1), np.int64),
        np.zeros((8, 4), np.float32),
        tokens,
        8,
        StageTimer(),
    )
    assert gen.tokens == [1, 3] and gen.stopped_by == "eos"
    expected = [5 - math.log(math.exp(5) + math.e + 2), 2 - math.log(math.exp(2) + 3)]
    np.testing.assert_allclose(gen.logprobs, expected, atol=1e-9)  # EOS itself is not kept


@pytest.mark.parametrize("kind", ["seg", "plain"])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"{c[0]}x{c[1]}")
def test_runtime_logprobs_equal_the_reference(kind, case):
    rgb, prompt = case_image(case), case[3]
    ref = reference(kind)(rgb, prompt)
    got = pipeline(kind)(rgb, prompt)
    assert got.token_ids == ref.token_ids
    assert len(got.token_logprobs) == len(got.token_ids) == got.quality.n_tokens > 0
    assert max(got.token_logprobs) <= 0.0
    np.testing.assert_allclose(got.token_logprobs, ref.token_logprobs, atol=LOGPROB_ATOL)
    assert abs(got.quality.mean_logprob - ref.quality.mean_logprob) <= LOGPROB_ATOL
    assert got.quality.mean_logprob == pytest.approx(np.mean(got.token_logprobs), abs=1e-12)
    assert got.quality.min_logprob == min(got.token_logprobs)
    assert (got.quality.task, got.quality.parses) == (ref.quality.task, ref.quality.parses)
    assert got.quality.low_confidence == ref.quality.low_confidence
    data = result_to_dict(got)
    assert data["quality"]["mean_logprob"] == got.quality.mean_logprob
    assert data["token_logprobs"] == got.token_logprobs


# ------------------------------------------------------------------------ answer format, confidence


@pytest.mark.parametrize(
    ("prompt", "text", "task", "parses"),
    [
        (DETECT_PROMPT, DETECT_OK, "detect", True),
        (DETECT_PROMPT, NO_LESION, "detect", True),
        (DETECT_PROMPT, SEGMENT_ANSWER, "detect", False),
        (DETECT_PROMPT, '```json\n[{"bbox_2d": [12, 40, 80', "detect", False),  # cut off
        (DETECT_PROMPT, '[{"bbox_2d": [1, 2, 3, NaN]}]', "detect", False),
        (SEGMENT_PROMPT, SEGMENT_ANSWER, "segment", True),
        (SEGMENT_PROMPT, NO_LESION, "segment", True),
        (SEGMENT_PROMPT, "Sure, it is.", "segment", False),
        (REPORT_PROMPT, REPORT_OK, "report", True),
        (REPORT_PROMPT, NO_LESION, "report", True),
        (REPORT_PROMPT, "2 lesions. Lesion 1: hypoechoic, upper left.", "report", False),
        ("  describe THE findings   in this scan. ", REPORT_OK, "report", True),
        ("What is the lesion's size?", "12 mm", None, None),
    ],
)
def test_answer_parses_in_its_tasks_format(prompt, text, task, parses):
    quality = answer_quality(text, prompt, [-0.01, -0.02])
    assert (quality.task, quality.parses) == (task, parses)
    warned = [w for w in answer_warnings(quality, "eos") if w.startswith("answer does not parse")]
    assert len(warned) == (parses is False)
    if task == "detect" and parses is False:
        assert warned == ["answer does not parse as a detection list"]


def test_low_confidence_uses_the_bounds_of_the_task():
    seg = DEFAULT_THRESHOLDS.segment
    assert (seg.mean, seg.min) == (-0.08, -0.47)  # measured: scripts/measure_confidence.py
    sure = answer_quality(SEGMENT_ANSWER, SEGMENT_PROMPT, [-0.01] * 5)
    unsure = answer_quality(SEGMENT_ANSWER, SEGMENT_PROMPT, [-0.1] * 5)  # mean -0.1 < -0.08
    assert not sure.low_confidence and unsure.low_confidence
    # A detection answer of mean -0.1 is usual (eval split p50 -0.30); a token at -3 is not.
    assert not answer_quality(DETECT_OK, DETECT_PROMPT, [-0.1] * 5).low_confidence
    by_min = answer_quality(DETECT_OK, DETECT_PROMPT, [-0.01, -3.0, -0.01])
    assert by_min.low_confidence and by_min.min_logprob == -3.0
    assert by_min.mean_logprob == pytest.approx(-3.02 / 3, abs=1e-12)
    lines = answer_warnings(by_min, "eos")
    assert len(lines) == 1 and lines[0].startswith("low confidence: ")
    assert "min -3.000" in lines[0] and "for detect" in lines[0]


def test_empty_and_cut_off_answers_are_said():
    empty = answer_quality("", SEGMENT_PROMPT, [])
    assert (empty.mean_logprob, empty.min_logprob, empty.parses) == (None, None, False)
    assert "empty answer" in " ".join(answer_warnings(empty, "eos"))
    cut = answer_quality("Sure", "anything", [-0.1] * 96)
    assert answer_warnings(cut, "max_new_tokens") == [
        "answer cut off after 96 tokens (max_new_tokens)"
    ]


def test_low_predicted_iou_is_warned_per_mask():
    assert DEFAULT_THRESHOLDS.mask_iou == 0.39
    assert mask_warnings([0.9, 0.3, 0.39]) == [
        "masks[1]: low predicted IoU 0.300 (flagged below 0.39)"
    ]
    _, warnings = assess(SEGMENT_ANSWER, SEGMENT_PROMPT, [-0.001] * 6, "eos", [0.2])
    assert warnings == ["masks[0]: low predicted IoU 0.200 (flagged below 0.39)"]


def test_task_prompts_are_recognised_and_others_are_not():
    assert [recognise_task(p) for p in (SEGMENT_PROMPT, DETECT_PROMPT, REPORT_PROMPT)] == [
        "segment",
        "detect",
        "report",
    ]
    assert recognise_task("Please help segment the lesion") is None


def test_json_carries_quality_warnings_predicted_iou_and_mask_index():
    masks = [np.zeros((8, 8), bool), np.ones((8, 8), bool)]
    quality, warnings = assess(SEGMENT_ANSWER, SEGMENT_PROMPT, [-0.5, -0.2], "eos", [0.3, 0.75])
    result = GroundingResult(
        text=SEGMENT_ANSWER,
        token_ids=[5, 6],
        masks=masks,
        mask_scores=[0.3, 0.75],
        measurements=[Measurement(64 * 0.09, math.hypot(7 * 0.3, 7 * 0.3), CALLER, 1)],
        token_logprobs=[-0.5, -0.2],
        quality=quality,
        warnings=[*warnings, "masks[0] lies outside every calibrated region; no size in mm"],
        image_hw=(8, 8),
    )
    data = json.loads(json.dumps(result_to_dict(result)))
    assert data["schema"] == 2
    assert data["quality"] == {
        "task": "segment",
        "answer_parses": True,
        "mean_logprob": -0.35,
        "min_logprob": -0.5,
        "n_tokens": 2,
        "low_confidence": True,
    }
    assert [m["predicted_iou"] for m in data["masks"]] == [0.3, 0.75]
    assert [m["mask"] for m in data["measurements"]] == [1]  # mask 0 has none, and says why
    assert data["warnings"][0].startswith("low confidence")
    assert data["warnings"][1:] == [
        "masks[0]: low predicted IoU 0.300 (flagged below 0.39)",
        "masks[0] lies outside every calibrated region; no size in mm",
    ]


# ------------------------------------------------------------------------ DICOMs built here


def _rewrite(path, edit):
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def _dual_pane(path, rgb, left_mm=0.3, right_mm=0.4, top=20):
    """Two side-by-side calibrated regions below a `top`-row banner that has none."""
    h, w = rgb.shape[:2]
    write_us_dicom(path, rgb, spacing_mm=left_mm, seed=11)

    def edit(ds):
        left = ds.SequenceOfUltrasoundRegions[0]
        right = copy.deepcopy(left)
        left.RegionLocationMinY0 = right.RegionLocationMinY0 = top
        left.RegionLocationMaxX1, right.RegionLocationMinX0 = w // 2 - 1, w // 2
        right.PhysicalDeltaX = right.PhysicalDeltaY = right_mm / 10.0  # cm per pixel
        ds.SequenceOfUltrasoundRegions.append(right)

    return _rewrite(path, edit)


def _box(hw, rows, cols):
    mask = np.zeros(hw, bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def test_dual_pane_measures_each_pane_with_its_own_region(tmp_path):
    rgb = random_rgb(120, 200, seed=4)
    image = load_image(_dual_pane(tmp_path / "dual.dcm", rgb))
    assert [r.bounds for r in image.calibration.regions] == [(0, 20, 99, 119), (100, 20, 199, 119)]
    masks = [
        _box((120, 200), (40, 60), (80, 120)),  # over both panes
        _box((120, 200), (40, 60), (10, 30)),  # left pane: 20 x 20 pixels at 0.3 mm
        _box((120, 200), (30, 40), (150, 160)),  # right pane: 10 x 10 pixels at 0.4 mm
        _box((120, 200), (2, 12), (10, 30)),  # in the banner, outside both regions
        _box((120, 200), (10, 30), (10, 30)),  # from the banner into the left pane
    ]
    measured = measure_image(masks, image)
    assert [m.mask for m in measured.measurements] == [1, 2]
    assert measured.measurements[0].area_mm2 == pytest.approx(400 * 0.09, rel=1e-12)
    assert measured.measurements[0].longest_diameter_mm == pytest.approx(
        math.hypot(19 * 0.3, 19 * 0.3), rel=1e-12
    )
    assert measured.measurements[1].area_mm2 == pytest.approx(100 * 0.16, rel=1e-12)
    assert measured.warnings == [
        "masks[0] crosses ultrasound regions (ultrasound region 0 and ultrasound region 1); "
        "no size in mm",
        "masks[3] lies outside every calibrated region; no size in mm",
        "masks[4] reaches outside ultrasound region 0, the only calibrated region it touches; "
        "no size in mm",
    ]


def test_dual_pane_through_the_pipeline_gets_no_mm_for_a_mask_over_both(tmp_path):
    case = CASES[1]  # two [SEG]s with the "seg" variant; its masks span the image
    rgb = case_image(case)
    path = _dual_pane(tmp_path / "dual.dcm", rgb, top=0)
    result = pipeline("seg")(path, case[3])
    assert result.n_seg == 2
    assert all(m[:, :90].any() and m[:, 90:].any() for m in result.masks)  # over both panes
    assert result.measurements == []  # the old code measured both: one spacing for the image
    crossing = [w for w in result.warnings if "crosses ultrasound regions" in w]
    assert [w.split()[0] for w in crossing] == ["masks[0]", "masks[1]"]
    data = json.loads(json.dumps(result_to_dict(result)))
    assert data["measurements"] == [] and data["warnings"] == result.warnings


@pytest.mark.parametrize(
    ("delta_cm", "legacy"),
    [(1e6, None), (0.0, None), (-0.03, None), (float("nan"), None), (1.5, None), (0.03, 0.3)],
)
def test_implausible_us_calibration_is_refused(tmp_path, delta_cm, legacy):
    rgb = random_rgb(60, 80, seed=2)
    path = write_us_dicom(tmp_path / "us.dcm", rgb, spacing_mm=0.3, seed=3)

    def edit(ds):
        region = ds.SequenceOfUltrasoundRegions[0]
        region.PhysicalDeltaX = region.PhysicalDeltaY = delta_cm

    image = load_image(_rewrite(path, edit))
    if legacy is None:  # the old code kept |delta| x 10 mm for any delta but 0
        assert image.spacing is None
    else:
        assert image.spacing.row_mm == pytest.approx(legacy, rel=1e-12)
    measured = measure_image([_box((60, 80), (10, 20), (10, 20))], image)
    if legacy is None:
        assert measured.measurements == [] and image.calibration.regions == ()
        assert len(measured.warnings) == 1
        assert measured.warnings[0].startswith("ultrasound region 0 refused: PhysicalDeltaX/Y")
        assert measured.warnings[0].endswith("; no size in mm")
    else:
        assert measured.measurements[0].area_mm2 == pytest.approx(100 * 0.09, rel=1e-12)


def test_a_1e6_cm_per_pixel_dicom_prints_no_mm(tmp_path):
    case = CASES[1]
    path = write_us_dicom(tmp_path / "us.dcm", case_image(case), spacing_mm=0.3, seed=3)

    def edit(ds):
        ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaX = 1e6
        ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaY = 1e6

    result = pipeline("seg")(_rewrite(path, edit), case[3])
    assert result.n_seg == 2 and result.measurements == []  # the old code: ~1e17 mm² each
    text = json.dumps(result_to_dict(result))
    assert "area_mm2" not in text and "refused" in text


def test_pixel_spacing_is_bounded():
    assert PixelSpacing(MAX_MM_PER_PIXEL, 0.1).row_mm == 10.0  # the bound itself is allowed
    for row in (0.0, -0.1, float("nan"), float("inf"), 10.5, 1e7):
        with pytest.raises(ImplausibleSpacingError, match="not a plausible pixel size"):
            PixelSpacing(row, 0.1)
    ds = pydicom.Dataset()
    ds.PixelSpacing = [20, 20]
    calibration = dicom_calibration(ds)
    assert calibration.regions == () and dicom_spacing(ds) is None
    assert calibration.refused == (
        "PixelSpacing [20.0, 20.0] refused: not a pixel size > 0 and <= 10.0 mm",
    )


def test_region_beyond_the_image_is_refused_but_the_stated_spacing_is_kept():
    """pydicom's ultrasound examples state regions past their pixels (the files were cropped or
    resized after calibration): `spacing` is what it was, but nothing is measured by it."""
    for name, (cols, rows), mm in (
        ("palette_color", (800, 350), 0.26228787661969977),
        ("ybr_color", (320, 240), 0.5104970559477806),
    ):
        image = load_image(examples.get_path(name))
        assert image.spacing == PixelSpacing(mm, mm, US_REGIONS)  # as before this change
        assert image.calibration.regions == ()
        (line,) = image.calibration.refused
        assert f"beyond the {cols} x {rows} image" in line


@pytest.mark.parametrize(
    ("name", "mm"), [("ct", 0.661468), ("mr", 0.3125), ("overlay", 0.72314049586777)]
)
def test_pydicom_pixel_spacing_examples_measure_as_before(name, mm):
    image = load_image(examples.get_path(name))
    assert image.spacing.row_mm == image.spacing.col_mm == pytest.approx(mm, rel=1e-12)
    assert image.calibration == Calibration.whole_image(image.spacing)
    h, w = image.pixels.shape[:2]
    measured = measure_image([_box((h, w), (2, 12), (3, 8))], image)
    assert measured.warnings == []
    assert measured.measurements[0].area_mm2 == pytest.approx(50 * mm * mm, rel=1e-12)


# ------------------------------------------------------------------------ modality


def test_a_dicom_that_is_not_ultrasound_is_warned(tmp_path):
    case = CASES[1]
    rgb = case_image(case)
    us = write_us_dicom(tmp_path / "us.dcm", rgb, spacing_mm=0.3, seed=3)
    ct = _rewrite(
        write_us_dicom(tmp_path / "ct.dcm", rgb, spacing_mm=0.3, seed=3),
        lambda ds: setattr(ds, "Modality", "CT"),
    )
    loaded = load_image(ct)
    assert (loaded.modality, loaded.dicom) == ("CT", True)
    assert (load_image(us).modality, load_image(us).dicom) == ("US", True)
    warned = pipeline("seg")(ct, case[3]).warnings
    assert warned[0] == (
        "not an ultrasound image: the DICOM states Modality CT; the model reads US only"
    )
    for quiet in (us, rgb):
        assert not any("ultrasound image" in w for w in pipeline("seg")(quiet, case[3]).warnings)


# ------------------------------------------------------------------------ in-memory frames


def test_in_memory_frame_carries_a_spacing_through_the_public_api():
    case = CASES[1]
    rgb, pipe = case_image(case), pipeline("seg")
    result = pipe(rgb, case[3], spacing=PixelSpacing(0.3, 0.2))
    assert result.n_seg == 2 and [m.mask for m in result.measurements] == [0, 1]
    for mask, m in zip(result.masks, result.measurements, strict=True):
        assert m.area_mm2 == pytest.approx(mask.sum() * 0.06, rel=1e-12)
        assert m.spacing_source == CALLER
    assert pipe(rgb, case[3]).measurements == []  # without a spacing: nothing in mm
    assert not any("calibrat" in w for w in result.warnings)


def test_spacing_is_refused_where_it_does_not_belong(tmp_path):
    rgb = random_rgb(32, 32)
    with pytest.raises(InputImageError, match="PixelSpacing"):
        from_array(rgb, spacing=0.3)
    path = write_us_dicom(tmp_path / "us.dcm", rgb, spacing_mm=0.3, seed=1)
    with pytest.raises(InputImageError, match="carry their own calibration"):
        pipeline("seg")(path, CASES[0][3], spacing=PixelSpacing(0.3, 0.3))


def test_measure_calibrated_without_calibration_is_silent():
    mask = [np.ones((4, 4), bool)]
    assert measure_calibrated(mask, None).measurements == []
    assert measure_calibrated(mask, None).warnings == []
    assert measure_calibrated(mask, Calibration()).warnings == []  # a DICOM stating none


def _regions_dataset(rows, cols, regions):
    """A bare dataset with ultrasound regions given as (x0, y0, x1, y1, cm per pixel)."""
    ds = pydicom.Dataset()
    ds.Rows, ds.Columns = rows, cols
    items = []
    for x0, y0, x1, y1, cm in regions:
        item = pydicom.Dataset()
        item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
        item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
        item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3  # cm
        item.PhysicalDeltaX = item.PhysicalDeltaY = cm
        items.append(item)
    ds.SequenceOfUltrasoundRegions = pydicom.Sequence(items)
    return ds


def test_one_pixel_past_the_edge_is_tolerated_and_clipped():
    calibration = dicom_calibration(_regions_dataset(50, 60, [(0, 0, 60, 50, 0.02)]))
    assert calibration.refused == ()
    assert calibration.regions[0].bounds == (0, 0, 59, 49)
    refused = dicom_calibration(_regions_dataset(50, 60, [(0, 0, 61, 49, 0.02)]))
    assert refused.regions == () and "beyond the 60 x 50 image" in refused.refused[0]


def test_overlapping_regions_must_agree_on_the_pixel_size():
    # A zoom box (region 1) inside the B-mode region (region 0).
    same = dicom_calibration(
        _regions_dataset(50, 60, [(0, 0, 59, 49, 0.02), (10, 10, 30, 30, 0.02)])
    )
    other = dicom_calibration(
        _regions_dataset(50, 60, [(0, 0, 59, 49, 0.02), (10, 10, 30, 30, 0.01)])
    )
    inside_both = [_box((50, 60), (12, 20), (12, 20))]  # 8 x 8 pixels
    (m,) = measure_calibrated(inside_both, same).measurements
    assert m.area_mm2 == pytest.approx(64 * 0.04, rel=1e-12)
    measured = measure_calibrated(inside_both, other)
    assert measured.measurements == []
    assert measured.warnings == [
        "masks[0] lies in ultrasound region 0 and ultrasound region 1, which state different "
        "pixel sizes; no size in mm"
    ]
    # Outside the zoom box only region 0 holds it: measured at 0.2 mm.
    (m,) = measure_calibrated([_box((50, 60), (40, 45), (40, 45))], other).measurements
    assert m.area_mm2 == pytest.approx(25 * 0.04, rel=1e-12)
