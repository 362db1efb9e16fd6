"""`citrus-edge quantize`: post-training quantization with an accuracy budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from citrus_edge.cli.cli_app import (
    EmbeddingsOption,
    _cell,
    _stdout,
    app,
    console,
)


@app.command("quantize")
def quantize_cmd(
    export_dir: Annotated[
        Path,
        typer.Argument(
            exists=True, file_okay=False, help="An FP32 export from `citrus-edge export`."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Directory for the quantized graphs.")],
    precision: Annotated[
        str, typer.Option(help="Recipe name, e.g. int8, int8-w4, fp8 (see `recipes`).")
    ] = "int8",
    target: Annotated[str, typer.Option(help="Target name (see `citrus-edge targets`).")] = "cpu",
    calib: Annotated[Path | None, typer.Option(help="Calibration manifest.")] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            help="Accuracy budget vs FP32, e.g. 'dice=1,tokens=99' (default: that; tokens=90 "
            "for recipes with a 4-bit LLM). Keys left out keep the default."
        ),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="Calibration: minmax, entropy or percentile.")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Float checkpoint (TensorRT LLM int8/fp8 path).")
    ] = None,
    embeddings: EmbeddingsOption = "float16",
) -> None:
    """Post-training quantization with an accuracy budget; per-component table at the end."""
    from rich.progress import Progress

    from citrus_edge.compress.budget import default_budget, parse_budget
    from citrus_edge.compress.quantize import quantize
    from citrus_edge.compress.settings import QuantizeConfig
    from citrus_edge.recipes import get_recipe

    base = default_budget(get_recipe(precision).llm)
    config = QuantizeConfig(embeddings_dtype=embeddings)  # refuses a bad value before any work

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("quantize", total=None)

        def progress(ev) -> None:
            bar.update(
                task, description=f"{ev.stage} {ev.message}", completed=ev.done, total=ev.total
            )

        report = quantize(
            export_dir,
            precision,
            target,
            calib_manifest=calib,
            budget=parse_budget(budget, base) if budget else base,
            out_dir=out,
            method=method,
            config=config,
            checkpoint=checkpoint,
            progress=progress,
        )
    header, *rows = report.rows()
    table = Table(title=Text(f"{report.recipe['name']} for {report.target} -> {out}"))
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*map(_cell, r))
    m = report.measured or {}
    table.caption = (
        f"graph bytes x{report.size_ratio:.3f}, bundle payload x{report.payload_ratio:.3f} of "
        "FP32; vs FP32: "
    ) + ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in m.items()
        if not isinstance(v, dict | list)
    )
    _stdout().print(table)
