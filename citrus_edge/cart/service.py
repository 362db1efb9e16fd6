"""`citrus-edge serve BUNDLE`: the local HTTP service a cart's software talks to (FastAPI, uvicorn).

Endpoints (JSON; errors are `{"error": {"type", "message", "status"}}`, see `service_errors`):
- `GET /v1/health`: the process answers (200 while it runs, even while the bundle loads);
- `GET /v1/ready`: 200 once the bundle is loaded and its files' sha256 verified, else 503;
- `GET /v1/info`: bundle id, model, target, precision per component, backend, versions, limits;
- `POST /v1/ground`: an image and `prompt` or `task` (see `uploads`) -> the result JSON that
  `citrus-edge run` writes (`runtime.result_files.result_to_dict`), except `input`: `path` is
  null (an upload has none) and `sha256` is that of the bytes sent. With `dicom=1` (DICOM
  input only) the answer is instead an `application/zip` of `result.json` (that JSON),
  `seg.dcm` (the DICOM Segmentation, when the answer has a mask) and `sr.dcm` (the TID 1500
  Structured Report), made by `dicom_out`, for the PACS;
- `POST /v1/sessions`: a key frame and `prompt`/`task`: the whole model runs once and the
  session keeps the `[SEG]` states (201; 422 `NothingToTrackError` when the answer has none);
- `POST /v1/sessions/{id}/frames`: one frame, SAM2 only, drop-to-keep-up (see `sessions`);
- `GET /v1/sessions/{id}`: the session's counts; `DELETE /v1/sessions/{id}` closes it.

Sessions idle for `--session-idle-s` seconds (default 120 s, `DEFAULT_SESSION_IDLE_S`) close.

Every pipeline call goes through one bounded queue (`work_queue`): 503 with Retry-After when it
is full, 504 past `--timeout`. The bundle loads in the background once the server listens, so
`/v1/health` answers at once and `/v1/ready` turns 200 when loading is done; a bundle that fails
to load stops the server, and `serve` raises the loader's typed error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import platform
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from citrus_edge.runtime.result_files import result_to_dict

from .http_guard import HttpGuard
from .serve_settings import ServeConfig
from .service_errors import (
    FeatureUnavailableError,
    NothingToTrackError,
    NotReadyError,
    RequestInputError,
    ServiceBusyError,
    UnauthorizedError,
    error_body,
    status_of,
)
from .sessions import Session, SessionTable
from .uploads import ImageUpload, parse_flag, prompt_of, read_request
from .work_queue import PipelineQueue

log = logging.getLogger(__name__)

API_VERSION = 1
FRAME_FIELDS = ("image", "shape", "spacing", "frame")
SWEEP_EVERY_S = 5.0  # how often idle sessions are looked for (also on every session request)


@dataclass
class ServiceState:
    """What the routes share: the pipeline (None until loaded), its queue, the sessions."""

    config: ServeConfig
    queue: PipelineQueue
    sessions: SessionTable
    pipeline: Any = None
    load_error: BaseException | None = None
    started: float = field(default_factory=time.monotonic)

    def ready_pipeline(self) -> Any:
        if self.pipeline is None:
            why = "failed to load" if self.load_error else "is still loading"
            raise NotReadyError(f"the bundle {why}; GET /v1/ready says when it is ready", 1)
        return self.pipeline


@dataclass
class Service:
    """The ASGI application to hand to uvicorn, and its state (for tests and `serve`)."""

    app: Any
    state: ServiceState


def build_service(
    load: Callable[[], Any],
    config: ServeConfig,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> Service:
    """The service around the pipeline `load()` returns (called once, in a worker thread, when
    the server starts). `on_load_error` is told when it raises (`serve` stops the server)."""
    state = ServiceState(
        config,
        PipelineQueue(config.queue_size, config.timeout_s),
        SessionTable(config.session_idle_s, config.max_sessions),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        loader = asyncio.create_task(_load(state, load, on_load_error))
        sweeper = asyncio.create_task(_sweep(state.sessions))
        try:
            yield
        finally:
            sweeper.cancel()
            loader.cancel()
            state.queue.close()

    app = FastAPI(title="citrus-edge", version=str(API_VERSION), lifespan=lifespan)
    _routes(app, state)
    return Service(HttpGuard(app, config.token, config.max_request_bytes), state)


async def _load(
    state: ServiceState,
    load: Callable[[], Any],
    on_load_error: Callable[[BaseException], None] | None,
) -> None:
    t0 = time.perf_counter()
    try:
        state.pipeline = await asyncio.to_thread(load)
    except Exception as e:
        state.load_error = e
        log.error("the bundle failed to load: %s", type(e).__name__)
        if on_load_error is not None:
            on_load_error(e)
        return
    log.info(
        "bundle %s ready in %.0f ms", state.pipeline.bundle_id, (time.perf_counter() - t0) * 1e3
    )


async def _sweep(sessions: SessionTable) -> None:
    while True:
        await asyncio.sleep(min(SWEEP_EVERY_S, sessions.idle_s / 2))
        sessions.expire()


def error_response(error: BaseException) -> JSONResponse:
    """The typed JSON answer of `error`; an unexpected error is logged by type, and the client
    is told its type only (its message may quote input)."""
    status = status_of(error)
    headers: dict[str, str] = {}
    if isinstance(error, ServiceBusyError):
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    if status >= 500 and not hasattr(error, "status"):  # unexpected: its text may quote input
        frames = "".join(traceback.format_tb(error.__traceback__))  # where, not the message
        log.error("internal error %s; traceback:\n%s", type(error).__name__, frames)
        body = error_body(error, f"internal error ({type(error).__name__}); see the service log")
    else:
        body = error_body(error)
    body.update(getattr(error, "extra", {}))
    return JSONResponse(body, status_code=status, headers=headers)


def _answers_errors(route: Callable) -> Callable:
    """Turn any exception of a route into its typed JSON error answer."""

    @functools.wraps(route)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return await route(*args, **kwargs)
        except Exception as e:
            return error_response(e)

    return wrapped


def upload_result(result: Any, upload: ImageUpload) -> dict[str, Any]:
    """`run`'s result JSON for an uploaded image: no path, the sha256 of the bytes sent."""
    body = result_to_dict(result)
    body["input"] = {"path": None, "sha256": upload.sha256, "frame": upload.frame}
    return body


def dicom_source(upload: ImageUpload) -> Any:
    """The sent DICOM's dataset, for `dicom=1`; refused before any pipeline work when the
    input is not DICOM or highdicom is not installed."""
    from .dicom_out import MissingExtraError, NotDicomSourceError, require_extra

    try:
        require_extra("highdicom")
    except MissingExtraError as e:
        raise FeatureUnavailableError(f"dicom=1: {e}") from None
    source = upload.dicom_dataset()
    if source is None:
        raise NotDicomSourceError(
            f"{upload.name}: dicom=1 needs a DICOM input (a SEG and an SR are filed under its "
            "patient and study); PNG, JPEG and raw pixels get the JSON result only"
        )
    return source


def dicom_zip(source: Any, result: Any, body: dict[str, Any], frame: int) -> bytes:
    """A zip of `result.json` (the JSON answer), `seg.dcm` (when the answer has a mask) and
    `sr.dcm`, made by `dicom_out` for frame `frame` of `source`."""
    from .dicom_out import SEG_NAME, SR_NAME, dicom_report, dicom_results

    if result.masks:
        seg, sr = dicom_results(source, result, result.bundle_id, frame)
        parts = [(SEG_NAME, seg), (SR_NAME, sr)]
    else:
        parts = [(SR_NAME, dicom_report(source, result, result.bundle_id, frame))]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("result.json", json.dumps(body, indent=1))
        for name, ds in parts:
            data = io.BytesIO()
            ds.save_as(data, enforce_file_format=True)
            z.writestr(name, data.getvalue())
    return buf.getvalue()


def info(state: ServiceState) -> dict[str, Any]:
    """`/v1/info`: what is being served, read from the bundle manifest."""
    import fastapi
    import uvicorn

    import citrus_edge

    pipe = state.ready_pipeline()
    manifest = pipe.artifacts.bundle.manifest
    recipe = manifest.get("recipe") or {}
    return {
        "api": API_VERSION,
        "bundle_id": pipe.bundle_id,
        "model": {"name": pipe.model_config.name, **(manifest.get("model") or {})},
        "target": (manifest.get("target") or {}).get("name"),
        "precision": {
            "recipe": recipe.get("name"),
            "components": {k: v.get("precision") for k, v in pipe.artifacts.components.items()},
        },
        "backend": pipe.backend.label,
        "versions": {
            "bundle": manifest.get("versions", {}),
            "service": {
                "citrus-edge": citrus_edge.__version__,
                "python": platform.python_version(),
                "fastapi": fastapi.__version__,
                "uvicorn": uvicorn.__version__,
            },
        },
        "limits": {k: v for k, v in state.config.to_dict().items() if k not in ("host", "port")},
    }


def _routes(app: FastAPI, state: ServiceState) -> None:
    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "alive", "uptime_s": round(time.monotonic() - state.started, 3)}

    @app.get("/v1/ready")
    async def ready() -> JSONResponse:
        if state.pipeline is None:
            error = state.load_error or NotReadyError("the bundle is still loading", 1)
            body = {"ready": False, **error_body(error)}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
        pipe = state.pipeline
        return JSONResponse(
            {
                "ready": True,
                "bundle_id": pipe.bundle_id,
                "verified": bool(pipe.config.verify_bundle),
                "load_ms": {k: round(v, 3) for k, v in pipe.load_ms.items()},
            }
        )

    @app.get("/v1/info")
    @_answers_errors
    async def get_info() -> JSONResponse:
        return JSONResponse(info(state))

    @app.post("/v1/ground")
    @_answers_errors
    async def ground(request: Request) -> Response:
        pipe = state.ready_pipeline()
        parsed = await read_request(request)
        prompt = prompt_of(parsed.fields)
        upload = parsed.upload
        source = dicom_source(upload) if parse_flag(parsed.fields, "dicom") else None

        def job() -> dict[str, Any] | bytes:
            image, spacing = upload.load()
            result = pipe.ground(image, prompt, spacing=spacing).result
            body = upload_result(result, upload)
            return body if source is None else dicom_zip(source, result, body, upload.frame)

        answer = await state.queue.run(job, f"POST /v1/ground ({upload.name})")
        if isinstance(answer, bytes):
            disposition = 'attachment; filename="citrus-edge-result.zip"'
            headers = {"Content-Disposition": disposition}
            return Response(answer, media_type="application/zip", headers=headers)
        return JSONResponse(answer)

    @app.post("/v1/sessions")
    @_answers_errors
    async def open_session(request: Request) -> JSONResponse:
        pipe = state.ready_pipeline()
        parsed = await read_request(request)
        prompt = prompt_of(parsed.fields)
        upload = parsed.upload

        def job() -> tuple[Any, dict[str, Any]]:
            image, spacing = upload.load()
            key = pipe.ground(image, prompt, spacing=spacing)
            return key, upload_result(key.result, upload)

        key, result = await state.queue.run(job, f"POST /v1/sessions ({upload.name})")
        if len(key.seg_hidden) == 0:
            error = NothingToTrackError(
                f"{upload.name}: the key frame's answer has no [SEG] token, so there is no mask "
                "to follow; send another key frame or a segmentation prompt (task=segment)"
            )
            error.extra = {"result": result}
            raise error
        session = state.sessions.open(key, prompt)
        body = {
            "session": session.id,
            "frame": 0,
            "status": "processed",
            "idle_expiry_s": state.sessions.idle_s,
            "stats": session.stats(state.sessions.idle_s),
            "result": result,
        }
        return JSONResponse(body, status_code=201, headers={"Location": _where(session)})

    @app.post("/v1/sessions/{session_id}/frames")
    @_answers_errors
    async def post_frame(session_id: str, request: Request) -> JSONResponse:
        pipe = state.ready_pipeline()
        session = state.sessions.get(session_id)
        parsed = await read_request(request)
        extra = sorted(set(parsed.fields) - set(FRAME_FIELDS))
        if extra:
            raise RequestInputError(
                f"{extra} not taken by a session's frames: the prompt is the key frame's; open "
                "a new session to change it"
            )

        async def track(s: Session, upload: ImageUpload) -> tuple[dict[str, Any], float]:
            def job() -> tuple[dict[str, Any], float]:
                t0 = time.perf_counter()
                image, spacing = upload.load()
                result = pipe.track(image, s.key, spacing=spacing)
                return upload_result(result, upload), (time.perf_counter() - t0) * 1e3

            return await state.queue.run(job, f"POST {_where(s)}/frames ({upload.name})")

        return JSONResponse(await state.sessions.submit(session, parsed.upload, track))

    @app.get("/v1/sessions/{session_id}")
    @_answers_errors
    async def get_session(session_id: str) -> JSONResponse:
        session = state.sessions.get(session_id)
        return JSONResponse({"session": session.id, "stats": session.stats(state.sessions.idle_s)})

    @app.delete("/v1/sessions/{session_id}")
    @_answers_errors
    async def close_session(session_id: str) -> JSONResponse:
        session = state.sessions.close(session_id)
        stats = session.stats(state.sessions.idle_s)
        return JSONResponse({"session": session.id, "closed": True, "stats": stats})


def _where(session: Session) -> str:
    return f"/v1/sessions/{session.id}"


def serve(load: Callable[[], Any], config: ServeConfig) -> None:
    """Run the service on `config.host:config.port` until interrupted (blocks).

    Raises the loader's error when the bundle fails to load (the server stops first).
    """
    import uvicorn

    server: list[uvicorn.Server] = []

    def stop(_error: BaseException) -> None:
        server[0].should_exit = True

    service = build_service(load, config, on_load_error=stop)
    server.append(uvicorn.Server(uvicorn_config(service.app, config.host, config.port)))
    server[0].run()
    if service.state.load_error is not None:
        raise service.state.load_error


def uvicorn_config(app: Any, host: str, port: int) -> Any:
    """uvicorn's settings for the service: no access log of its own (`http_guard` writes one
    without query strings), the process's logging left as configured."""
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, access_log=False, log_config=None, lifespan="on"
    )
