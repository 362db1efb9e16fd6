"""DICOM SEG + TID 1500 SR out of a grounding result (citrus_edge.cart.dicom_out), read back.

Results are built by hand (known masks and boxes) and measured by the runtime's own
`measure_image`, so the SR is checked against the numbers the JSON writer gives for the same
result. Sources: a phantom (calibrated ultrasound region) and pydicom's ultrasound examples:
`palette_color` (US, PALETTE COLOR, one ultrasound region), `rgb_color` (US, RGB, no
calibration), `jpeg2k` (US, JPEG 2000, no calibration) and `ybr_color` (US Multi-frame, 30
frames, JPEG baseline YBR_FULL_422, regions).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import examples
from pydicom.uid import UID

from citrus_edge.calib_data.load import load_image
from citrus_edge.cart.dicom_out import (
    DicomOutError,
    DicomOutputExistsError,
    NoMaskError,
    NotDicomSourceError,
    dicom_report,
    dicom_results,
    read_source,
    write_dicom_results,
)
from citrus_edge.result import Box, GroundingResult
from citrus_edge.runtime.measure import measure_image
from citrus_edge.runtime.result_files import result_to_dict

hd = pytest.importorskip("highdicom")

BUNDLE = "tiny-test-bundle"
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom warns about the examples' odd person names
        yield


def _result(path: Path, masks: list[np.ndarray], boxes: list[Box], frame: int = 0):
    """A result as the pipeline makes it, measured with the image's own calibration."""
    image = load_image(path, frame)
    measured = measure_image(masks, image)
    return GroundingResult(
        text="There is a lesion [SEG] in the upper right.",
        token_ids=[1, 2, 3],
        boxes=boxes,
        masks=masks,
        mask_scores=[0.9] * len(masks),
        measurements=measured.measurements,
        warnings=measured.warnings,
        image_hw=image.pixels.shape[:2],
        bundle_id=BUNDLE,
    )


def _rect(hw, y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros(hw, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _phantom(phantom_set: Path):
    root = phantom_set.parent
    label = json.loads((root / "labels" / "phantom_00000.json").read_text())
    masks = [np.asarray(Image.open(root / m)) > 0 for m in label["masks"]]
    boxes = [Box(*b, label="lesion") for b in label["boxes"]]
    return root / label["image"], masks, boxes


def _seg_masks(seg, source, frame: int = 0) -> np.ndarray:
    """The SEG's masks [n_seg, H, W] bool, found by highdicom through the source reference."""
    uid = source.SOPInstanceUID
    if "NumberOfFrames" in source:
        pixels = seg.get_pixels_by_source_frame(uid, source_frame_numbers=[frame + 1])
    else:
        pixels = seg.get_pixels_by_source_instance([uid])
    return np.moveaxis(pixels[0], -1, 0).astype(bool)  # [1, H, W, n_seg] -> [n_seg, H, W]


def _write_and_read(tmp_path, source_path, result, frame=0):
    source = read_source(source_path)
    paths = write_dicom_results(source, result, BUNDLE, tmp_path / "dicom", frame)
    return source, paths


def _texts(items):
    """(concept meaning, value) of every TEXT item in an SR content tree."""
    out = []
    for item in items:
        if item.ValueType == "TEXT":
            out.append((item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue))
        out.extend(_texts(item.get("ContentSequence", [])))
    return out


def _num_items(items):
    out = []
    for item in items:
        if item.ValueType == "NUM":
            out.append(item)
        out.extend(_num_items(item.get("ContentSequence", [])))
    return out


def test_phantom_seg_and_sr_read_back(small_phantom_set, tmp_path):
    path, masks, boxes = _phantom(small_phantom_set)
    result = _result(path, masks, boxes)
    assert len(result.measurements) == 1  # the lesion lies in the calibrated region
    source, paths = _write_and_read(tmp_path, path, result)
    assert [p.name for p in paths] == ["seg.dcm", "sr.dcm"]
    expected = json.loads(json.dumps(result_to_dict(result)))["measurements"]

    seg = hd.seg.segread(paths[0])
    assert seg.number_of_segments == len(masks) == 1
    assert np.array_equal(_seg_masks(seg, source), np.stack(masks))
    assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    derived = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert BUNDLE in algorithm.AlgorithmName

    sr = hd.sr.srread(paths[1])
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(masks) + len(boxes) == 2
    lesion = groups[0]
    area = lesion.get_measurements(name=hd.sr.CodedConcept("42798000", "SCT", "Area"))[0]
    axis = lesion.get_measurements(name=hd.sr.CodedConcept("103339001", "SCT", "Long axis"))[0]
    assert area.value == expected[0]["area_mm2"] > 0
    assert axis.value == expected[0]["longest_diameter_mm"] > 0
    assert (area.unit.value, area.unit.scheme_designator) == ("mm2", "UCUM")
    assert (axis.unit.value, axis.unit.scheme_designator) == ("mm", "UCUM")
    assert lesion.reference_type.value == "121214"  # Referenced Segmentation Frame
    images = [i for i in lesion[0].ContentSequence if i.ValueType == "IMAGE"]
    refs = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: i for i in images}
    assert set(refs) == {seg.SOPInstanceUID, source.SOPInstanceUID}
    assert refs[seg.SOPInstanceUID].ReferencedSOPSequence[0].ReferencedSegmentNumber == 1

    box = groups[1]
    region = box.roi
    x1, y1, x2, y2 = boxes[0].as_list()
    corners = [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]
    assert np.array_equal(region.value, np.array(corners, dtype=np.float32))
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )
    assert ("Finding", result.text) in _texts(sr.ContentSequence)

    raw_seg, raw_sr = pydicom.dcmread(paths[0]), pydicom.dcmread(paths[1])
    for ds in (raw_seg, raw_sr):
        for keyword in PATIENT_STUDY:
            assert ds.get(keyword) == source.get(keyword), keyword
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
            assert UID(ds.get(keyword)).is_valid
            assert ds.get(keyword) != source.get(keyword)
    assert raw_seg.Modality == "SEG" and raw_sr.Modality == "SR"


def test_uids_are_fresh_on_every_call(small_phantom_set):
    path, masks, boxes = _phantom(small_phantom_set)
    result = _result(path, masks, boxes)
    source = read_source(path)
    first, second = dicom_results(source, result, BUNDLE), dicom_results(source, result, BUNDLE)
    uids = [{ds.SOPInstanceUID, ds.SeriesInstanceUID} for pair in (first, second) for ds in pair]
    assert len(set().union(*uids)) == 8  # 2 calls x (SEG, SR) x (instance, series)


@pytest.mark.parametrize(
    ("example", "frame"), [("palette_color", 0), ("rgb_color", 0), ("jpeg2k", 0), ("ybr_color", 3)]
)
def test_pydicom_ultrasound_examples(example, frame, tmp_path):
    """None of these states a usable calibration (palette_color's and ybr_color's regions
    extend beyond the image, so the loader refuses them): the SR must carry no number."""
    path = Path(examples.get_path(example))
    source = read_source(path)
    hw = (source.Rows, source.Columns)
    masks = [_rect(hw, 60, 100, 100, 160), _rect(hw, 120, 140, 60, 90)]
    result = _result(path, masks, [Box(100, 60, 160, 100, "lesion")], frame)
    assert result.measurements == []
    _, paths = _write_and_read(tmp_path, path, result, frame)
    seg, sr = hd.seg.segread(paths[0]), hd.sr.srread(paths[1])

    assert seg.number_of_segments == 2
    assert np.array_equal(_seg_masks(seg, source, frame), np.stack(masks))
    values = _num_items(sr.ContentSequence)
    assert values == [] and result_to_dict(result)["measurements"] == []
    if "NumberOfFrames" in source:  # the grounded frame, 1-based, in every source reference
        refs = [seg.SourceImageSequence[0]] + [
            f.DerivationImageSequence[0].SourceImageSequence[0]
            for f in seg.PerFrameFunctionalGroupsSequence
        ]
        assert {int(r.ReferencedFrameNumber) for r in refs} == {frame + 1}
        assert {r.ReferencedSOPClassUID for r in refs} == {source.SOPClassUID}
        region = sr.content.get_planar_roi_measurement_groups()[2].roi
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == frame + 1
    for keyword in PATIENT_STUDY:
        assert seg.get(keyword) == source.get(keyword)
        assert sr.get(keyword) == source.get(keyword)


def test_refusals(small_phantom_set, tmp_path):
    path, masks, boxes = _phantom(small_phantom_set)
    result = _result(path, masks, boxes)
    source = read_source(path)
    with pytest.raises(NotDicomSourceError, match="need a DICOM source"):
        dicom_results(None, result, BUNDLE)
    with pytest.raises(DicomOutError, match="frame 2 asked of a source with 1 frame"):
        dicom_results(source, result, BUNDLE, frame=2)
    small = GroundingResult(text="x", token_ids=[1], masks=[np.zeros((4, 4), bool)])
    with pytest.raises(DicomOutError, match=r"masks of shape \(4, 4\)"):
        dicom_results(source, small, BUNDLE)
    empty = GroundingResult(text="No lesion.", token_ids=[1])
    with pytest.raises(NoMaskError, match="no \\[SEG\\] mask"):
        dicom_results(source, empty, BUNDLE)

    out = tmp_path / "dicom"
    out.mkdir()
    (out / "seg.dcm").write_text("someone else's file")
    with pytest.raises(DicomOutputExistsError, match="not written by citrus-edge"):
        write_dicom_results(source, result, BUNDLE, out)
    assert (out / "seg.dcm").read_text() == "someone else's file"
    assert not (out / "sr.dcm").exists()


def test_rewrite_own_files_and_sr_alone(small_phantom_set, tmp_path):
    path, masks, boxes = _phantom(small_phantom_set)
    source = read_source(path)
    out = tmp_path / "dicom"
    first = write_dicom_results(source, _result(path, masks, boxes), BUNDLE, out)
    uid = pydicom.dcmread(first[1]).SOPInstanceUID
    empty = GroundingResult(text="No lesion seen.", token_ids=[1])
    again = write_dicom_results(source, empty, BUNDLE, out)  # ours: replaced
    assert [p.name for p in again] == ["sr.dcm"]
    assert sorted(p.name for p in out.iterdir()) == ["sr.dcm"]  # the older SEG went with it
    sr = hd.sr.srread(again[0])
    assert sr.SOPInstanceUID != uid
    assert sr.content.get_planar_roi_measurement_groups() == []
    assert _num_items(sr.ContentSequence) == []
    assert ("Finding", "No lesion seen.") in _texts(sr.ContentSequence)


def test_report_without_seg_keeps_the_numbers(small_phantom_set):
    """The SR alone (no SEG to point at): each mask's numbers sit in a TID 1501 group."""
    path, masks, boxes = _phantom(small_phantom_set)
    result = _result(path, masks, boxes)
    sr = dicom_report(read_source(path), result, BUNDLE)
    values = [i.MeasuredValueSequence[0] for i in _num_items(sr.ContentSequence)]
    (m,) = result_to_dict(result)["measurements"]
    assert [float(v.FloatingPointValue) for v in values] == [
        m["area_mm2"],
        m["longest_diameter_mm"],
    ]
    assert [v.MeasurementUnitsCodeSequence[0].CodeValue for v in values] == ["mm2", "mm"]
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    groups = hd.sr.srread(buffer).content.get_planar_roi_measurement_groups()
    assert len(groups) == len(boxes) == 1  # the box; the mask's group is not a planar ROI


def test_missing_extra_names_the_pip_command():
    from citrus_edge.cart.dicom_out import MissingExtraError, require_extra

    require_extra("highdicom", "pynetdicom")  # installed here: nothing raised
    with pytest.raises(MissingExtraError, match=r"pip install citrus-edge\[serve\]"):
        require_extra("citrus_edge_no_such_module")
