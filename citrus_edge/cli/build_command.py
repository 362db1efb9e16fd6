"""`citrus-edge build`: a deployable bundle for a target."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from citrus_edge.cli.cli_app import (
    EmbeddingsOption,
    _stdout,
    app,
    console,
)


@app.command("build")
def build_cmd(
    target: Annotated[str, typer.Option(help="Target name (see `citrus-edge targets`).")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write (replaced atomically).")],
    model: Annotated[
        Path | None,
        typer.Option(
            help="Citrus-V checkpoint directory, or a shipped model by name: demo, demo-lite, demo-lite-s (default: demo)."
        ),
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="Recipe name (default: the target's default).")
    ] = None,
    calib: Annotated[Path | None, typer.Option(help="Calibration manifest.")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help="Evaluation manifest.")] = None,
    eval_limit: Annotated[
        int, typer.Option(min=1, help="Eval records measured at build time.")
    ] = 90,
    budget: Annotated[
        str | None,
        typer.Option(
            help="Accuracy budget vs FP32, e.g. 'dice=1,tokens=99' (default: that; tokens=90 "
            "for recipes with a 4-bit LLM). Keys left out keep the default."
        ),
    ] = None,
    optimize: Annotated[
        str | None,
        typer.Option(
            help="latency: time each quantized component against FP32 on this CPU and keep it "
            "only where it is faster; size: the recipe exactly as named (default: latency for "
            "a CPU target's default recipe, size otherwise)."
        ),
    ] = None,
    embeddings: EmbeddingsOption = "float16",
) -> None:
    """Build a deployable bundle: export -> quantize -> engine plan -> validate -> manifest."""
    from citrus_edge.cli.bundle_build import BuildConfig, build
    from citrus_edge.defaults import resolve_model
    from citrus_edge.recipes import get_recipe
    from citrus_edge.targets import check_recipe, resolve_target

    resolution = resolve_target(target)
    tgt = resolution.target
    check_recipe(tgt, get_recipe(precision or tgt.default_recipe))  # refuse before any work
    console.print(Text(f"{resolution.describe()}, recipe {precision or tgt.default_recipe}"))
    cfg = BuildConfig(
        target=target,
        model_dir=resolve_model(model),
        recipe=precision,
        calib=calib,
        eval_data=eval_data,
        eval_limit=eval_limit,
        budget=budget,
        optimize=optimize,
        embeddings=embeddings,
    )
    cfg.optimization(tgt)  # refuses --optimize latency for a TensorRT target, before any work
    with console.status("building") as status:
        manifest = build(cfg, out, progress=lambda stage: status.update(f"build: {stage}"))
    _stdout().print(_build_table(manifest, out))


def _figure(value: float | None, spec: str) -> str:
    """A metric as the table prints it; "n/a" where the eval records had none to score (no
    segmentation answer, no count question), never a crash after the bundle is written."""
    return "n/a" if value is None else format(value, spec)


def _build_table(manifest: dict, out: Path) -> Table:
    title = f"bundle {manifest['bundle_id']} for {manifest['target']['name']} -> {out}"
    table = Table(title=Text(title))
    for col in ("component", "precision", "file", "MB"):
        table.add_column(col)
    files = manifest["files"]
    for name, comp in manifest["components"].items():
        size = files.get(comp["file"], {}).get("bytes", 0) / 1e6
        table.add_row(name, comp.get("precision", "-"), comp["file"], f"{size:.2f}")
    total = sum(f["bytes"] for f in files.values()) / 1e6
    table.add_row("total", "", f"{len(files)} files", f"{total:.2f}")
    acc = manifest.get("accuracy", {})
    if acc.get("measured"):
        m, v = acc["metrics"], acc["vs_fp32"]
        table.caption = (
            f"eval ({acc['records']} records): Dice {_figure(m.get('dice'), '.3f')}, count acc "
            f"{_figure(m.get('count_accuracy'), '.3f')}; vs FP32: token agreement "
            f"{_figure(v.get('token_agreement'), '.4f')}, "
            f"GT Dice drop {_figure(v.get('gt_dice_drop'), '+.4f')}"
        )
    else:
        table.caption = f"accuracy not measured here: {acc.get('reason')}"
    choice = manifest.get("latency_choice")
    if choice:
        e2e = choice["end_to_end_ms"]
        kept = ", ".join(
            f"{c} {t['kept']} ({t['speedup']:.2f}x)" for c, t in choice["components"].items()
        )
        table.caption += (
            f" | timed here ({choice['cpu']}): {kept}; end to end {e2e['chosen']:.1f} ms vs "
            f"fp32 {e2e['fp32']:.1f} ms (noise {choice['noise']:.0%})"
        )
    if "engine_plan" in manifest:
        table.caption += " | portable bundle: run `citrus-edge engines build` on the device"
    table.caption = Text(table.caption)
    return table
