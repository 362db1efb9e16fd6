"""`citrus-edge data phantoms`: the phantom calibration and evaluation set."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from citrus_edge.cli.cli_app import (
    console,
    data_app,
)


class Screen(str, Enum):
    """What the ultrasound images look like: a clean fan, a scanner's screen, or a mix."""

    clean = "clean"
    real = "real"
    mix = "mix"


class MixOptionError(ValueError):
    """A mix fraction outside [0, 1], or --screen-fraction without --screen mix."""


def screen_fraction(screen: Screen, fraction: float | None) -> float:
    """The share of screen-like ultrasound images `--screen` and `--screen-fraction` ask for."""
    if fraction is not None and screen is not Screen.mix:
        raise MixOptionError(f"--screen-fraction is for --screen mix, not --screen {screen.value}")
    if fraction is not None and not 0 <= fraction <= 1:
        raise MixOptionError(f"--screen-fraction must be in [0, 1], got {fraction}")
    return {Screen.clean: 0.0, Screen.real: 1.0}.get(screen, 0.5 if fraction is None else fraction)


@data_app.command("phantoms")
def data_phantoms(
    out: Annotated[Path, typer.Option(help="Output directory (must be new or empty).")],
    n: Annotated[int, typer.Option(min=1, help="Number of images.")] = 600,
    seed: Annotated[int, typer.Option(help="Base seed; the same seed gives identical files.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a set written here before.")] = False,
    screen: Annotated[
        Screen,
        typer.Option(
            help="clean: a fan on black (the default, unchanged); real: every ultrasound image "
            "drawn as a scanner's screen (banner, scales, calipers, Doppler, dual panes, "
            "curvilinear/linear/phased, JPEG); mix: a share of them (--screen-fraction)."
        ),
    ] = Screen.clean,
    screen_fraction_: Annotated[
        float | None,
        typer.Option("--screen-fraction", help="Share of screen-like images for --screen mix."),
    ] = None,
    non_us: Annotated[
        float,
        typer.Option(
            "--non-us",
            help="Share of images that are not ultrasound (pydicom's CT/MR/... test images and "
            "procedural pictures), every task answered 'This is not an ultrasound image.'",
        ),
    ] = 0.0,
) -> None:
    """Write a phantom set: DICOM US images, masks, labels and manifest.jsonl."""
    from citrus_edge.calib_data.phantom_set import write_phantom_set

    share = screen_fraction(screen, screen_fraction_)
    if not 0 <= non_us <= 1:
        raise MixOptionError(f"--non-us must be in [0, 1], got {non_us}")
    with console.status(f"generating {n} phantoms"):
        manifest = write_phantom_set(out, n, seed, overwrite=overwrite, screen=share, non_us=non_us)
    typer.echo(str(manifest))
