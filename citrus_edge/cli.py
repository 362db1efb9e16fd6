"""The `citrus-edge` command line. Thin: parse, build a config, call one library function.

Every stage is imported inside the command that needs it, so `citrus-edge --help` stays fast
and never imports torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from citrus_edge import __version__

app = typer.Typer(
    name="citrus-edge",
    help="Compress, export and run the Citrus-V grounding VLM at the edge.",
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Calibration and evaluation data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
engines_app = typer.Typer(
    help="TensorRT engines, compiled on the target device.", no_args_is_help=True
)
app.add_typer(engines_app, name="engines")
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"citrus-edge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """citrus-edge: build, evaluate and run Citrus-V bundles for Jetson, x86 GPUs and CPU."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


@data_app.command("phantoms")
def data_phantoms(
    out: Annotated[Path, typer.Option(help="Output directory (must be new or empty).")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 600,
    seed: Annotated[int, typer.Option(help="Base seed; the same seed gives identical files.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a set written here before.")] = False,
) -> None:
    """Write a phantom set: DICOM US images, masks, labels and manifest.jsonl."""
    from citrus_edge.calib_data.phantom_set import write_phantom_set

    with console.status(f"generating {n} phantoms"):
        manifest = write_phantom_set(out, n, seed, overwrite=overwrite)
    typer.echo(str(manifest))


def _eval_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("samples", summary["n"]),
        ("Dice (first mask)", summary["dice"]),
        ("detection Precision@1", summary["precision_at_1"]),
        ("lesion-count accuracy", summary["count_accuracy"]),
        ("report-field accuracy", summary["report_field_accuracy"]),
    ] + [(f"  {k}", v) for k, v in summary["field_accuracy"].items()]
    for name, v in rows:
        table.add_row(name, "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
    return table


@app.command("eval")
def eval_cmd(
    model: Annotated[
        Path | None,
        typer.Option(help="Citrus-V checkpoint directory (default: the demo model)."),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Manifest (default: the default phantom set).")
    ] = None,
    split: Annotated[str, typer.Option(help="Manifest split to evaluate.")] = "eval",
    out: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N records.")] = None,
) -> None:
    """Score a model with the PyTorch reference pipeline: Dice, Precision@1, count, fields."""
    from rich.progress import Progress

    from citrus_edge.calib_data.manifest import read_manifest
    from citrus_edge.defaults import default_phantom_manifest, resolve_model
    from citrus_edge.evaluate import evaluate
    from citrus_edge.reference import ReferencePipeline

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
    Console().print(_eval_table(report.summary(), f"{model_dir.name} on {manifest} [{split}]"))
    typer.echo(json.dumps(report.summary()))


@app.command("plan")
def plan_cmd(
    target: Annotated[str, typer.Option(help="Target name, e.g. orin-nano-8 (see `targets`).")],
    model: Annotated[
        str, typer.Option(help="Preset name (citrus-v-8b, citrus-v-demo) or checkpoint directory.")
    ] = "citrus-v-8b",
    precision: Annotated[
        str | None, typer.Option(help="Recipe name (default: the target's default recipe).")
    ] = None,
    context: Annotated[int, typer.Option(help="KV-cache length in tokens.")] = 2048,
) -> None:
    """Memory table and decode-speed bound of a model on a target, from dimensions only."""
    from citrus_edge.config import PRESETS, CitrusVConfig
    from citrus_edge.plan import plan, plan_summary, plan_table
    from citrus_edge.recipes import get_recipe
    from citrus_edge.targets import get_target

    cfg = PRESETS[model] if model in PRESETS else CitrusVConfig.load(Path(model) / "config.json")
    tgt = get_target(target)
    p = plan(cfg, tgt, get_recipe(precision or tgt.default_recipe), context_tokens=context)
    headers, rows = plan_table(p)
    table = Table(title=f"{cfg.name} on {tgt.name} ({precision or tgt.default_recipe})")
    for h in headers:
        table.add_column(h, justify="left" if h == headers[0] else "right")
    for r in rows:
        table.add_row(*r)
    out = Console()
    out.print(table)
    for line in plan_summary(p):
        out.print(line)


@app.command("targets")
def targets_cmd() -> None:
    """The targets table: GPU, memory, bandwidth, precisions, DLA, default recipe."""
    from citrus_edge.targets import TARGETS

    table = Table(title="targets")
    for col in ("name", "gpu", "SM", "memory GB", "GB/s", "precisions", "DLA", "default recipe"):
        table.add_column(col)
    for t in TARGETS.values():
        bw = "unknown" if t.bandwidth_gbs is None else f"{t.bandwidth_gbs:g}"
        table.add_row(
            t.name,
            t.gpu,
            t.sm or "-",
            f"{t.memory_gb:g}",
            bw,
            ",".join(sorted(t.precisions)),
            str(t.dla_cores),
            t.default_recipe,
        )
    Console().print(table)


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
        Path | None, typer.Option(help="Citrus-V checkpoint directory (default: the demo model).")
    ] = None,
    image_size: Annotated[
        list[str] | None,
        typer.Option(help="HEIGHTxWIDTH the vision graph is validated at (repeatable)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier export at --out.")] = False,
) -> None:
    """Export the four ONNX graphs (vision, LLM step, SAM2 encoder, mask decoder), validated."""
    import time

    from citrus_edge.checkpoint import load_checkpoint
    from citrus_edge.defaults import resolve_model
    from citrus_edge.export.manifest import checkpoint_source_hash
    from citrus_edge.export.pipeline import DEFAULT_IMAGE_SIZES, export_all

    model_dir = resolve_model(model)
    sizes = [_parse_hw(s) for s in image_size] if image_size else list(DEFAULT_IMAGE_SIZES)
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
    table = Table(title=f"export of {model_dir.name} -> {out} ({time.perf_counter() - t0:.1f} s)")
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
    Console().print(table)


@engines_app.command("build")
def engines_build(
    bundle: Annotated[Path, typer.Argument(help="A portable bundle from `citrus-edge build`.")],
    target: Annotated[
        str | None, typer.Option(help="Target to compile for (default: the bundle's plan).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Engine directory (default: <bundle>-engines/<target>).")
    ] = None,
    recipe: Annotated[str | None, typer.Option(help="Recipe, if the bundle has no plan.")] = None,
) -> None:
    """Compile a bundle's engine plan with TensorRT on this device (needs the target's GPU)."""
    from citrus_edge.engines import build_bundle_engines

    with console.status("building TensorRT engines"):
        built = build_bundle_engines(bundle, target, out, recipe=recipe)
    for name, path in built.engines.items():
        typer.echo(f"{name}: {path}")
