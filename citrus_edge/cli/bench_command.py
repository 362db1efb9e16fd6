"""`citrus-edge bench`: latency, tokens, memory and cold start of bundles, the trtexec way.

Warm-up runs first (untimed), then `--iterations` timed rounds over every image; each figure is
printed as min / p50 / p90 / p99 over those runs, and the headline figure of any report is the
p50 (the median of repeated runs: a busy machine's outliers move it least). The machine (CPU
model, instruction sets, cores, GPUs) and every library version go into `--json`, because a
latency means nothing without what it ran on. Two or more bundles are timed in one run, loaded
in one process and run in turn image by image (`bench_reports`), and each is compared with the
first: ratios from one run hold on a busy machine, where two runs one after the other do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from citrus_edge.cli.cli_app import (
    BackendOption,
    MaxNewTokensOption,
    _cell,
    _stdout,
    app,
    console,
)

MANIFEST_SUFFIXES = (".jsonl",)
IMAGE_SUFFIXES = (".dcm", ".png", ".jpg", ".jpeg", "")  # "": DICOM files without one
DEFAULT_IMAGES = 4  # records taken from a manifest (or the default phantom set) when not told
COMPARE_SCHEMA = "citrus-edge.bench-compare/1"  # --json of two or more bundles


class BenchCasesError(ValueError):
    """The images or prompts asked for cannot make a benchmark case list."""


def bench_cases(
    images: list[Path] | None,
    prompt: str | None = None,
    task: str | None = None,
    split: str = "eval",
    limit: int = DEFAULT_IMAGES,
) -> list[tuple[Any, str]]:
    """(image path, prompt) cases: image files as given, manifests (`.jsonl`) as their first
    `limit` records of `split` (segmentation records with a lesion first: they exercise SAM2 too,
    and the first case's image is what video mode tracks). Without
    images, the default phantom set's eval split. The prompt is `prompt`, else the `task`'s
    standard prompt, else a manifest record's own prompt, else the segmentation prompt."""
    from citrus_edge.tasks import PROMPTS, SEGMENT_PROMPT

    if prompt is not None and task is not None:
        raise BenchCasesError("give --prompt or --task, not both")
    if task is not None and task not in PROMPTS:
        raise BenchCasesError(f"unknown task {task!r}; choose one of {', '.join(PROMPTS)}")
    fixed = prompt if prompt is not None else (PROMPTS[task] if task else None)
    if not images:
        from citrus_edge.calib_data.phantom_set import default_phantom_manifest

        images = [default_phantom_manifest()]
    cases: list[tuple[Any, str]] = []
    for path in images:
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            cases += _manifest_cases(path, split, limit, fixed)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            cases.append((path, fixed or SEGMENT_PROMPT))
        else:
            raise BenchCasesError(
                f"{path}: neither an image (.dcm, .png, .jpg) nor a manifest (.jsonl)"
            )
    if not cases:
        raise BenchCasesError(f"no images to time in {', '.join(map(str, images))}")
    return cases


def _manifest_cases(
    manifest: Path, split: str, limit: int, fixed: str | None
) -> list[tuple[Any, str]]:
    from citrus_edge.calib_data.data_manifest import read_manifest
    from citrus_edge.calib_data.load import load_image

    records = read_manifest(manifest, split=split)
    # Segmentation records with a lesion first (they run SAM2, and the first case's image is the
    # video's), then the other tasks; manifest order within each group (a stable sort).
    records.sort(key=lambda r: (r.task != "segment", not r.masks))
    out: list[tuple[Any, str]] = []
    for r in records[:limit]:
        image: Any = r.abs_image(manifest.parent)
        if r.frame:  # the pipeline reads frame 0 of a path: hand over the frame's pixels
            image = load_image(image, frame=r.frame).pixels
        out.append((image, fixed or r.prompt))
    return out


# (label, key in the report, unit) of the rows `bench` prints, in order.
ROWS = (
    ("end to end", "e2e_ms", "ms"),
    ("time to first token", "ttft_ms", "ms"),
    ("prefill", "prefill_ms", "ms"),
    ("decode", "decode_ms_per_token", "ms/token"),
    ("decode rate", "decode_tokens_per_s", "tokens/s"),
    ("mask decoder", "mask_decoder_ms_per_seg", "ms/[SEG]"),
    ("vision tokens", "vision_tokens", "tokens"),
    ("prefill tokens", "prefill_tokens", "tokens"),
    ("new tokens", "new_tokens", "tokens"),
)


def _num(entry: dict | None, key: str) -> str:
    if not entry or not entry.get("n"):
        return "-"
    v = entry[key]
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"


def bench_table(report: dict) -> Table:
    """The printed table: one row per figure and stage, columns n / min / p50 / p90 / p99."""
    s = report["settings"]
    title = (
        f"bundle {report['bundle_id']} ({report['bundle_bytes'] / 1e6:.2f} MB) on "
        f"{report['backend']}, threads {s['threads'] or 'default'}: {s['warmup']} warm-up, "
        f"{s['iterations']} x {len(report['cases'])} timed runs"
    )
    table = Table(title=Text(title))
    table.add_column("figure")
    table.add_column("unit")
    for col in ("n", "min", "p50", "p90", "p99"):
        table.add_column(col, justify="right")

    def row(label: str, entry: dict | None, unit: str) -> None:
        n = str(entry.get("n", 0)) if entry else "0"
        table.add_row(
            _cell(label), unit, n, *(_num(entry, k) for k in ("min", "p50", "p90", "p99"))
        )

    for label, key, unit in ROWS:
        row(label, report.get(key), unit)
    for stage, entry in report["stages_ms"].items():
        if stage != "total":
            row(f"  stage {stage}", entry, "ms")
    video = report.get("video")
    if video:
        row("video key frame", video["key_frame_ms"], "ms")
        row(f"video tracked frame ({video['n_seg']} [SEG])", video["ms_per_frame"], "ms/frame")
    return table


def summary_lines(report: dict) -> list[str]:
    """Cold start, memory, machine and versions: the lines under the table."""
    lines = []
    cold = report.get("cold_start")
    if cold:
        lines.append(
            f"cold start {cold['cold_start_ms']:.0f} ms (load {cold['load_ms']:.0f} + first "
            f"result {cold['first_result_ms']:.0f}; import {cold['import_ms']:.0f}; process "
            f"{cold['process_ms']:.0f}), cold process peak RSS {cold['peak_rss_mb']:.0f} MB"
        )
    lines.append(f"peak RSS of the warm runs {report['peak_rss_mb']:.0f} MB")
    m = report["machine"]
    gpus = ", ".join(g["name"] for g in m["gpus"]) or "none"
    lines.append(f"machine: {m['cpu_line']} ({m['cores_usable']} usable); GPU: {gpus}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"]["key"].items()))
    return lines


def compare_report(reports: list[dict]) -> dict[str, Any]:
    """The --json of two or more bundles timed in one run: every report, and each one's speed-ups
    over the first (`speedups`: the first's median / this one's, > 1 faster)."""
    from citrus_edge.runtime.bench import speedups

    return {
        "schema": COMPARE_SCHEMA,
        "schedule": "alternating",
        "base": reports[0]["bundle"],
        "reports": reports,
        "speedups_vs_base": [
            {"bundle": r["bundle"], **speedups(reports[0], r)} for r in reports[1:]
        ],
    }


@app.command("bench")
def bench_cmd(
    bundles: Annotated[
        list[Path],
        typer.Argument(
            exists=True,
            file_okay=False,
            help="Bundle directory from `citrus-edge build`; two or more are timed in turn in "
            "one run and compared with the first.",
        ),
    ],
    images: Annotated[
        list[Path] | None,
        typer.Option(
            "--images",
            exists=True,
            dir_okay=False,
            help="Image file or manifest (.jsonl), repeatable (default: the phantom eval set).",
        ),
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt for every image.")] = None,
    task: Annotated[
        str | None, typer.Option(help="Standard prompt of a task: segment, detect or report.")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, help="Records taken from each manifest.")
    ] = DEFAULT_IMAGES,
    split: Annotated[str, typer.Option(help="Manifest split.")] = "eval",
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs of the first image.")] = 2,
    iterations: Annotated[int, typer.Option(min=1, help="Timed rounds over every image.")] = 5,
    threads: Annotated[
        int, typer.Option(min=0, help="ONNX Runtime intra-op threads (0: one per core).")
    ] = 0,
    video_frames: Annotated[
        int, typer.Option(min=0, help="Tracked frames timed in video mode (0: none).")
    ] = 8,
    max_new_tokens: MaxNewTokensOption = 96,
    backend: BackendOption = "onnxruntime",
    cold_start: Annotated[
        bool, typer.Option(help="Also time a cold start in a fresh process.")
    ] = True,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the full report (JSON) here.")
    ] = None,
) -> None:
    """Time bundles: per-stage and end-to-end min/p50/p90/p99, tokens, memory, cold start."""
    from citrus_edge.atomic import write_json_atomic
    from citrus_edge.runtime.bench import bench_reports, format_speedups, speedups

    cases = bench_cases(images, prompt, task, split, limit)  # typed errors before any loading
    what = bundles[0] if len(bundles) == 1 else f"{len(bundles)} bundles in turn"
    with console.status(f"timing {what} on {len(cases)} images"):
        reports = bench_reports(
            bundles,
            cases,
            warmup=warmup,
            iterations=iterations,
            threads=threads,
            backend=backend,
            max_new_tokens=max_new_tokens,
            video_frames=video_frames,
            cold_start=cold_start,
        )
    if json_out is not None:
        write_json_atomic(json_out, reports[0] if len(reports) == 1 else compare_report(reports))
    out = _stdout()
    for report in reports:
        out.print(bench_table(report))
        lines = summary_lines(report)
        for line in lines if report is reports[-1] else lines[:-2]:  # machine, versions once
            out.print(Text(line))
    for bundle, report in zip(bundles[1:], reports[1:], strict=True):
        line = format_speedups(speedups(reports[0], report), base=str(bundles[0]))
        out.print(Text(f"{bundle} {line} (one alternating run, medians)"))
