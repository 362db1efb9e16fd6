"""`citrus-edge plan`, `targets` and `recipes`: what fits where, from dimensions only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from citrus_edge.cli.cli_app import (
    EXIT_DOES_NOT_FIT,
    EmbeddingsOption,
    JsonFlag,
    _cell,
    _print_json,
    _stdout,
    app,
)


@app.command("plan")
def plan_cmd(
    target: Annotated[str, typer.Option(help="Target name, e.g. orin-nano-8 (see `targets`).")],
    model: Annotated[
        str, typer.Option(help="Preset name (citrus-v-8b, citrus-v-demo) or checkpoint directory.")
    ] = "citrus-v-8b",
    precision: Annotated[
        str | None, typer.Option(help="Recipe name (default: the target's default recipe).")
    ] = None,
    context: Annotated[
        int | None,
        typer.Option(
            min=1, help="KV-cache length in tokens [default: 2048, or the model's maximum]."
        ),
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            help="Plan the student of the model cut by this spec or preset (see `distill`), "
            "e.g. 8b-half-layers."
        ),
    ] = None,
    embeddings: EmbeddingsOption = "float16",
    as_json: JsonFlag = False,
) -> None:
    """Memory table and decode-speed bound of a model on a target, from dimensions only.

    Exits with code 3 when the model does not fit the target's memory (scripts can branch).
    """
    from citrus_edge.cli.memory_plan import plan, plan_summary, plan_table
    from citrus_edge.compress.student_spec import StudentSpec, student_config
    from citrus_edge.config import PRESETS, CitrusVConfig
    from citrus_edge.host_inputs import check_table_dtype
    from citrus_edge.recipes import get_recipe
    from citrus_edge.targets import get_target

    cfg = PRESETS[model] if model in PRESETS else CitrusVConfig.load(Path(model) / "config.json")
    if student is not None:
        cfg = student_config(cfg, StudentSpec.parse(student))
    tgt = get_target(target)
    check_table_dtype(embeddings, "--embeddings")
    recipe = get_recipe(precision or tgt.default_recipe)
    p = plan(cfg, tgt, recipe, context_tokens=context, embeddings=embeddings)
    if as_json:
        _print_json(p.to_dict())
    else:
        headers, rows = plan_table(p)
        table = Table(title=Text(f"{cfg.name} on {tgt.name} ({precision or tgt.default_recipe})"))
        for h in headers:
            table.add_column(h, justify="left" if h == headers[0] else "right")
        for r in rows:
            table.add_row(*map(_cell, r))
        out = _stdout()
        out.print(table)
        for line in plan_summary(p):
            out.print(Text(line))
    if not p.fits:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


@app.command("targets")
def targets_cmd(as_json: JsonFlag = False) -> None:
    """The targets table: GPU, memory, bandwidth, precisions, DLA, default recipe."""
    from citrus_edge.targets import TARGETS, family_lines

    if as_json:
        _print_json([t.to_dict() for t in TARGETS.values()])
        return
    table = Table(title="targets")
    # The names are what users type: never truncated, whatever the terminal width.
    width = max(len(name) for name in TARGETS)
    table.add_column("name", no_wrap=True, min_width=width)
    for col in ("gpu", "SM", "memory GB", "GB/s", "precisions", "DLA"):
        table.add_column(col, overflow="fold")
    table.add_column("default recipe", no_wrap=True)
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
    out = _stdout()
    out.print(table)
    out.print(Text("Family names (what `--target` also takes):"))
    for line in family_lines():
        out.print(Text(f"  {line}"))


@app.command("recipes")
def recipes_cmd(as_json: JsonFlag = False) -> None:
    """The precision recipes (one precision per component) and the targets that run each."""
    from citrus_edge.recipes import RECIPES
    from citrus_edge.targets import TARGETS, check_recipe

    def runs_on(recipe) -> list[str]:
        names = []
        for t in TARGETS.values():
            try:
                check_recipe(t, recipe)
            except ValueError:
                continue
            names.append(t.name)
        return names

    rows = [{**r.to_dict(), "targets": runs_on(r)} for r in RECIPES.values()]
    if as_json:
        _print_json(rows)
        return
    table = Table(title="recipes (--precision)")
    table.add_column("name", no_wrap=True)
    for col in ("vision", "llm", "sam_encoder", "mask_decoder", "targets"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], *r["components"].values(), ", ".join(r["targets"]))
    _stdout().print(table)
