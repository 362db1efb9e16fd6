"""`citrus-edge export`: the four ONNX graphs of a checkpoint, validated."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from citrus_edge.cli.cli_app import (
    _stdout,
    app,
    console,
)


def _parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise typer.BadParameter(f"{text!r}: expected HEIGHTxWIDTH, e.g. 224x224") from e
    return h, w


@app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Option(help="Directory to create with the ONNX graphs.")],
    model: Annotated[
        Path | None,
        typer.Option(
            help="Citrus-V checkpoint directory, or a shipped model by name: demo, demo-lite, demo-lite-s (default: demo)."
        ),
    ] = None,
    image_size: Annotated[
        list[str] | None,
        typer.Option(help="HEIGHTxWIDTH the vision graph is validated at (repeatable)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier export at --out.")] = False,
) -> None:
    """Export the four ONNX graphs (vision, LLM step, SAM2 encoder, mask decoder), validated."""
    import time

    from citrus_edge.defaults import resolve_model
    from citrus_edge.export.export_manifest import check_export_out, checkpoint_source_hash

    # Refuse a wrong --out, a bad size or a missing model before torch is imported.
    check_export_out(out, overwrite)
    sizes = [_parse_hw(s) for s in image_size] if image_size else None
    model_dir = resolve_model(model)

    from citrus_edge.export.export_run import DEFAULT_IMAGE_SIZES, export_all
    from citrus_edge.modelling.checkpoint import load_checkpoint

    sizes = sizes or list(DEFAULT_IMAGE_SIZES)
    t0 = time.perf_counter()
    with console.status(f"exporting {model_dir.name}"):
        manifest = export_all(
            load_checkpoint(model_dir),
            out,
            sizes,
            source_hash=checkpoint_source_hash(model_dir),
            tokenizer_json=model_dir / "tokenizer.json",
            overwrite=overwrite,
        )
    table = Table(
        title=Text(f"export of {model_dir.name} -> {out} ({time.perf_counter() - t0:.1f} s)")
    )
    for col in ("graph", "file", "max abs error vs PyTorch", "max rel error", "seconds"):
        table.add_column(col)
    for name, g in manifest["graphs"].items():
        table.add_row(
            name,
            g["file"],
            f"{g['max_abs_error']:.2e}",
            f"{g['max_rel_error']:.2e}",
            f"{g['seconds']}",
        )
    _stdout().print(table)
