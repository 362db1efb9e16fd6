"""`citrus-edge run`: a bundle on one image, or tracked through a multi-frame video."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from citrus_edge.cli.cli_app import (
    EXIT_NOTHING_TRACKED,
    BackendOption,
    BundleArg,
    MaxNewTokensOption,
    ProvidersOption,
    _cell,
    _print_json,
    _stdout,
    app,
    console,
)


@app.command("run")
def run_cmd(
    bundle: BundleArg,
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
    backend: BackendOption = "onnxruntime",
    provider: ProvidersOption = None,
    max_new_tokens: MaxNewTokensOption = 96,
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
    dicom_out: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            help="Also write DICOM results of a DICOM input into <DIR>/<name>/: seg.dcm (a "
            "Segmentation, when the answer has a mask) and sr.dcm (TID 1500 report). Needs the "
            "serve extra.",
        ),
    ] = None,
) -> None:
    """Run a bundle on an image: report text, boxes, masks (RLE JSON + PNG overlay), sizes in mm.

    Results are named after the input, with the frame for a multi-frame input
    (`<stem>.frame0015.json`), so runs on different frames never overwrite each other.
    """
    from citrus_edge.runtime.pipeline import Pipeline
    from citrus_edge.runtime.result_files import result_to_dict, write_json, write_overlay

    if dicom_out is not None:
        _check_dicom_out(input, video)
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
    written = [j, o]
    if dicom_out is not None:
        from citrus_edge.cart.dicom_out import read_source, write_dicom_results

        written += write_dicom_results(
            read_source(input), g.result, pipe.bundle_id, dicom_out / name, frame
        )
    if as_json:
        _print_json(result_to_dict(g.result))
    else:
        _stdout().print(_result_table(g.result))
    console.print(Text("\n".join(f"wrote {p}" for p in written)))


def _check_dicom_out(input: Path, video: bool) -> None:
    """Refuse --dicom-out before the bundle loads: it needs the serve extra, a DICOM input and
    one grounded frame."""
    from citrus_edge.calib_data.load import is_dicom
    from citrus_edge.cart.dicom_out import NotDicomSourceError, require_extra

    require_extra("highdicom")
    if video:
        raise typer.BadParameter("--dicom-out writes the results of one frame; drop --video")
    if not is_dicom(input):
        raise NotDicomSourceError(
            f"{input.name} is not DICOM; --dicom-out needs a DICOM input (SEG and SR reference "
            "its patient, study and SOP instance)"
        )


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
