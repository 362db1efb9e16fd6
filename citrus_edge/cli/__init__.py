"""The `citrus-edge` command line. Thin: parse, build a config, call one library function.

Every stage is imported inside the command that needs it, so `citrus-edge --help` stays fast
and never imports torch.

Conventions: `-h`/`--help` and `-v`/`--verbose` work on every command (before or after its
name); help and errors are plain text (no console markup, so `[tensorrt]` or a file called
`[bold]x.dcm` print as they are); `--json` prints machine-readable output on stdout.
Exit codes: 0 done; 1 a typed error (one line: `error: <Type>: <what and what to do>`);
2 a usage error (unknown option, bad value); 3 `plan`: the model does not fit the target;
4 `run --video`: the key frame gave no `[SEG]`, so nothing was tracked; 130 interrupted.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from citrus_edge import __version__

EXIT_ERROR, EXIT_USAGE, EXIT_DOES_NOT_FIT, EXIT_NOTHING_TRACKED = 1, 2, 3, 4
EXIT_INTERRUPTED = 130


def _typer(help: str, **kw: Any) -> typer.Typer:
    """A command group with plain-text help (no markup: `[...]` in help text stays) and -h."""
    return typer.Typer(
        help=help,
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
        **kw,
    )


app = _typer("Compress, export and run the Citrus-V grounding VLM at the edge.", name="citrus-edge")
data_app = _typer("Calibration and evaluation data.")
app.add_typer(data_app, name="data")
engines_app = _typer("TensorRT engines, compiled on the target device.")
app.add_typer(engines_app, name="engines")
model_app = _typer("Model checkpoints.")
app.add_typer(model_app, name="model")
# stderr: progress and errors; stdout (`_stdout()`): tables and JSON. Neither parses markup,
# so user text and error messages print exactly as they are.
console = Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=1))


def _cell(value: Any) -> Text:
    """A table cell printed verbatim (rich would read `[SEG]` or `[bold]` as markup)."""
    return Text(str(value))


ExistingDir = Annotated[Path, typer.Argument(exists=True, file_okay=False)]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]


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


def _verbose_after_command(ctx: Any, param: Any, value: bool) -> None:
    if value:
        logging.getLogger().setLevel(logging.INFO)


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


@data_app.command("phantoms")
def data_phantoms(
    out: Annotated[Path, typer.Option(help="Output directory (must be new or empty).")],
    n: Annotated[int, typer.Option(min=1, help="Number of images.")] = 600,
    seed: Annotated[int, typer.Option(help="Base seed; the same seed gives identical files.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a set written here before.")] = False,
) -> None:
    """Write a phantom set: DICOM US images, masks, labels and manifest.jsonl."""
    from citrus_edge.calib_data.phantom_set import write_phantom_set

    with console.status(f"generating {n} phantoms"):
        manifest = write_phantom_set(out, n, seed, overwrite=overwrite)
    typer.echo(str(manifest))


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
        typer.Option(help="Citrus-V checkpoint directory (default: the demo model)."),
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
    as_json: JsonFlag = False,
) -> None:
    """Memory table and decode-speed bound of a model on a target, from dimensions only.

    Exits with code 3 when the model does not fit the target's memory (scripts can branch).
    """
    from citrus_edge.cli.memory_plan import plan, plan_summary, plan_table
    from citrus_edge.config import PRESETS, CitrusVConfig
    from citrus_edge.recipes import get_recipe
    from citrus_edge.targets import get_target

    cfg = PRESETS[model] if model in PRESETS else CitrusVConfig.load(Path(model) / "config.json")
    tgt = get_target(target)
    p = plan(cfg, tgt, get_recipe(precision or tgt.default_recipe), context_tokens=context)
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


@app.command("run")
def run_cmd(
    bundle: Annotated[
        Path,
        typer.Argument(
            exists=True, file_okay=False, help="Bundle directory from `citrus-edge build`."
        ),
    ],
    input: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, help="DICOM, PNG or JPEG image (or multi-frame DICOM)."
        ),
    ],
    prompt: Annotated[
        str, typer.Option(help="Question for the model.")
    ] = "Please help segment the lesion in this scan.",
    frame: Annotated[
        int, typer.Option(min=0, help="Frame of a multi-frame input (key frame in --video).")
    ] = 0,
    video: Annotated[
        bool, typer.Option(help="Full model on --frame, then SAM2 only on each following frame.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Directory for JSON results and overlays.")] = Path(
        "out/run"
    ),
    backend: Annotated[str, typer.Option(help="onnxruntime or tensorrt.")] = "onnxruntime",
    provider: Annotated[
        list[str] | None,
        typer.Option(help="ONNX Runtime execution provider (repeatable; default CPU)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation limit.")] = 96,
    max_context_tokens: Annotated[
        int,
        typer.Option(
            min=2,
            help="Cap on prompt (template + image + text) + new tokens; the model's own context "
            "also applies. Longer prompts are refused before any graph runs.",
        ),
    ] = 2048,  # runtime.pipeline.RuntimeConfig's default (prompts.DEFAULT_MAX_CONTEXT_TOKENS)
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result JSON on stdout instead of a table.")
    ] = False,
) -> None:
    """Run a bundle on an image: report text, boxes, masks (RLE JSON + PNG overlay), sizes in mm.

    Results are named after the input, with the frame for a multi-frame input
    (`<stem>.frame0015.json`), so runs on different frames never overwrite each other.
    """
    from citrus_edge.runtime.pipeline import Pipeline
    from citrus_edge.runtime.result_files import result_to_dict, write_json, write_overlay

    pipe = Pipeline.from_bundle(
        bundle,
        backend=backend,
        providers=provider,
        max_new_tokens=max_new_tokens,
        max_context_tokens=max_context_tokens,
    )
    if video:
        _run_video(pipe, input, prompt, frame, out / input.stem)
        return
    g = pipe.ground(input, prompt, frame=frame)
    name = input.stem if g.image.n_frames <= 1 else f"{input.stem}.frame{frame:04d}"
    j = write_json(g.result, out / f"{name}.json")
    o = write_overlay(g.image.pixels, g.result, out / f"{name}.overlay.png")
    if as_json:
        _print_json(result_to_dict(g.result))
    else:
        _stdout().print(_result_table(g.result))
    console.print(Text(f"wrote {j}\nwrote {o}"))


def _result_table(result) -> Table:
    table = Table(title=Text(f"bundle {result.bundle_id}"), show_header=False)
    table.add_row("text", _cell(result.text))
    q = result.quality
    if q is not None:
        logprob = "-" if q.mean_logprob is None else f"{q.mean_logprob:.3f} / {q.min_logprob:.3f}"
        parses = {True: "yes", False: "NO", None: "-"}[q.parses]
        table.add_row("task, answer parses", f"{q.task or '-'}, {parses}")
        table.add_row(
            "log-prob mean / min", logprob + (" (low confidence)" if q.low_confidence else "")
        )
    sizes = {m.mask: m for m in result.measurements}
    for i, score in enumerate(result.mask_scores):
        m = sizes.get(i)
        size = "no mm" if m is None else f"{m.area_mm2:.1f} mm², {m.longest_diameter_mm:.1f} mm"
        table.add_row(f"mask {i}", f"predicted IoU {score:.2f}; {size}")
    table.add_row("masks", str(len(result.masks)))
    table.add_row("boxes", "; ".join(f"{[round(v) for v in b.as_list()]}" for b in result.boxes))
    table.add_row("total ms", f"{result.timings_ms['total']:.1f}")
    for w in result.warnings:
        table.add_row("warning", _cell(w))
    return table


def _run_video(pipe, input: Path, prompt: str, key_frame: int, out: Path) -> None:
    import statistics

    from rich.progress import Progress

    from citrus_edge.calib_data.load import load_image
    from citrus_edge.runtime.result_files import write_json, write_overlay
    from citrus_edge.runtime.video import run_video

    n = load_image(input, frame=key_frame).n_frames
    latencies = []
    with Progress(console=console) as progress:
        task = progress.add_task("frames", total=n - key_frame)
        for fr in run_video(pipe, input, prompt, key_frame=key_frame):
            write_json(fr.result, out / f"frame_{fr.frame:04d}.json")
            if fr.key_frame:
                rgb = load_image(input, frame=fr.frame).pixels
                write_overlay(rgb, fr.result, out / f"frame_{fr.frame:04d}.overlay.png")
                if fr.result.n_seg == 0:
                    break  # no [SEG] state to track: the following frames would have no masks
            else:
                latencies.append(fr.latency_ms)
            progress.advance(task)
    console.print(Text(f"wrote {out}"))
    if not latencies:
        console.print(
            Text(
                f"nothing tracked: the answer on key frame {key_frame} has no [SEG] token, so "
                f"there is no mask to follow (answer: {fr.result.text!r}); try another --frame "
                "or a segmentation prompt"
            )
        )
        raise typer.Exit(EXIT_NOTHING_TRACKED)
    typer.echo(
        f"tracked {len(latencies)} frames: median {statistics.median(latencies):.1f} ms/frame"
    )


@app.command("build")
def build_cmd(
    target: Annotated[str, typer.Option(help="Target name (see `citrus-edge targets`).")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write (replaced atomically).")],
    model: Annotated[
        Path | None, typer.Option(help="Citrus-V checkpoint directory (default: the demo model).")
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
    )
    with console.status("building") as status:
        manifest = build(cfg, out, progress=lambda stage: status.update(f"build: {stage}"))
    _stdout().print(_build_table(manifest, out))


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
            f"eval ({acc['records']} records): Dice {m['dice']:.3f}, count acc "
            f"{m['count_accuracy']:.3f}; vs FP32: token agreement {v['token_agreement']:.4f}, "
            f"GT Dice drop {v['gt_dice_drop']:+.4f}"
        )
    else:
        table.caption = f"accuracy not measured here: {acc.get('reason')}"
    if "engine_plan" in manifest:
        table.caption += " | portable bundle: run `citrus-edge engines build` on the device"
    table.caption = Text(table.caption)
    return table


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
) -> None:
    """Post-training quantization with an accuracy budget; per-component table at the end."""
    from rich.progress import Progress

    from citrus_edge.compress.budget import default_budget, parse_budget
    from citrus_edge.compress.quantize import quantize
    from citrus_edge.recipes import get_recipe

    base = default_budget(get_recipe(precision).llm)

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


@functools.cache
def command() -> Any:
    """The click command behind `citrus-edge`, with `-v/--verbose` accepted after any command's
    name too (the root option, copied onto every leaf command; it sets the log level)."""
    root = typer.main.get_command(app)
    (verbose,) = (p for p in root.params if p.name == "verbose")

    def add_verbose(group: Any) -> None:
        for cmd in group.commands.values():
            if hasattr(cmd, "commands"):
                add_verbose(cmd)
                continue
            option = copy.copy(verbose)
            option.expose_value, option.callback = False, _verbose_after_command
            cmd.params.append(option)

    add_verbose(root)
    return root


def error_line(e: BaseException) -> str:
    """The one line a typed error prints: `error: <Type>: <message on one line>`."""
    message = " ".join(str(e).split())
    return f"error: {type(e).__name__}: {message}"


def entry(argv: list[str] | None = None) -> None:
    """Console entry point: typed errors become one plain line on stderr and exit code 1;
    usage errors exit 2 (click's convention); an interrupt exits 130."""
    try:
        command().main(argv, prog_name="citrus-edge")
    except (ValueError, RuntimeError, OSError) as e:
        typer.secho(error_line(e), err=True, fg="red", bold=True)
        raise SystemExit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None


if __name__ == "__main__":
    entry(sys.argv[1:])
