"""`citrus-edge engines build`: compile a bundle's engine plan on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from citrus_edge.cli.cli_app import (
    console,
    engines_app,
)


@engines_app.command("build")
def engines_build(
    bundle: Annotated[
        Path,
        typer.Argument(
            exists=True, file_okay=False, help="A portable bundle from `citrus-edge build`."
        ),
    ],
    target: Annotated[
        str | None, typer.Option(help="Target to compile for (default: the bundle's plan).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Engine directory (default: <bundle>-engines/<target>).")
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="Recipe (see `recipes`), if the bundle has no plan.")
    ] = None,
) -> None:
    """Compile a bundle's engine plan with TensorRT on this device (needs the target's GPU)."""
    from citrus_edge.engines import build_bundle_engines

    with console.status("building TensorRT engines"):
        built = build_bundle_engines(bundle, target, out, recipe=precision)
    for name, path in built.engines.items():
        typer.echo(f"{name}: {path}")
