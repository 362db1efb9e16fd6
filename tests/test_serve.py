"""`citrus-edge serve`: the real server (uvicorn on a free loopback port, in a thread) in front of
the tiny fp32 bundle, exercised over HTTP with httpx.

The random TINY model's answers hold no `[SEG]` token, so the session tests wrap the real
pipeline in `WithSegState`, which gives a key frame without one a fixed `[SEG]` state: the
service's job (keep the key frame's states, run SAM2 alone on each frame) is what is tested,
and every frame's masks are compared with `Pipeline.track` called directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fixtures import random_rgb

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402
from pydicom import examples  # noqa: E402

from citrus_edge.calib_data.load import load_image  # noqa: E402
from citrus_edge.calib_data.spacing import PixelSpacing  # noqa: E402
from citrus_edge.cart.live_video import LatestFrame, frame_interval_s, run_live  # noqa: E402
from citrus_edge.cart.serve_settings import ServeConfig  # noqa: E402
from citrus_edge.cart.service import build_service, serve, uvicorn_config  # noqa: E402
from citrus_edge.cart.service_errors import ServeConfigError  # noqa: E402
from citrus_edge.runtime.result_files import result_to_dict  # noqa: E402
from citrus_edge.tasks import DETECT_PROMPT, SEGMENT_PROMPT  # noqa: E402

CINE = examples.get_path("ybr_color")  # 30 frames of ultrasound, Frame Time 33.333 ms
MAX_NEW = 8
TOKEN = "test-token-0123456789abcdef"
SEG_STATE_SEED = 5
# What an answer's JSON holds that must not match between two runs: wall-clock times.
VOLATILE = ("timings_ms", "input")


@pytest.fixture(scope="module")
def pipe(tiny_fp32_bundle):
    from citrus_edge.runtime import Pipeline

    return Pipeline.from_bundle(tiny_fp32_bundle, max_new_tokens=MAX_NEW)


class WithSegState:
    """The real pipeline; a key frame whose answer has no `[SEG]` gets one fixed state, so that
    SAM2 has something to track. Counts the calls of each kind."""

    def __init__(self, pipe, gate: threading.Event | None = None, masks: bool = False):
        self.pipe, self.gate, self.masks = pipe, gate, masks
        hidden = pipe.model_config.text.hidden_size
        rng = np.random.default_rng(SEG_STATE_SEED)
        self.state = rng.standard_normal((1, hidden)).astype(np.float32)
        self.grounds = self.tracks = 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def ground(self, image, prompt, frame=0, spacing=None):
        self.grounds += 1
        g = self.pipe.ground(image, prompt, frame, spacing)
        if len(g.seg_hidden):
            return g
        g = dataclasses.replace(g, seg_hidden=self.state)
        if self.masks:  # the key frame's own result gets the state's masks too
            t = self.pipe.track(g.image, g)
            g.result = dataclasses.replace(
                g.result, masks=t.masks, mask_scores=t.mask_scores, measurements=t.measurements
            )
        return g

    def track(self, image, key, frame=0, spacing=None):
        self.tracks += 1
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        return self.pipe.track(image, key, frame, spacing)


class Gated:
    """The real pipeline, each `ground` held until the test opens `gate`."""

    def __init__(self, pipe):
        self.pipe, self.gate, self.started = pipe, threading.Event(), 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def ground(self, *args, **kwargs):
        self.started += 1
        assert self.gate.wait(10), "the test never opened the gate"
        return self.pipe.ground(*args, **kwargs)


@contextlib.contextmanager
def running(pipeline, **settings):
    """The service on a free loopback port, in a thread; yields (httpx client, service)."""
    loader = settings.pop("loader", lambda: pipeline)
    config = ServeConfig(port=0, **settings)
    service = build_service(loader, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(service.app, "127.0.0.1", port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=headers)
    try:
        yield client, service
    finally:
        client.close()
        server.should_exit = True
        thread.join(15)
        sock.close()


def wait_ready(client: httpx.Client) -> None:
    deadline = time.monotonic() + 20
    while client.get("/v1/ready").status_code != 200:
        assert time.monotonic() < deadline, "the service never became ready"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(pipe):
    with running(pipe, max_request_bytes=2_000_000) as (client, service):
        wait_ready(client)
        yield client, service


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def same_result(served: dict, direct: dict) -> None:
    """Everything but times and the input record matches the direct run, key by key."""
    assert set(served) == set(direct)
    for key in set(direct) - set(VOLATILE):
        assert served[key] == direct[key], key


def error_of(response: httpx.Response, status: int, type_: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_ and error["status"] == status
    assert "\n" not in error["message"] and error["message"]
    return error["message"]


# --- health, ready, info -------------------------------------------------------------------------


def test_health_ready_and_info_describe_the_bundle(server, tiny_fp32_bundle):
    client, _ = server
    manifest = json.loads((tiny_fp32_bundle / "manifest.json").read_text())
    assert client.get("/v1/health").json()["status"] == "alive"
    ready = client.get("/v1/ready").json()
    assert ready["ready"] is True and ready["verified"] is True
    assert ready["bundle_id"] == manifest["bundle_id"]
    assert ready["load_ms"]["open_bundle"] >= 0
    info = client.get("/v1/info").json()
    assert info["bundle_id"] == manifest["bundle_id"]
    assert info["target"] == "cpu" and info["precision"]["recipe"] == "fp32"
    assert set(info["precision"]["components"].values()) == {"fp32"}
    assert info["versions"]["bundle"] == manifest["versions"]
    assert info["versions"]["service"]["uvicorn"] == uvicorn.__version__
    assert info["limits"]["max_request_bytes"] == 2_000_000 and info["limits"]["token"] is False


# --- /v1/ground ----------------------------------------------------------------------------------


def test_multipart_png_answers_runs_json(server, pipe, tmp_path):
    client, _ = server
    rgb = random_rgb(180, 220, seed=1)
    data = png_bytes(rgb)
    (tmp_path / "x.png").write_bytes(data)
    r = client.post("/v1/ground", files={"image": ("x.png", data)}, data={"task": "segment"})
    assert r.status_code == 200, r.text
    body = r.json()
    same_result(body, result_to_dict(pipe.ground(tmp_path / "x.png", SEGMENT_PROMPT).result))
    assert body["input"] == {"path": None, "sha256": hashlib.sha256(data).hexdigest(), "frame": 0}
    assert body["image_hw"] == [180, 220] and body["prompt"] == SEGMENT_PROMPT
    assert len(body["token_ids"]) == len(body["token_logprobs"]) <= MAX_NEW


def test_raw_dicom_and_jpeg_bodies_with_query_fields(server, pipe, tmp_path):
    client, _ = server
    data = Path(CINE).read_bytes()
    r = client.post("/v1/ground", content=data, params={"task": "detect", "frame": "7"})
    assert r.status_code == 200, r.text
    same_result(r.json(), result_to_dict(pipe.ground(CINE, DETECT_PROMPT, frame=7).result))
    assert r.json()["input"]["frame"] == 7
    assert not any("citrus-serve-" in w for w in r.json()["warnings"])  # no temporary path
    jpeg = io.BytesIO()
    Image.fromarray(random_rgb(120, 160, seed=2)).save(jpeg, format="JPEG", quality=90)
    (tmp_path / "x.jpg").write_bytes(jpeg.getvalue())
    r = client.post("/v1/ground", content=jpeg.getvalue(), params={"prompt": "What is seen?"})
    assert r.status_code == 200, r.text
    same_result(r.json(), result_to_dict(pipe.ground(tmp_path / "x.jpg", "What is seen?").result))


def test_raw_pixels_with_shape_and_spacing(server, pipe):
    client, _ = server
    rgb = random_rgb(96, 128, seed=3)
    r = client.post(
        "/v1/ground",
        content=rgb.tobytes(),
        params={"task": "segment", "shape": "96,128,3", "spacing": "0.2,0.25"},
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    direct = pipe.ground(rgb, SEGMENT_PROMPT, spacing=PixelSpacing(0.2, 0.25)).result
    same_result(r.json(), result_to_dict(direct))
    grey = rgb[..., 0]
    r = client.post(
        "/v1/ground", content=grey.tobytes(), params={"task": "report", "shape": "96,128"}
    )
    assert r.status_code == 200, r.text
    direct = pipe.ground(np.repeat(grey[..., None], 3, -1), "Describe the findings in this scan.")
    same_result(r.json(), result_to_dict(direct.result))


BAD = [  # (what is sent, status, error type, words the message must name)
    ({"params": {"task": "segment"}}, 400, "RequestInputError", "no image"),
    ({"content": b"\x00" * 12}, 400, "RequestInputError", "no prompt"),
    ({"content": b"1", "params": {"task": "segment", "prompt": "x"}}, 400, "RequestInputError",
     "not both"),
    ({"content": b"1", "params": {"task": "measure"}}, 400, "RequestInputError", "task='measure'"),
    ({"content": b"1", "params": {"task": "segment", "shape": "2,x"}}, 400, "RequestInputError",
     "shape='2,x'"),
    ({"content": b"\x00" * 11, "params": {"task": "segment", "shape": "2,2,3"}}, 400,
     "RequestInputError", "request body: 11 bytes"),
    ({"content": b"\x00" * 12, "params": {"task": "segment", "shape": "2,2,3", "spacing": "0,1"}},
     400, "RequestInputError", "spacing='0,1'"),
    ({"content": b"\x00" * 12, "params": {"task": "segment", "promt": "x"}}, 400,
     "RequestInputError", "promt"),
    ({"files": {"image": ("a.dcm", b"not an image")}, "data": {"task": "segment"}}, 400,
     "NotDicomError", "multipart field 'image' (12 bytes)"),
    ({"content": Path(CINE).read_bytes(), "params": {"task": "segment", "frame": "30"}}, 400,
     "FrameOutOfRangeError", "request body"),
    ({"files": {"image": ("a", b"1"), "other": ("b", b"2")}}, 400, "RequestInputError",
     "multipart/form-data body cannot be parsed: Too many files"),
]  # fmt: skip


@pytest.mark.parametrize(("request_kw", "status", "type_", "names"), BAD)
def test_bad_input_answers_one_typed_line_naming_it(server, request_kw, status, type_, names):
    client, _ = server
    message = error_of(client.post("/v1/ground", **request_kw), status, type_)
    assert names in message
    assert "/tmp" not in message and "citrus-serve-" not in message


def test_bodies_over_the_limit_are_refused_with_413(server):
    client, _ = server
    big = b"\x00" * 2_100_000
    message = error_of(client.post("/v1/ground?task=segment", content=big), 413,
                       "RequestTooLargeError")  # fmt: skip
    assert "2000000" in message

    def chunks():  # no Content-Length: the limit is enforced while the body streams
        for _ in range(21):
            yield b"\x00" * 100_000

    error_of(client.post("/v1/ground?task=segment", content=chunks()), 413, "RequestTooLargeError")
    assert client.get("/v1/health").status_code == 200


SECRETS = ("Doe", "Janine", "PID-98765", "19610203", "20240517")


@contextlib.contextmanager
def server_log():
    """Every log line of the process (bar the test's own HTTP client) while the block runs."""
    records: list[str] = []
    handler = logging.Handler()
    client_side = ("httpx", "httpcore")  # the test's own client logs its URLs

    def keep(record: logging.LogRecord) -> None:
        if not record.name.startswith(client_side):
            records.append(handler.format(record))

    handler.emit = keep
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_the_log_holds_no_patient_data(server, tmp_path):
    client, _ = server
    ds = pydicom.dcmread(examples.get_path("rgb_color"))  # a copy: examples.* are shared
    ds.PatientName, ds.PatientID = "Doe^Janine", "PID-98765"
    ds.PatientBirthDate, ds.StudyDate = "19610203", "20240517"
    path = tmp_path / "patient.dcm"
    ds.save_as(path, enforce_file_format=True)
    with server_log() as records:
        ok = client.post("/v1/ground", content=path.read_bytes(), params={"task": "segment"})
        bad = client.post("/v1/ground", content=path.read_bytes(),
                          params={"task": "segment", "frame": "3"})  # fmt: skip
    assert ok.status_code == 200 and bad.status_code == 400
    access = [r for r in records if r.startswith("POST /v1/ground")]
    assert len(access) == 2  # the capture saw the service's own lines
    for secret in (*SECRETS, "segment"):
        assert not any(secret in r for r in records), secret


class Broken:
    """A pipeline failing with a message that quotes patient data."""

    def __init__(self, pipe):
        self.pipe, self.patient = pipe, "Doe^Janine PID-98765"

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def ground(self, *args, **kwargs):
        raise RuntimeError(f"decoder failed on {self.patient}")  # the traceback shows this line


def test_an_unexpected_error_is_500_without_its_message(pipe):
    with running(Broken(pipe)) as (client, _), server_log() as records:
        wait_ready(client)
        r = client.post("/v1/ground", content=png_bytes(random_rgb(64, 64)),
                        params={"task": "segment"})  # fmt: skip
    message = error_of(r, 500, "RuntimeError")
    assert message == "internal error (RuntimeError); see the service log"
    assert any("internal error RuntimeError" in line for line in records)
    for secret in SECRETS[:3]:
        assert not any(secret in line for line in records), secret


def test_dicom_1_answers_a_zip_of_the_json_the_seg_and_the_sr(pipe):
    pytest.importorskip("highdicom")
    path = examples.get_path("rgb_color")
    source = pydicom.dcmread(path)
    with running(WithSegState(pipe, masks=True)) as (client, _):
        wait_ready(client)
        r = client.post("/v1/ground", content=Path(path).read_bytes(),
                        params={"task": "segment", "dicom": "1"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/zip"
        z = zipfile.ZipFile(io.BytesIO(r.content))
        assert sorted(z.namelist()) == ["result.json", "seg.dcm", "sr.dcm"]
        body = json.loads(z.read("result.json"))
        message = error_of(
            client.post(
                "/v1/ground",
                files={"image": ("x.png", png_bytes(random_rgb(64, 64)))},
                data={"task": "segment", "dicom": "1"},
            ),  # fmt: skip
            400,
            "NotDicomSourceError",
        )
        assert message.startswith("multipart field 'image': dicom=1 needs a DICOM input")
    seg = pydicom.dcmread(io.BytesIO(z.read("seg.dcm")))
    sr = pydicom.dcmread(io.BytesIO(z.read("sr.dcm")))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    for ds in (seg, sr):
        assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
        assert ds.SOPInstanceUID not in (source.SOPInstanceUID, body["bundle_id"])
    assert len(body["masks"]) == len(seg.SegmentSequence) == 1
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)  # [segments, H, W]
    assert [int(m.sum()) for m in pixels] == [m["area_px"] for m in body["masks"]]
    assert body["input"]["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()

    with running(pipe) as (client, _):  # no mask in the answer: the SR alone
        wait_ready(client)
        r = client.post("/v1/ground", content=Path(path).read_bytes(),
                        params={"task": "segment", "dicom": "true"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert sorted(zipfile.ZipFile(io.BytesIO(r.content)).namelist()) == ["result.json",
                                                                             "sr.dcm"]  # fmt: skip


# --- the token rule ------------------------------------------------------------------------------


def test_other_addresses_need_a_token_and_refuse_at_start(tmp_path, tiny_fp32_bundle, capsys):
    from test_cli import cli

    import citrus_edge.cli.serve_command  # noqa: F401  (registers `serve` until __init__ does)
    from citrus_edge.cli.cli_app import command

    command.cache_clear()  # the click command is built once; rebuild it with `serve` registered

    for host in ("0.0.0.0", "192.168.1.20", "cart.local", "::"):
        with pytest.raises(ServeConfigError, match="--token-file"):
            ServeConfig(host=host)
    assert ServeConfig(host="0.0.0.0", token=TOKEN).token == TOKEN
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1"):
        assert ServeConfig(host=host).token is None
    code, _, err = cli(capsys, "serve", str(tiny_fp32_bundle), "--host", "0.0.0.0", "--port", "1")
    assert code == 1 and err.startswith("error: ServeConfigError: --host 0.0.0.0")
    short = tmp_path / "short"
    short.write_text("abc\n")
    code, _, err = cli(capsys, "serve", str(tiny_fp32_bundle), "--token-file", str(short))
    assert code == 1 and "at least 16 characters" in err


def test_with_a_token_every_request_without_it_is_refused(pipe):
    with running(pipe, token=TOKEN) as (client, _):
        wait_ready(client)
        bare = httpx.Client(base_url=client.base_url, timeout=10)
        wrong = httpx.Client(base_url=client.base_url, timeout=10,
                             headers={"Authorization": f"Bearer {TOKEN}x"})  # fmt: skip
        for other in (bare, wrong):
            for method, path in (("GET", "/v1/health"), ("GET", "/v1/info"),
                                 ("POST", "/v1/ground"), ("DELETE", "/v1/sessions/x")):  # fmt: skip
                r = other.request(method, path, content=b"x" * 1000)
                error_of(r, 401, "UnauthorizedError")
                assert r.headers["www-authenticate"] == "Bearer"
        bare.close()
        wrong.close()
        assert client.get("/v1/health").status_code == 200
        assert client.get("/v1/info").json()["limits"]["token"] is True


# --- queue, timeout, readiness -------------------------------------------------------------------


def test_a_full_queue_answers_503_and_a_slow_request_504(pipe):
    gated = Gated(pipe)
    frame = random_rgb(64, 64, seed=4)
    raw = {"content": frame.tobytes(), "params": {"task": "segment", "shape": "64,64,3"}}
    with running(gated, queue_size=1, timeout_s=1.5) as (client, service):
        wait_ready(client)
        queue = service.state.queue
        answers: dict[int, httpx.Response] = {}

        def post(i):
            answers[i] = client.post("/v1/ground", **raw)

        first = threading.Thread(target=post, args=(1,))
        first.start()
        while gated.started < 1:  # running, held at the gate
            time.sleep(0.005)
        second = threading.Thread(target=post, args=(2,))
        second.start()
        while queue.admitted < 2:  # waiting behind it
            time.sleep(0.005)
        t0 = time.perf_counter()
        busy = client.post("/v1/ground", **raw)
        assert time.perf_counter() - t0 < 1.0  # refused at once, not queued
        message = error_of(busy, 503, "ServiceBusyError")
        assert "queue size 1" in message and int(busy.headers["retry-after"]) >= 1
        first.join()
        second.join()
        for i in (1, 2):
            assert "1.5 s timeout" in error_of(answers[i], 504, "RequestTimeoutError")
        gated.gate.set()  # the held call finishes; the abandoned waiting one is skipped
        deadline = time.monotonic() + 10
        while queue.admitted and time.monotonic() < deadline:  # the slots free as work ends
            time.sleep(0.005)
        ok = client.post("/v1/ground", **raw)
        assert ok.status_code == 200, ok.text
        assert (queue.refused, queue.timed_out, gated.started) == (1, 2, 2)
        assert queue.served == 2 and queue.admitted == 0


def test_ready_waits_for_the_bundle_and_a_failed_load_stops_serve(pipe):
    release = threading.Event()

    def slow_load():
        assert release.wait(10)
        return pipe

    with running(None, loader=slow_load) as (client, _):
        assert client.get("/v1/health").status_code == 200
        r = client.get("/v1/ready")
        assert r.status_code == 503 and r.json()["ready"] is False
        error_of(client.post("/v1/ground?task=segment", content=b"x"), 503, "NotReadyError")
        release.set()
        wait_ready(client)

    from citrus_edge.bundle import BundleError

    def broken():
        raise BundleError("bundle/llm.onnx: sha256 differs from the manifest")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(BundleError, match="sha256 differs"):
        serve(broken, ServeConfig(port=port))
    assert time.perf_counter() - t0 < 10


# --- video sessions ------------------------------------------------------------------------------


def cine_frames() -> list[np.ndarray]:
    return [load_image(CINE, i).pixels for i in range(30)]


def post_frame(client, session: str, rgb: np.ndarray) -> httpx.Response:
    h, w, _ = rgb.shape
    return client.post(f"/v1/sessions/{session}/frames", content=rgb.tobytes(),
                       params={"shape": f"{h},{w},3"})  # fmt: skip


def test_a_session_of_30_frames_runs_the_llm_once_and_sam2_per_frame(pipe):
    seg = WithSegState(pipe)
    frames = cine_frames()
    with running(seg) as (client, service):
        wait_ready(client)
        opened = client.post("/v1/sessions", content=Path(CINE).read_bytes(),
                             params={"task": "segment"})  # fmt: skip
        assert opened.status_code == 201, opened.text
        sid = opened.json()["session"]
        assert opened.headers["location"] == f"/v1/sessions/{sid}"
        key = service.state.sessions.get(sid).key
        served = []
        for rgb in frames:
            r = post_frame(client, sid, rgb)
            assert r.status_code == 200, r.text
            served.append(r.json())
        stats = client.get(f"/v1/sessions/{sid}").json()["stats"]
        closed = client.delete(f"/v1/sessions/{sid}")
        assert closed.json()["closed"] is True
        error_of(post_frame(client, sid, frames[0]), 404, "UnknownSessionError")
    assert (seg.grounds, seg.tracks) == (1, 30)  # the VLM once; SAM2 alone on each frame
    assert [s["frame"] for s in served] == list(range(1, 31))
    assert {s["status"] for s in served} == {"processed"}
    assert sum(s["dropped_before"] for s in served) == 0  # one at a time: nothing to drop
    assert (stats["received"], stats["processed"], stats["dropped"]) == (30, 30, 0)
    assert stats["mean_ms"] > 0
    for i in (0, 13, 29):  # the served masks are Pipeline.track's
        direct = result_to_dict(pipe.track(frames[i], key))
        same_result(served[i]["result"], direct)
        assert len(direct["masks"]) == 1
    assert all(s["result"]["text"] == opened.json()["result"]["text"] for s in served)


def test_frames_faster_than_sam2_drop_all_but_the_newest(pipe):
    gate = threading.Event()
    seg = WithSegState(pipe, gate)
    frames = cine_frames()[:4]
    with running(seg) as (client, service):
        wait_ready(client)
        opened = client.post("/v1/sessions", content=Path(CINE).read_bytes(),
                             params={"task": "segment"})  # fmt: skip
        sid = opened.json()["session"]
        session = service.state.sessions.get(sid)
        answers: dict[int, dict] = {}

        def send(i):
            answers[i] = post_frame(client, sid, frames[i]).json()

        threads = []
        for i in range(4):  # frame 1 runs (held at the gate); 2, 3, 4 arrive meanwhile
            threads.append(threading.Thread(target=send, args=(i,)))
            threads[-1].start()
            while session.received < i + 1 or (i == 0 and seg.tracks < 1):
                time.sleep(0.005)
        gate.set()
        for t in threads:
            t.join()
    got = {a["frame"]: a for a in answers.values()}
    assert [got[f]["status"] for f in (1, 2, 3, 4)] == ["processed", "dropped", "dropped",
                                                        "processed"]  # fmt: skip
    assert (got[2]["superseded_by"], got[3]["superseded_by"]) == (3, 4)
    assert (got[1]["dropped_before"], got[4]["dropped_before"]) == (0, 2)
    assert got[4]["stats"]["received"] == 4 and got[4]["stats"]["dropped"] == 2
    assert got[4]["stats"]["processed"] == 2 and seg.tracks == 2
    assert "result" not in got[2] and len(got[4]["result"]["masks"]) == 1


def test_an_idle_session_expires_and_a_key_frame_without_seg_opens_none(pipe):
    with running(WithSegState(pipe), session_idle_s=0.3) as (client, service):
        wait_ready(client)
        sid = client.post("/v1/sessions", content=Path(CINE).read_bytes(),
                          params={"task": "segment"}).json()["session"]  # fmt: skip
        assert client.get(f"/v1/sessions/{sid}").status_code == 200
        time.sleep(0.6)
        assert "idle for more than 0.3 s" in error_of(
            client.get(f"/v1/sessions/{sid}"), 404, "UnknownSessionError"
        )
        assert service.state.sessions.expired == 1 and len(service.state.sessions) == 0
    with running(pipe) as (client, _):  # the plain tiny model: no [SEG] in its answer
        wait_ready(client)
        r = client.post("/v1/sessions", content=Path(CINE).read_bytes(),
                        params={"task": "segment"})  # fmt: skip
        assert "no [SEG] token" in error_of(r, 422, "NothingToTrackError")
        assert r.json()["result"]["masks"] == []


# --- live video from a multi-frame DICOM ---------------------------------------------------------


class SlowTrack(WithSegState):
    def track(self, image, key, frame=0, spacing=None):
        time.sleep(0.25)  # SAM2 (tiny: milliseconds) made over seven frames slower than the probe
        return super().track(image, key, frame, spacing)


def test_live_cine_processes_the_newest_frame_and_counts_the_rest(pipe):
    assert frame_interval_s(CINE) == pytest.approx(0.033333)
    seg = SlowTrack(pipe)
    out = list(run_live(seg, CINE, SEGMENT_PROMPT, key_frame=0))
    key, tracked = out[0], out[1:]
    assert key.key_frame and key.frame == 0 and seg.grounds == 1
    assert seg.tracks == len(tracked)
    # every later frame is either processed or dropped, exactly once
    assert len(tracked) + tracked[-1].dropped_total == 29
    assert sum(f.dropped_before for f in tracked) == tracked[-1].dropped_total
    assert tracked[-1].frame == 29  # the newest frame is always the one processed
    assert [f.frame for f in tracked] == sorted({f.frame for f in tracked})
    # ~1 s of video at 30 frames/s against 0.25 s per frame: most frames are dropped (bounds
    # loose enough for a loaded machine, whose decoding slows the player too)
    assert 2 <= len(tracked) <= 15 and tracked[-1].dropped_total >= 14
    assert max(f.latency_ms for f in tracked) < 2500  # no backlog (it would reach 29 x 0.25 s)


def test_latest_frame_slot_counts_what_it_replaces():
    slot = LatestFrame()
    for i in range(5):
        slot.put(i)
    assert slot.take() == (4, 4)
    slot.put(5)
    slot.close()
    assert slot.take() == (5, 4) and slot.take() is None
