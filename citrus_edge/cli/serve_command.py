"""`citrus-edge serve`: a bundle behind a local HTTP service (the `serve` extra: FastAPI, uvicorn)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from citrus_edge.cart import serve_settings as defaults  # light: no FastAPI, no uvicorn
from citrus_edge.cli.cli_app import (
    BackendOption,
    BundleArg,
    MaxNewTokensOption,
    ProvidersOption,
    app,
    console,
)


@app.command("serve")
def serve_cmd(
    bundle: BundleArg,
    host: Annotated[
        str,
        typer.Option(help="Address to bind; anything but loopback requires --token-file."),
    ] = defaults.DEFAULT_HOST,
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = defaults.DEFAULT_PORT,
    token_file: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False,
            help="File holding the bearer token every request must then carry "
            "(Authorization: Bearer <token>).",
        ),
    ] = None,
    max_request_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body accepted (413 above).")
    ] = defaults.DEFAULT_MAX_REQUEST_BYTES,
    timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds one request may wait + run (504 past it).")
    ] = defaults.DEFAULT_TIMEOUT_S,
    queue_size: Annotated[
        int, typer.Option(min=0, help="Requests waiting behind the running one (503 past it).")
    ] = defaults.DEFAULT_QUEUE_SIZE,
    session_idle_s: Annotated[
        float, typer.Option(min=0.001, help="Seconds without a frame before a session closes.")
    ] = defaults.DEFAULT_SESSION_IDLE_S,
    max_sessions: Annotated[
        int, typer.Option(min=1, help="Open video sessions at most.")
    ] = defaults.DEFAULT_MAX_SESSIONS,
    backend: BackendOption = "onnxruntime",
    provider: ProvidersOption = None,
    max_new_tokens: MaxNewTokensOption = 96,
) -> None:
    """Serve a bundle over HTTP: /v1/health, /v1/ready, /v1/info, /v1/ground, /v1/sessions.

    The settings are checked before anything loads; the bundle then loads (sha256 verified)
    while the server already answers /v1/health, and /v1/ready turns 200 when it is done.
    Stop with Ctrl-C.
    """
    from citrus_edge.cart.serve_settings import ServeConfig, read_token
    from citrus_edge.cart.service import serve

    config = ServeConfig(
        host=host,
        port=port,
        token=None if token_file is None else read_token(token_file),
        max_request_bytes=max_request_bytes,
        timeout_s=timeout,
        queue_size=queue_size,
        session_idle_s=session_idle_s,
        max_sessions=max_sessions,
    )

    def load():
        from citrus_edge.runtime import Pipeline

        return Pipeline.from_bundle(
            bundle, backend=backend, providers=provider, max_new_tokens=max_new_tokens
        )

    logging.getLogger("citrus_edge.cart").setLevel(logging.INFO)  # access lines, load, expiry
    token = "bearer token required" if config.token else "no token (loopback only)"
    console.print(Text(f"serving {bundle} on http://{host}:{port} ({token})"))
    serve(load, config)
