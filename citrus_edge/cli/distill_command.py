"""`citrus-edge distill`: distil a smaller student from a teacher checkpoint (resumable).

Every input is checked (one-line typed errors) before torch loads a model. Re-running the same
command in the same `--out` continues from the last checkpoint; the result is the student
checkpoint `OUT/model`. Under `torchrun` the same command runs data-parallel (see
`citrus_edge.modelling.distill`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from citrus_edge.cli.cli_app import app, console


def check_out_dir(out: Path) -> None:
    """`out` must be new, empty, or a distillation run's folder (to resume it)."""
    from citrus_edge.compress.distill_config import CONFIG_NAME

    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a folder; choose a new directory")
    if any(out.iterdir()) and not (out / CONFIG_NAME).is_file():
        raise FileExistsError(
            f"--out {out}: not empty and not a distillation run (no {CONFIG_NAME}); choose a "
            "new directory"
        )


def resolve_student(text: str):
    """A student checkpoint directory (holding config.json), or a StudentSpec (preset or
    `key=value;...`); raises a one-line error naming `--student` otherwise."""
    from citrus_edge.compress.student_spec import StudentSpec

    path = Path(text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--student {text}: a folder without config.json (expected a Citrus-V "
                "checkpoint, a student preset or a spec like 'llm-layers=0,3')"
            )
        return path
    return StudentSpec.parse(text)


@app.command("distill")
def distill_cmd(
    student: Annotated[
        str,
        typer.Option(
            help="Student: a preset (e.g. demo-small, demo-tiny), a spec 'llm-layers=0,3;"
            "llm-mlp=0.5;vision-blocks=1,3;hiera=1,1,1,1;vision-hidden=64;sam-hidden=64', or a "
            "checkpoint directory."
        ),
    ],
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")],
    out: Annotated[
        Path, typer.Option(help="Run directory (re-run to resume); model in OUT/model.")
    ],
    teacher: Annotated[
        Path | None, typer.Option(help="Teacher checkpoint [default: the shipped demo model].")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Manifest (train split trains, eval split evaluates) [default: fresh phantoms]."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Global batch (all processes).")] = 8,
    micro_batch: Annotated[int, typer.Option(min=1, help="Samples per forward pass.")] = 2,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate.")] = 3e-4,
    temperature: Annotated[float, typer.Option(help="Temperature of the logits KL.")] = 2.0,
    w_kl: Annotated[float, typer.Option(help="Weight of the logits KL.")] = 1.0,
    w_kl_first: Annotated[
        float,
        typer.Option(help="Extra weight of the KL on each answer's first token (the count)."),
    ] = 0.0,
    w_seg: Annotated[float, typer.Option(help="Weight of the [SEG] embedding loss.")] = 1.0,
    w_mask_kd: Annotated[float, typer.Option(help="Weight of the mask distillation.")] = 1.0,
    w_feat: Annotated[float, typer.Option(help="Weight of the SAM2 feature distillation.")] = 1.0,
    w_vis: Annotated[
        float, typer.Option(help="Weight of the visual-token (vision tower output) distillation.")
    ] = 1.0,
    w_gt: Annotated[
        float, typer.Option(help="Scale of the ground-truth losses (0: unlabelled).")
    ] = 1.0,
    eval_every: Annotated[int, typer.Option(min=0, help="Steps between evaluations.")] = 100,
    ckpt_every: Annotated[int, typer.Option(min=0, help="Steps between checkpoints.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the training-only heads.")] = 0,
    train: Annotated[
        list[str] | None,
        typer.Option(
            help="Ground-truth setting KEY=VALUE, repeatable: a weight (w_lm, w_mask, w_iou, "
            "w_aux, w_mask_aux, w_first, w_count, w_centre), min_lr, weight_decay, or "
            "centre_loss=bce|focal [default: the training loop's]."
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda [default: cpu; cuda:LOCAL_RANK under torchrun].")
    ] = None,
) -> None:
    """Distil a student from a teacher: logits KL, [SEG] embedding, masks, SAM2 features,
    visual tokens and the ground-truth losses; progress, periodic evaluation, resumable."""
    from citrus_edge.compress.distill_config import DistillConfig, parse_train_option
    from citrus_edge.defaults import resolve_model

    overrides: dict[str, object] = {}
    for text in train or ():
        key, value = parse_train_option(text)
        if key in overrides:
            raise ValueError(f"--train {key}: given twice ({overrides[key]!r} and {value!r})")
        overrides[key] = value
    cfg = DistillConfig(
        w_kl=w_kl,
        w_kl_first=w_kl_first,
        temperature=temperature,
        w_seg=w_seg,
        w_mask_kd=w_mask_kd,
        w_feat=w_feat,
        w_vis=w_vis,
        w_gt=w_gt,
        steps=steps,
        batch_size=batch_size,
        micro_batch=micro_batch,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        ckpt_every=ckpt_every,
        train=tuple(overrides.items()),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.accumulation(world)
    teacher_dir = resolve_model(teacher)
    if not (teacher_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--teacher {teacher_dir}: no tokenizer.json next to its weights")
    spec = resolve_student(student)
    if data is not None:
        from citrus_edge.calib_data.data_manifest import read_manifest

        if not data.is_file():
            raise FileNotFoundError(f"--data {data}: no such manifest file")
        for split in ("train", "eval"):
            if not read_manifest(data, split=split):
                raise ValueError(f"--data {data}: no records in its {split!r} split")
    check_out_dir(out)
    rank0 = int(os.environ.get("RANK", "0")) == 0

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from citrus_edge.modelling.distill import distill

    columns = (
        TextColumn("distill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=True, disable=not rank0) as bar:
        task = bar.add_task("", total=steps)

        def progress(ev: dict) -> None:
            terms = {
                k: v
                for k, v in ev.items()
                if k in ("total", "kl", "kl_first", "seg", "mask_kd", "feat", "vis", "lm")
            }
            text = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
            if ev["kind"] == "eval":
                bar.console.print(f"eval step {ev['step']}: {text}")
            else:
                bar.update(task, completed=ev["step"], description=text)

        distill(teacher_dir, spec, cfg, out, data=data, progress=progress, device=device)
    if rank0:
        typer.echo(str(out / "model"))
