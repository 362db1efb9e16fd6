"""`citrus-edge data phantoms`: the phantom calibration and evaluation set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from citrus_edge.cli.cli_app import (
    console,
    data_app,
)


@data_app.command("phantoms")
def data_phantoms(
    out: Annotated[Path, typer.Option(help="Output directory (must be new or empty).")],
    n: Annotated[int, typer.Option(min=1, help="Number of images.")] = 600,
    seed: Annotated[int, typer.Option(help="Base seed; the same seed gives identical files.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a set written here before.")] = False,
) -> None:
    """Write a phantom set: DICOM US images, masks, labels and manifest.jsonl."""
    from citrus_edge.calib_data.phantom_set import write_phantom_set

    with console.status(f"generating {n} phantoms"):
        manifest = write_phantom_set(out, n, seed, overwrite=overwrite)
    typer.echo(str(manifest))
