"""`citrus-edge listen`: a DICOM receiver (C-STORE SCP) that grounds what it is sent and forwards
SEG + SR to a destination AE (`citrus_edge.cart.scp`)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from citrus_edge.cli.cli_app import (
    BackendOption,
    BundleArg,
    MaxNewTokensOption,
    ProvidersOption,
    app,
)

log = logging.getLogger(__name__)


@app.command("listen")
def listen_cmd(
    bundle: BundleArg,
    forward: Annotated[
        str,
        typer.Option(help="Destination AE for SEG + SR, HOST:PORT:AE_TITLE (e.g. a PACS)."),
    ],
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 11112,
    ae_title: Annotated[str, typer.Option(help="This receiver's AE title.")] = "CITRUS_EDGE",
    host: Annotated[
        str,
        typer.Option(help="Address to bind; DICOM has no login, so keep loopback unless needed."),
    ] = "127.0.0.1",
    task: Annotated[
        str | None,
        typer.Option(
            help="segment, detect or report: the task's standard prompt [default: segment]."
        ),
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="Own prompt (instead of --task).")] = None,
    frame: Annotated[int, typer.Option(min=0, help="Frame grounded in a multi-frame image.")] = 0,
    backend: BackendOption = "onnxruntime",
    provider: ProvidersOption = None,
    max_new_tokens: MaxNewTokensOption = 96,
) -> None:
    """Receive ultrasound images by C-STORE, ground each with one prompt, and send the results
    (DICOM Segmentation when there is a mask, TID 1500 SR always) to --forward.

    A failed grounding answers that C-STORE with a failure status and logs one line without
    patient data; the receiver keeps running until interrupted.
    """
    from citrus_edge.cart.dicom_out import require_extra

    require_extra("highdicom", "pynetdicom")
    from citrus_edge.cart.scp import Destination, check_ae_title, serve_dicom

    question = _prompt(task, prompt)
    destination = Destination.parse(forward)
    check_ae_title(ae_title)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines name source UIDs
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s: any host that reaches it can send images", host)
    typer.echo(
        f"listening as {ae_title} on {host}:{port}; forwarding to {destination.ae_title} at "
        f"{destination.host}:{destination.port}",
        err=True,
    )
    serve_dicom(
        bundle,
        question,
        destination,
        host=host,
        port=port,
        ae_title=ae_title,
        frame=frame,
        backend=backend,
        providers=provider,
        max_new_tokens=max_new_tokens,
    )


def _prompt(task: str | None, prompt: str | None) -> str:
    """The prompt of --prompt or --task (not both; neither: the segment task's)."""
    from citrus_edge.tasks import PROMPTS

    if task is not None and prompt is not None:
        raise typer.BadParameter("give --task or --prompt, not both")
    if prompt is not None:
        return prompt
    task = task or "segment"
    if task not in PROMPTS:
        raise typer.BadParameter(f"--task {task!r} is not one of {', '.join(PROMPTS)}")
    return PROMPTS[task]
