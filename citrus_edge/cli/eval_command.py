"""`citrus-edge eval`: score a model with the PyTorch reference pipeline."""

from __future__ import annotations

import json
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


def _eval_table(summary: dict, title: str) -> Table:
    table = Table(title=Text(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("samples", summary["n"]),
        ("Dice (first mask)", summary["dice"]),
        ("detection Precision@1", summary["precision_at_1"]),
        ("lesion-count accuracy", summary["count_accuracy"]),
    ]
    by_count = summary["count_by_lesions"]
    rows += [(f"  with {n} lesion{'' if n == '1' else 's'}", v) for n, v in by_count.items()]
    rows += [("report-field accuracy", summary["report_field_accuracy"])]
    rows += [(f"  {k}", v) for k, v in summary["field_accuracy"].items()]
    for name, v in rows:
        table.add_row(name, "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
    return table


@app.command("eval")
def eval_cmd(
    model: Annotated[
        Path | None,
        typer.Option(
            help="Citrus-V checkpoint directory, or a shipped model by name: demo, demo-lite, demo-lite-s (default: demo)."
        ),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Manifest (default: the default phantom set).")
    ] = None,
    split: Annotated[str, typer.Option(help="Manifest split to evaluate.")] = "eval",
    out: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Evaluate only the first N records.")
    ] = None,
) -> None:
    """Score a model with the PyTorch reference pipeline: Dice, Precision@1, count, fields."""
    from rich.progress import Progress

    from citrus_edge.calib_data.data_manifest import read_manifest
    from citrus_edge.calib_data.phantom_set import default_phantom_manifest
    from citrus_edge.cli.evaluate import evaluate
    from citrus_edge.defaults import resolve_model
    from citrus_edge.modelling.reference import ReferencePipeline

    model_dir = resolve_model(model)
    manifest = data or default_phantom_manifest()
    records = read_manifest(manifest, split=split)[:limit]
    pipe = ReferencePipeline.from_checkpoint(model_dir)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=len(records))
        report = evaluate(
            pipe, records, manifest.parent, lambda i: progress.update(task, completed=i)
        )
    if out is not None:
        report.save(out)
    _stdout().print(_eval_table(report.summary(), f"{model_dir.name} on {manifest} [{split}]"))
    typer.echo(json.dumps(report.summary()))
