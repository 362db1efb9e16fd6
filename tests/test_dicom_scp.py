"""The DICOM receiver (citrus_edge.cart.scp) on loopback, and `run --dicom-out`, end to end.

A pynetdicom SCU sends a phantom DICOM to our C-STORE SCP (the tiny untrained bundle grounds it),
and a second pynetdicom SCP, the fake PACS, receives what is forwarded: the SR always, the SEG
when the answer has a mask. What arrives is compared with the same pipeline's own result.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from citrus_edge.cart.scp import (
    COMPREHENSIVE_SR_STORAGE,
    SEG_STORAGE,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    Destination,
    DestinationError,
    GroundingSCP,
)
from citrus_edge.tasks import PROMPTS

pynetdicom = pytest.importorskip("pynetdicom")
hd = pytest.importorskip("highdicom")
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class FakePACS:
    """A Storage SCP on a free loopback port that keeps every dataset it is sent."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt

        self.received: list[pydicom.Dataset] = []
        self.arrived = threading.Event()
        ae = AE(ae_title="FAKEPACS")
        for uid in (SEG_STORAGE, COMPREHENSIVE_SR_STORAGE):
            ae.add_supported_context(uid)
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000


def _send(port: int, path: Path, times: int = 1) -> list[int]:
    """C-STORE the file at `path` to 127.0.0.1:`port` `times` times; the status codes."""
    from pynetdicom import AE

    ae = AE(ae_title="TEST_SCU")
    ae.dimse_timeout = ae.acse_timeout = 60
    ae.add_requested_context(US_IMAGE)
    assoc = ae.associate("127.0.0.1", port, ae_title="CITRUS_TEST")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(path)).Status) for _ in range(times)]
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def pipeline(tiny_fp32_bundle):
    from citrus_edge.runtime import Pipeline

    return Pipeline.from_bundle(tiny_fp32_bundle, max_new_tokens=16)


@pytest.fixture
def phantom(small_phantom_set) -> Path:
    return small_phantom_set.parent / "images" / "phantom_00000.dcm"


@pytest.fixture
def pacs():
    fake = FakePACS()
    yield fake
    fake.server.shutdown()


def _scp(pipeline, pacs_port: int) -> GroundingSCP:
    scp = GroundingSCP(
        pipeline, PROMPTS["segment"], Destination("127.0.0.1", pacs_port, "FAKEPACS"), "CITRUS_TEST"
    )
    scp.start("127.0.0.1", 0)
    return scp


def test_c_store_round_trip(pipeline, phantom, pacs, caplog):
    expected = pipeline(phantom, PROMPTS["segment"])  # the same grounding, run directly
    source = pydicom.dcmread(phantom)
    scp = _scp(pipeline, pacs.port)
    try:
        with caplog.at_level(logging.INFO, logger="citrus_edge"):
            assert _send(scp.server.server_address[1], phantom) == [STATUS_SUCCESS]
    finally:
        scp.stop()

    by_class = {ds.SOPClassUID: ds for ds in pacs.received}
    n_masks = len(expected.masks)
    assert len(pacs.received) == (2 if n_masks else 1)
    sr = by_class[COMPREHENSIVE_SR_STORAGE]
    for ds in pacs.received:
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate"):
            assert ds.get(keyword) == source.get(keyword)
        assert ds.SOPInstanceUID != source.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    referenced = {i.ReferencedSOPInstanceUID for s in evidence for i in s.ReferencedSOPSequence}
    assert source.SOPInstanceUID in referenced
    texts = [item.TextValue for item in _walk(sr.ContentSequence) if item.ValueType == "TEXT"]
    assert expected.text in texts
    numbers = [
        float(i.MeasuredValueSequence[0].FloatingPointValue)
        for i in _walk(sr.ContentSequence)
        if i.ValueType == "NUM"
    ]
    assert numbers == [
        v for m in expected.measurements for v in (m.area_mm2, m.longest_diameter_mm)
    ]
    if n_masks:
        seg = hd.seg.Segmentation.from_dataset(by_class[SEG_STORAGE])
        assert seg.number_of_segments == n_masks
        pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID])[0]  # [H, W, n]
        assert np.array_equal(np.moveaxis(pixels, -1, 0).astype(bool), np.stack(expected.masks))
    logged = caplog.text
    assert "grounded, forwarded" in logged
    for keyword in ("PatientName", "PatientID"):
        assert str(source.get(keyword)) not in logged


class _Fixed:
    """A pipeline stand-in answering every image with one known result (the phantom's lesion
    mask, measured by the runtime), so the SEG path is exercised whatever the tiny model says."""

    bundle_id = "fixed-result"

    def __init__(self, result) -> None:
        self.result = result

    def ground(self, *args, **kwargs):
        return SimpleNamespace(result=self.result)


def test_c_store_forwards_seg_and_sr_of_a_mask(phantom, pacs):
    from citrus_edge.calib_data.load import load_image
    from citrus_edge.result import Box, GroundingResult
    from citrus_edge.runtime.measure import measure_image
    from citrus_edge.runtime.result_files import result_to_dict

    label = json.loads((phantom.parent.parent / "labels" / "phantom_00000.json").read_text())
    mask = np.asarray(Image.open(phantom.parent.parent / label["masks"][0])) > 0
    measured = measure_image([mask], load_image(phantom))
    result = GroundingResult(
        text="Sure, it is [SEG].",
        token_ids=[1],
        boxes=[Box(*label["boxes"][0])],
        masks=[mask],
        mask_scores=[0.9],
        measurements=measured.measurements,
    )
    scp = _scp(_Fixed(result), pacs.port)
    try:
        assert _send(scp.server.server_address[1], phantom) == [STATUS_SUCCESS]
    finally:
        scp.stop()
    by_class = {ds.SOPClassUID: ds for ds in pacs.received}
    assert sorted(by_class) == sorted([SEG_STORAGE, COMPREHENSIVE_SR_STORAGE])
    seg = hd.seg.Segmentation.from_dataset(by_class[SEG_STORAGE])
    source = pydicom.dcmread(phantom, stop_before_pixels=True)
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID])[0]  # [H, W, 1]
    assert seg.number_of_segments == 1 and np.array_equal(pixels[..., 0].astype(bool), mask)
    sr = by_class[COMPREHENSIVE_SR_STORAGE]
    numbers = [
        float(i.MeasuredValueSequence[0].FloatingPointValue)
        for i in _walk(sr.ContentSequence)
        if i.ValueType == "NUM"
    ]
    (m,) = result_to_dict(result)["measurements"]
    assert numbers == [m["area_mm2"], m["longest_diameter_mm"]] and m["area_mm2"] > 0
    refs = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in _walk(sr.ContentSequence)
        if i.ValueType == "IMAGE"
    }
    assert refs == {seg.SOPInstanceUID, source.SOPInstanceUID}


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


class _Failing:
    """A pipeline stand-in whose grounding raises `error`."""

    bundle_id = "failing"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def ground(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RuntimeError("backend crashed"), STATUS_PROCESSING_FAILURE),
        (ValueError("image cannot be decoded"), STATUS_CANNOT_UNDERSTAND),
    ],
)
def test_failed_grounding_answers_a_failure_and_keeps_listening(
    error, status, phantom, pacs, caplog
):
    source = pydicom.dcmread(phantom)
    scp = _scp(_Failing(error), pacs.port)
    try:
        with caplog.at_level(logging.WARNING, logger="citrus_edge"):
            statuses = _send(scp.server.server_address[1], phantom, times=2)
    finally:
        scp.stop()
    assert statuses == [status, status]  # the second store is answered too: no crash
    assert pacs.received == []
    lines = [r.getMessage() for r in caplog.records if r.name == "citrus_edge.cart.scp"]
    assert len(lines) == 2 and all(str(error) in line for line in lines)
    assert all("\n" not in line for line in lines)
    assert str(source.PatientName) not in caplog.text and source.PatientID not in caplog.text


def test_unreachable_destination_is_a_processing_failure(pipeline, phantom, caplog):
    with socket.socket() as s:  # a free port, closed again: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scp = _scp(pipeline, port)
    try:
        with caplog.at_level(logging.WARNING, logger="citrus_edge"):
            assert _send(scp.server.server_address[1], phantom) == [STATUS_PROCESSING_FAILURE]
    finally:
        scp.stop()
    assert "ForwardError" in caplog.text and "refused or unreachable" in caplog.text


def test_destination_parse():
    assert Destination.parse("127.0.0.1:4242:PACS") == Destination("127.0.0.1", 4242, "PACS")
    assert Destination.parse("[::1]:104:ARCHIVE") == Destination("::1", 104, "ARCHIVE")
    for bad in ("127.0.0.1:PACS", "host:0:PACS", "host:70000:PACS", "host:104:", "h:1:" + "A" * 17):
        with pytest.raises(DestinationError):
            Destination.parse(bad)


def test_listen_refuses_bad_options_before_loading(tiny_fp32_bundle):
    import citrus_edge.cli.listen_command  # noqa: F401  (registers `listen`)
    from citrus_edge.cli.cli_app import app

    runner = CliRunner()
    res = runner.invoke(app, ["listen", str(tiny_fp32_bundle), "--forward", "nohost"])
    assert isinstance(res.exception, DestinationError)
    args = ["listen", str(tiny_fp32_bundle), "--forward", "h:1:P", "--task", "segment"]
    res = runner.invoke(app, [*args, "--prompt", "x"])
    assert res.exit_code == 2 and "not both" in res.output


def test_run_dicom_out(tiny_fp32_bundle, phantom, tmp_path):
    from citrus_edge.cli.cli_app import app

    out = tmp_path / "run"
    args = ["run", str(tiny_fp32_bundle), str(phantom), "--out", str(out), "--max-new-tokens", "16"]
    res = CliRunner().invoke(app, [*args, "--dicom-out", str(tmp_path / "dicom")])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "phantom_00000.json").read_text())
    folder = tmp_path / "dicom" / "phantom_00000"
    names = sorted(p.name for p in folder.iterdir())
    assert names == (["seg.dcm", "sr.dcm"] if result["masks"] else ["sr.dcm"])
    sr = hd.sr.srread(folder / "sr.dcm")
    numbers = [
        float(i.MeasuredValueSequence[0].FloatingPointValue)
        for i in _walk(sr.ContentSequence)
        if i.ValueType == "NUM"
    ]
    m = result["measurements"]
    assert numbers == [v for x in m for v in (x["area_mm2"], x["longest_diameter_mm"])]
    if result["masks"]:
        assert hd.seg.segread(folder / "seg.dcm").number_of_segments == len(result["masks"])

    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    res = CliRunner().invoke(app, ["run", str(tiny_fp32_bundle), str(png), "--dicom-out", str(out)])
    assert type(res.exception).__name__ == "NotDicomSourceError"
