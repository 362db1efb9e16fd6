"""DICOM results of a grounding: a Segmentation and a TID 1500 measurement report (highdicom).

`dicom_results(source, result, bundle_id, frame)` gives two new instances in the source's study:

- a BINARY Segmentation (SEG) with one segment per mask of the result, segment k in SEG frame k,
  each frame derived from the grounded frame of the source SOP instance;
- a Comprehensive SR holding a TID 1500 Imaging Measurement Report: one measurement group per
  mask (referencing its SEG frame; area in mm2 and long axis in mm, UCUM units, only for masks
  the runtime measured, `GroundingResult.measurements`), one per box (a closed POLYLINE SCOORD
  on the source image, pixel coordinates), and the answer text as a TEXT "Finding" in the
  report's Qualitative Evaluations container (TID 1500 row 12).

Patient and study modules are copied from `source` by highdicom; nothing is invented (an
attribute the source lacks stays empty). Every call makes fresh UIDs (`highdicom.UID()`).

Why no secondary capture for a PNG/JPEG: a SEG and an SR must name a patient and a study, and an
ordinary image states neither; making up a patient ID and a study UID would file the result
under a patient nobody registered, which a PACS cannot reconcile. So a non-DICOM source is
refused (`NotDicomSourceError`) rather than wrapped.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from citrus_edge import __version__
from citrus_edge.atomic import atomic_path
from citrus_edge.result import GroundingResult

if TYPE_CHECKING:
    from pydicom import Dataset

log = logging.getLogger(__name__)

MANUFACTURER = "citrus-edge"
SEG_SERIES_NUMBER = 9701  # fixed, so a viewer lists citrus-edge series apart from the scanner's
SR_SERIES_NUMBER = 9702
SEG_NAME, SR_NAME = "seg.dcm", "sr.dcm"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
_NEEDED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class MissingExtraError(RuntimeError):
    """A package of the `serve` extra (highdicom, pynetdicom) is not installed."""


def require_extra(*modules: str) -> None:
    """Import `modules` (default: highdicom) or raise `MissingExtraError` naming the extra, so a
    command fails in one line before any model is loaded."""
    import importlib

    for name in modules or ("highdicom",):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise MissingExtraError(
                f"{name} is not installed; DICOM out and the DICOM receiver need the serve "
                "extra: pip install citrus-edge[serve]"
            ) from e


class DicomOutError(ValueError):
    """A DICOM result cannot be made from what was given."""


class NotDicomSourceError(DicomOutError):
    """The input was not a DICOM file, so there is no patient or study to file results under."""


class NoMaskError(DicomOutError):
    """The answer has no mask, and a Segmentation needs at least one segment."""


class DicomOutputExistsError(DicomOutError):
    """The output folder holds a file of that name that citrus-edge did not write."""


def check_source(source: Dataset | None, result: GroundingResult, frame: int) -> int:
    """Refuse a source that cannot carry `result` (one-line reasons); returns its frame count."""
    if source is None:
        raise NotDicomSourceError(
            "DICOM SEG and SR need a DICOM source (patient, study and the SOP instance they "
            "reference); the input is not DICOM, so use the JSON result instead"
        )
    missing = [k for k in _NEEDED if not source.get(k)]
    if missing:
        raise DicomOutError(f"the source DICOM lacks {', '.join(missing)}; it cannot be referenced")
    n_frames = int(source.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < n_frames:
        raise DicomOutError(f"frame {frame} asked of a source with {n_frames} frame(s)")
    hw = (int(source.get("Rows", 0)), int(source.get("Columns", 0)))
    bad = [np.shape(m) for m in result.masks if np.shape(m) != hw]
    if bad:
        raise DicomOutError(f"masks of shape {bad[0]} do not match the source's {hw[0]}x{hw[1]}")
    return n_frames


def dicom_results(
    source: Dataset | None, result: GroundingResult, bundle_id: str, frame: int = 0
) -> tuple[Dataset, Dataset]:
    """The SEG and the SR (both `pydicom.Dataset`, highdicom SOP classes) of `result`, which
    grounded frame `frame` (0-based) of `source` (the input DICOM, header suffices).

    Raises `NotDicomSourceError` for `source` None, `NoMaskError` when the result has no mask
    (`dicom_report` then gives the SR alone) and `DicomOutError` for a source that does not fit.
    """
    check_source(source, result, frame)
    if not result.masks:
        raise NoMaskError(
            "the answer has no [SEG] mask, and a DICOM Segmentation needs at least one segment; "
            "write the SR alone (dicom_report)"
        )
    with _refusals():
        seg = segmentation(source, result, bundle_id, frame)
    return seg, dicom_report(source, result, bundle_id, frame, seg)


@contextmanager
def _refusals() -> Iterator[None]:
    """highdicom's refusals of a source (ValueError, TypeError, AttributeError on an attribute
    it needs) as one-line `DicomOutError`s."""
    try:
        yield
    except DicomOutError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        reason = " ".join(str(e).split())
        raise DicomOutError(f"highdicom cannot build DICOM results on this source: {reason}") from e


def _algorithm(bundle_id: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=f"citrus-edge {bundle_id}",
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        source=MANUFACTURER,
        parameters={"bundle_id": bundle_id, "citrus_edge_version": __version__},
    )


def _one_frame_header(source: Dataset) -> Dataset:
    """The source's header as a single-frame image (no pixel data) for highdicom to build on.

    highdicom 0.28 builds a SEG of an image without a Frame of Reference (most ultrasound) only
    against one single source frame, and takes a classic multi-frame class (Ultrasound
    Multi-frame) for an enhanced one with functional groups. So a classic multi-frame source is
    shown to it as a one-frame Secondary Capture; the true SOP class and the frame actually
    grounded are written into every reference afterwards (`_restore_references`).
    """
    from pydicom import Dataset

    skip = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    header = copy.deepcopy(Dataset({e.tag: e for e in source if e.keyword not in skip}))
    header.file_meta = copy.deepcopy(getattr(source, "file_meta", Dataset()))
    if "NumberOfFrames" in source:
        if "SharedFunctionalGroupsSequence" in source:
            raise DicomOutError(
                "enhanced multi-frame sources (with functional groups) are not supported for "
                "DICOM out; send the frame as a single-frame image"
            )
        del header.NumberOfFrames
        header.SOPClassUID = SECONDARY_CAPTURE_SOP_CLASS
    return header


def segmentation(
    source: Dataset, result: GroundingResult, bundle_id: str, frame: int = 0
) -> Dataset:
    """The BINARY SEG of `result.masks` (segment k = mask k-1, in SEG frame k, empty ones kept)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = _algorithm(bundle_id)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=f"lesion {i + 1}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i in range(len(result.masks))
    ]
    stack = np.stack([np.asarray(m, dtype=bool) for m in result.masks], -1)  # [H, W, n_seg]
    seg = hd.seg.Segmentation(
        source_images=[_one_frame_header(source)],
        pixel_array=stack[None].astype(np.uint8),  # [1, H, W, n_seg]
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=bundle_id[:64],
        software_versions=__version__,
        device_serial_number=bundle_id[:64],
        omit_empty_frames=False,  # every segment keeps its frame, so the SR can reference it
        content_description="citrus-edge grounding masks",
        content_label="CITRUS_EDGE",
    )
    if "NumberOfFrames" in source:
        _restore_references(seg, source, frame + 1)
    return seg


def _restore_references(seg: Dataset, source: Dataset, frame_number: int) -> None:
    """Name the true SOP class and frame `frame_number` (1-based) of the multi-frame source in
    every reference the SEG makes to it (see `_one_frame_header`)."""
    images = list(seg.get("SourceImageSequence", []))
    for item in seg.PerFrameFunctionalGroupsSequence:
        for derivation in item.get("DerivationImageSequence", []):
            images.extend(derivation.get("SourceImageSequence", []))
    for ref in images:
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedFrameNumber = frame_number
    for series in seg.get("ReferencedSeriesSequence", []):
        for ref in series.get("ReferencedInstanceSequence", []):
            ref.ReferencedSOPClassUID = source.SOPClassUID


def _frames(source: Dataset, frame: int) -> list[int] | None:
    return [frame + 1] if "NumberOfFrames" in source else None


def _mask_group(source, seg, result: GroundingResult, i: int, bundle_id: str, frame: int):
    """TID 1410 group of mask i: its SEG frame and, where measured, area and long axis."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    measured = {m.mask: m for m in result.measurements}.get(i)
    measurements = []
    if measured is not None:
        measurements = [
            hd.sr.Measurement(codes.SCT.Area, measured.area_mm2, codes.UCUM.SquareMillimeter),
            hd.sr.Measurement(
                codes.SCT.LongAxis, measured.longest_diameter_mm, codes.UCUM.Millimeter
            ),
        ]
    tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {i + 1}")
    algorithm = hd.sr.AlgorithmIdentification(f"citrus-edge {bundle_id}", __version__)
    if seg is None:  # TID 1501: the numbers alone, without a region to point at
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=codes.SCT.Lesion,
            algorithm_id=algorithm,
            measurements=measurements or None,
        )
    reference = hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        frame_number=i + 1,
        segment_number=i + 1,
        source_image=hd.sr.SourceImageForSegmentation.from_source_image(
            source, _frames(source, frame)
        ),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=reference,
        finding_type=codes.SCT.Lesion,
        algorithm_id=algorithm,
        measurements=measurements or None,
    )


def _box_group(source, box, j: int, bundle_id: str, frame: int):
    """TID 1410 group of box j: a closed POLYLINE in pixel coordinates (x2, y2 exclusive are the
    far edges of the last pixels, which is where DICOM's continuous pixel coordinates put them)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    x1, y1, x2, y2 = box.as_list()
    points = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float32)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=hd.sr.SourceImageForRegion.from_source_image(source, _frames(source, frame)),
    )
    label = f"box {j + 1}" + (f": {box.label}" if box.label else "")
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label[:64]),
        referenced_region=region,
        finding_type=codes.SCT.Lesion,
        algorithm_id=hd.sr.AlgorithmIdentification(f"citrus-edge {bundle_id}", __version__),
    )


def _answer_group(bundle_id: str):
    """TID 1501 group standing for a text-only answer (no mask, no box): highdicom requires at
    least one measurement group, and this one says which algorithm gave the answer."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="answer"),
        finding_type=codes.SCT.ImagingFinding,
        algorithm_id=hd.sr.AlgorithmIdentification(f"citrus-edge {bundle_id}", __version__),
    )


def _findings(text: str):
    """TID 1500 row 12: the Qualitative Evaluations container, holding the answer as a TEXT."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    container = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Finding,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container


def _observer(bundle_id: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[MANUFACTURER, bundle_id]),  # one stable UID per bundle
        name=MANUFACTURER,
        manufacturer_name=MANUFACTURER,
        model_name=bundle_id[:64],
    )
    context = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device
    )
    return hd.sr.ObservationContext(observer_device_context=context)


def dicom_report(
    source: Dataset | None,
    result: GroundingResult,
    bundle_id: str,
    frame: int = 0,
    seg: Dataset | None = None,
) -> Dataset:
    """The Comprehensive SR (TID 1500) of `result`; mask groups reference `seg` when given (the
    SEG of the same result), else they carry the measurements alone (TID 1501 groups)."""
    check_source(source, result, frame)
    with _refusals():
        return _comprehensive_sr(source, result, bundle_id, frame, seg)


def _comprehensive_sr(source, result: GroundingResult, bundle_id: str, frame: int, seg):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    us = str(source.get("Modality", "")) == "US"
    groups = [_mask_group(source, seg, result, i, bundle_id, frame) for i in range(result.n_seg)]
    groups += [_box_group(source, b, j, bundle_id, frame) for j, b in enumerate(result.boxes)]
    report = hd.sr.MeasurementReport(
        observation_context=_observer(bundle_id),
        procedure_reported=codes.SCT.DiagnosticUltrasonography
        if us
        else codes.SCT.ImagingProcedure,
        imaging_measurements=groups or [_answer_group(bundle_id)],
    )
    report[0].ContentSequence.append(_findings(result.text))
    return hd.sr.ComprehensiveSR(
        evidence=[source] if seg is None else [source, seg],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # unverified machine output: a clinician verifies or amends it
    )


def _ours(path: Path) -> bool:
    """True for a DICOM SEG or Comprehensive SR that citrus-edge wrote (so it may be replaced)."""
    import pydicom

    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Manufacturer"]
        )
    except Exception:  # not DICOM at all, or unreadable: not ours
        return False
    return ds.get("Manufacturer") == MANUFACTURER and ds.get("SOPClassUID") in (
        SEG_SOP_CLASS,
        COMPREHENSIVE_SR_SOP_CLASS,
    )


def write_dicom_results(
    source: Dataset | None,
    result: GroundingResult,
    bundle_id: str,
    folder: str | os.PathLike,
    frame: int = 0,
) -> list[Path]:
    """Write `seg.dcm` (when the result has a mask) and `sr.dcm` into `folder`, atomically.

    A file of either name already there is replaced only when citrus-edge wrote it (a SEG or SR
    whose Manufacturer is citrus-edge); anything else raises `DicomOutputExistsError` before any
    file is written. Returns the paths written.
    """
    folder = Path(folder)
    for name in (SEG_NAME, SR_NAME):
        path = folder / name
        if (path.exists() or path.is_symlink()) and not _ours(path):
            raise DicomOutputExistsError(
                f"{path} exists and was not written by citrus-edge; choose another --dicom-out "
                "folder or move that file"
            )
    if result.masks:
        seg, sr = dicom_results(source, result, bundle_id, frame)
        datasets = [(SEG_NAME, seg), (SR_NAME, sr)]
    else:
        datasets = [(SR_NAME, dicom_report(source, result, bundle_id, frame))]
    written = []
    for name, ds in datasets:
        with atomic_path(folder / name) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        written.append(folder / name)
    stale = folder / SEG_NAME
    if not result.masks and stale.exists():  # ours (checked above), from an older run
        stale.unlink()  # left there it would pass for this result's SEG
    log.info("wrote DICOM %s into %s", " + ".join(n for n, _ in datasets), folder)
    return written


def read_source(path: str | os.PathLike) -> Dataset:
    """The header of the DICOM at `path` (no pixel data), as `dicom_results` needs it."""
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True, force=True)
