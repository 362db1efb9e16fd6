"""A DICOM C-STORE receiver that grounds every image it is sent and forwards SEG + SR (pynetdicom).

How imaging devices and PACS talk: the cart (or a modality) sends an ultrasound image to this
Storage SCP; each image is grounded with one configured prompt by a runtime `Pipeline`, and the
DICOM results (`dicom_out`: a Segmentation when the answer has a mask, and the TID 1500 report)
are sent by C-STORE to a destination AE, typically the PACS.

The C-STORE is answered after the forward, so its status says what happened to the results:
0x0000 success; 0xC000 (Cannot understand) when the image cannot be read or grounded as sent;
0x0110 (Processing failure) when grounding or the forward failed otherwise. Each failure logs one
line: the association's calling AE title, the SOP class and the reason; never a patient's name,
ID or dates, nor UIDs. An SCU must therefore wait as long as one grounding takes (pynetdicom's
default DIMSE timeout is 30 s). One pipeline serves every association, one image at a time.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citrus_edge.cart.dicom_out import dicom_report, dicom_results

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110
DEFAULT_AE_TITLE = "CITRUS_EDGE"
# Image SOP classes taken: single- and multi-frame ultrasound, and the secondary captures carts
# often send instead.
ACCEPTED_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture Image Storage
)
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"


class DestinationError(ValueError):
    """A destination AE given as anything but HOST:PORT:AE_TITLE."""


class ForwardError(RuntimeError):
    """The destination AE refused the association or a C-STORE of the results."""


def check_ae_title(title: str, what: str = "AE title") -> str:
    """A DICOM AE title: 1-16 printable ASCII characters, not only spaces, no backslash."""
    ok = 0 < len(title) <= 16 and title.strip() and title.isascii() and title.isprintable()
    if not ok or "\\" in title:
        raise DestinationError(f"{what} {title!r} must be 1-16 printable ASCII characters")
    return title


@dataclass(frozen=True)
class Destination:
    """The AE that receives SEG + SR (a PACS): host, port and its AE title."""

    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, spec: str) -> Destination:
        """`HOST:PORT:AE_TITLE`, e.g. `127.0.0.1:4242:PACS` (IPv6 hosts in brackets)."""
        host, sep, rest = spec.rpartition(":")
        host, sep2, port = host.rpartition(":")
        if not (sep and sep2 and host and port.isdigit() and 0 < int(port) < 65536):
            raise DestinationError(
                f"destination {spec!r} is not HOST:PORT:AE_TITLE (e.g. 127.0.0.1:4242:PACS)"
            )
        return cls(host.strip("[]"), int(port), check_ae_title(rest, "destination AE title"))


class GroundingSCP:
    """A Storage SCP in front of one loaded pipeline; `start` listens, `stop` closes.

    `pipeline` is a `citrus_edge.runtime.Pipeline` (or anything with its `ground` and
    `bundle_id`); `frame` is the frame grounded in a multi-frame image.
    """

    def __init__(
        self,
        pipeline: Any,
        prompt: str,
        destination: Destination,
        ae_title: str = DEFAULT_AE_TITLE,
        frame: int = 0,
    ) -> None:
        self.pipeline, self.prompt, self.destination = pipeline, prompt, destination
        self.ae_title = check_ae_title(ae_title)
        self.frame = frame
        self.server: Any = None
        self._lock = threading.Lock()  # one grounding at a time on the one pipeline
        self._count = itertools.count(1)

    def start(self, host: str = "127.0.0.1", port: int = 11112, block: bool = False) -> Any:
        """Listen on (host, port); returns the pynetdicom server (None once a blocking one ends)."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

        ae = AE(ae_title=self.ae_title)
        for uid in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_STORE, self.handle_store)]
        self.server = ae.start_server((host, port), block=block, evt_handlers=handlers)
        log.info("DICOM receiver %s listening on %s:%d", self.ae_title, host, port)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def handle_store(self, event: Any) -> int:
        """EVT_C_STORE: ground the image, forward SEG + SR, answer with a status (never raises)."""
        number = next(self._count)
        calling = event.assoc.requestor.ae_title
        sop_class = str(event.request.AffectedSOPClassUID)
        try:
            sent = self._ground_and_forward(event)
        except ValueError as e:
            return self._failed(number, calling, sop_class, e, STATUS_CANNOT_UNDERSTAND)
        except Exception as e:  # any failure becomes a status: the listener keeps running
            return self._failed(number, calling, sop_class, e, STATUS_PROCESSING_FAILURE)
        log.info("C-STORE #%d from %s: grounded, forwarded %s", number, calling, "+".join(sent))
        return STATUS_SUCCESS

    def _failed(self, number: int, calling: str, sop_class: str, e: Exception, status: int) -> int:
        reason = " ".join(str(e).split())
        log.warning(
            "C-STORE #%d from %s (%s) failed, status 0x%04X: %s: %s",
            number,
            calling,
            sop_class,
            status,
            type(e).__name__,
            reason,
        )
        return status

    def _ground_and_forward(self, event: Any) -> list[str]:
        from pydicom import dcmread

        with tempfile.TemporaryDirectory(prefix="citrus-edge-scp-") as tmp:
            path = Path(tmp) / "received.dcm"
            path.write_bytes(event.encoded_dataset(include_meta=True))
            with self._lock:
                result = self.pipeline.ground(path, self.prompt, frame=self.frame).result
            source = dcmread(path, stop_before_pixels=True)
        bundle_id = self.pipeline.bundle_id
        if result.masks:
            datasets = list(dicom_results(source, result, bundle_id, self.frame))
        else:
            datasets = [dicom_report(source, result, bundle_id, self.frame)]
        send(datasets, self.destination, self.ae_title)
        return ["SEG" if ds.SOPClassUID == SEG_STORAGE else "SR" for ds in datasets]


def send(datasets: list[Any], destination: Destination, calling_ae_title: str) -> None:
    """C-STORE `datasets` (SEG / Comprehensive SR) to `destination` in one association; raises
    `ForwardError` when it is refused or any store does not succeed."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae_title)
    for uid in (SEG_STORAGE, COMPREHENSIVE_SR_STORAGE):
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    d = destination
    assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
    if not assoc.is_established:
        raise ForwardError(f"destination {d.ae_title} at {d.host}:{d.port} refused or unreachable")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None or (code != 0 and code not in (0xB000, 0xB007, 0xB006)):
                shown = "no answer" if code is None else f"0x{code:04X}"
                raise ForwardError(f"destination {d.ae_title} answered the C-STORE with {shown}")
    finally:
        assoc.release()


def serve_dicom(
    bundle: str | os.PathLike,
    prompt: str,
    destination: Destination,
    host: str = "127.0.0.1",
    port: int = 11112,
    ae_title: str = DEFAULT_AE_TITLE,
    frame: int = 0,
    block: bool = True,
    **pipeline_options: Any,
) -> GroundingSCP:
    """Load `bundle` (`Pipeline.from_bundle(bundle, **pipeline_options)`) and listen; blocks
    until interrupted unless `block` is False (then the returned SCP's `stop` closes it)."""
    from citrus_edge.runtime import Pipeline

    check_ae_title(ae_title)  # before the bundle loads
    pipeline = Pipeline.from_bundle(bundle, **pipeline_options)
    scp = GroundingSCP(pipeline, prompt, destination, ae_title, frame)
    scp.start(host, port, block=block)
    return scp
