"""`citrus-edge model slice`: random-weights checkpoints of a preset's widths."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from citrus_edge.cli.cli_app import (
    console,
    model_app,
)


def _ints(text: str, what: str) -> tuple[int, ...]:
    """`1,2,3` -> (1, 2, 3); `none` or empty -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as e:
        raise typer.BadParameter(f"{text!r}: expected {what}, comma-separated") from e


@model_app.command("slice")
def model_slice(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write (new or empty).")],
    preset: Annotated[
        str, typer.Option(help="Preset whose widths to keep: citrus-v-8b, citrus-v-demo, ...")
    ] = "citrus-v-8b",
    llm_layers: Annotated[
        int | None, typer.Option(min=1, help="LLM decoder layers [default: the preset's].")
    ] = None,
    vision_blocks: Annotated[
        int | None, typer.Option(min=1, help="Vision transformer blocks [default: the preset's].")
    ] = None,
    full_attention: Annotated[
        str | None,
        typer.Option(
            help="Indexes of the vision blocks with full attention, e.g. 1 or 7,15 (`none`) "
            "[default: the preset's below --vision-blocks, else the last block]."
        ),
    ] = None,
    hiera_blocks: Annotated[
        str | None,
        typer.Option(help="Hiera blocks per stage, e.g. 1,2,3,1 [default: the preset's]."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a random-weights checkpoint of a preset's widths at chosen depths (a slice).

    Official layout plus a stand-in tokenizer with the model's special-token ids (Qwen2.5's
    151643-151667 for citrus-v-8b), so every command accepts it.
    """
    from citrus_edge.modelling.slice import SliceConfig

    hiera = _ints(hiera_blocks, "4 block counts") if hiera_blocks is not None else None
    full = _ints(full_attention, "block indexes") if full_attention is not None else None
    cfg = SliceConfig(preset, llm_layers, vision_blocks, full, hiera, seed)  # type: ignore[arg-type]
    from citrus_edge.modelling.checkpoint import check_checkpoint_out

    check_checkpoint_out(out)  # before torch builds gigabytes of weights
    from citrus_edge.modelling.slice import write_slice

    with console.status(f"writing {cfg.name}"):
        model_cfg = write_slice(cfg, out)
    typer.echo(f"{out} ({model_cfg.name})")
