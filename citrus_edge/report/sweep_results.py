"""The sweep's results: schema, the flat table every report shows, Pareto front, comparison.

`results.json` holds one header (machine, versions, model hashes, the data manifest's hash,
budget, settings) and one cell per model x target x recipe. Every table -- `results.csv`,
`report.md`, `report.html` and `citrus-edge sweep --compare` -- is made from `table_rows`, the
one flattening of the cells (`COLUMNS`), so a figure can never differ between them: the CSV
holds the raw numbers, Markdown and HTML print them through `format_value`.

A cell's `status` is "measured" (built, timed and scored here), "not measured" (a TensorRT target
without its GPU: the planner's projection is shown, in columns named "projected", never as a
measurement), "not applicable" (the target cannot run the recipe) or "failed" (the error, one
line). Torch-free and CLI-free: the sweep runner (citrus_edge/cli/sweep_command.py) fills the
cells, this module only reads them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = "citrus-edge.sweep/1"
MEASURED, NOT_MEASURED, NOT_APPLICABLE, FAILED = (
    "measured",
    "not measured",
    "not applicable",
    "failed",
)
VALID, INVALID = "VALID", "INVALID"


class SweepResultsError(ValueError):
    """A results file that is not a sweep's, or of another schema version."""


@dataclass(frozen=True)
class Column:
    """One column of every table: its key in a row, header, how it is read from a cell, and
    how Markdown/HTML print it (`digits` after the point; None: text)."""

    key: str
    header: str
    read: Callable[[dict], Any]
    digits: int | None = None


def _get(*path: str) -> Callable[[dict], Any]:
    def read(cell: dict) -> Any:
        value: Any = cell
        for p in path:
            if not isinstance(value, dict):
                return None
            value = value.get(p)
        return value

    return read


def _mb(cell: dict) -> float | None:
    size = _get("bundle", "bytes")(cell)
    return None if size is None else size / 1e6


def _projected_mb(cell: dict) -> float | None:
    size = _get("projection", "weight_bytes")(cell)
    return None if size is None else size / 1e6


COLUMNS: tuple[Column, ...] = (
    Column("model", "model", _get("model")),
    Column("target", "target", _get("target")),
    Column("recipe", "recipe", _get("recipe")),
    Column("status", "status", _get("status")),
    Column("validity", "validity", _get("validity")),
    Column("pareto", "Pareto", lambda c: "yes" if c.get("pareto") else ""),
    Column("size_mb", "size MB", _mb, 2),
    Column("e2e_p50_ms", "e2e p50 ms", _get("latency", "e2e_p50_ms"), 1),
    Column("e2e_p90_ms", "e2e p90 ms", _get("latency", "e2e_p90_ms"), 1),
    Column("ttft_p50_ms", "TTFT p50 ms", _get("latency", "ttft_p50_ms"), 1),
    Column("decode_ms_per_token", "decode ms/token", _get("latency", "decode_ms_per_token"), 2),
    Column("video_ms_per_frame", "video ms/frame", _get("latency", "video_ms_per_frame"), 1),
    Column("cold_start_ms", "cold start ms", _get("latency", "cold_start_ms"), 0),
    Column("peak_rss_mb", "peak RSS MB", _get("latency", "peak_rss_mb"), 0),
    Column("dice", "Dice", _get("accuracy", "dice"), 4),
    Column("dice_drop", "Dice drop vs FP32", _get("accuracy", "dice_drop"), 4),
    Column("precision_at_1", "Precision@1", _get("accuracy", "precision_at_1"), 3),
    Column("count_accuracy", "lesion count acc", _get("accuracy", "count_accuracy"), 3),
    Column("report_fields", "report fields", _get("accuracy", "report_field_accuracy"), 3),
    Column("token_agreement", "token agreement", _get("accuracy", "token_agreement"), 4),
    Column("mask_iou", "mask IoU vs FP32", _get("accuracy", "mask_iou"), 4),
    Column("projected_mb", "projected weights MB", _projected_mb, 2),
    Column(
        "projected_decode_tps",
        "projected decode tokens/s (upper bound)",
        _get("projection", "decode_tokens_per_s_upper_bound"),
        0,
    ),
    Column("note", "note", _get("reason")),
)
COLUMN_KEYS = tuple(c.key for c in COLUMNS)
# Stage order in the stacked latency bars (GroundingResult.timings_ms names); others follow.
STAGES = (
    "load",
    "preprocess",
    "vision_encoder",
    "llm_inputs",
    "grammar",
    "prefill",
    "decode",
    "detokenize",
    "sam_preprocess",
    "sam_encoder",
    "mask_decoder",
    "postprocess",
    "measure",
)


def cell_label(cell: dict) -> str:
    """`model/target/recipe`: how plots and the comparison name a cell."""
    return f"{cell['model']}/{cell['target']}/{cell['recipe']}"


def table_rows(results: dict) -> list[dict[str, Any]]:
    """One row per cell, keyed by `COLUMN_KEYS`: raw values (numbers stay floats)."""
    return [{c.key: c.read(cell) for c in COLUMNS} for cell in results["cells"]]


def format_value(column: Column, value: Any) -> str:
    """A value as Markdown and HTML print it: "-" for none, `digits` decimals for numbers."""
    if value is None or value == "":
        return "-" if column.digits is not None or value is None else ""
    if column.digits is not None and isinstance(value, (int, float)):
        return f"{value:.{column.digits}f}"
    return " ".join(str(value).split())  # one line: a table row holds no line break


def formatted_rows(results: dict) -> list[list[str]]:
    """`table_rows` as printed strings, in `COLUMNS` order."""
    return [[format_value(c, row[c.key]) for c in COLUMNS] for row in table_rows(results)]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x (latency) and higher y (accuracy);
    a point is dominated by one at least as good in both and better in one. Ties (equal in
    both) are all on the front. Sorted by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (xj <= x and yj >= y) and (xj < x or yj > y)
            for j, (xj, yj) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def mark_pareto(results: dict) -> list[int]:
    """Set `pareto` on every cell: True for the VALID measured cells on the front of end-to-end
    p50 latency vs Dice (a configuration outside the accuracy budget is never a choice).
    Returns the indices of the front's cells."""
    candidates = [
        i
        for i, c in enumerate(results["cells"])
        if c.get("status") == MEASURED
        and c.get("validity") == VALID
        and _finite(_get("latency", "e2e_p50_ms")(c))
        and _finite(_get("accuracy", "dice")(c))
    ]
    points = [
        (results["cells"][i]["latency"]["e2e_p50_ms"], results["cells"][i]["accuracy"]["dice"])
        for i in candidates
    ]
    front = [candidates[k] for k in pareto_front(points)]
    for i, cell in enumerate(results["cells"]):
        cell["pareto"] = i in front
    return front


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def results_csv(results: dict) -> str:
    """The CSV text: a header of `COLUMN_KEYS`, raw values (floats as Python writes them, so they
    read back equal), empty for none."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMN_KEYS)
    for row in table_rows(results):
        writer.writerow(["" if row[k] is None else row[k] for k in COLUMN_KEYS])
    return buf.getvalue()


def header_lines(results: dict) -> list[str]:
    """What the measurements are conditional on: machine, versions, models, data, budget."""
    m = results["machine"]
    gpus = ", ".join(g["name"] for g in m.get("gpus", [])) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines = [
        f"machine: {m['cpu_line']} ({m.get('cores_usable')} usable); "
        f"{(m.get('memory_gb') or 0):.0f} GB RAM; GPU: {gpus}; {m.get('os')}",
        f"versions: {versions}",
    ]
    for name, model in results["models"].items():
        lines.append(f"model {name}: {model['dir']} ({model['hash']})")
    d = results["data"]
    lines.append(
        f"data: {d['manifest']} ({d['sha256']}), split {d['split']}, {d['records']} records; "
        f"bench on {d['bench_images']} images"
    )
    s = results["settings"]
    lines.append(
        f"bench: {s['warmup']} warm-up, {s['iterations']} timed rounds, threads "
        f"{s['threads'] or 'default'}, {s['video_frames']} tracked video frames; "
        "latencies are medians (p50) of the repeated runs unless named p90"
    )
    lines.append(
        "accuracy budget vs the FP32 PyTorch reference: "
        + "; ".join(f"{k}: {v}" for k, v in results["budget"].items())
    )
    lines.append(
        "cells marked 'not measured' ran nowhere: their 'projected' columns are the memory "
        "planner's projection (an upper bound from bandwidth), not a measurement"
    )
    return lines


def results_markdown(results: dict) -> str:
    """`report.md`: the header, then the table of every cell (`formatted_rows`)."""
    lines = [f"# Sweep report ({results['created']})", ""]
    lines += [f"- {line}" for line in header_lines(results)]
    lines += ["", "| " + " | ".join(c.header for c in COLUMNS) + " |"]
    lines.append("|" + "|".join("---:" if c.digits is not None else "---" for c in COLUMNS) + "|")
    for row in formatted_rows(results):
        lines.append("| " + " | ".join(v.replace("|", "/") for v in row) + " |")
    lines.append("")
    return "\n".join(lines)


def read_markdown_table(text: str) -> list[list[str]]:
    """The cells of the first Markdown table in `text` (header and separator dropped)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[v.strip() for v in row.strip().strip("|").split("|")] for row in rows[2:]]


def load_results(path: str | Path) -> dict:
    """A results.json (or a sweep folder holding one), checked for this schema."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise SweepResultsError(f"{path}: no such results file (run `citrus-edge sweep` first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SweepResultsError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise SweepResultsError(f"{path}: schema {found!r}, expected {SCHEMA!r}")
    return data


# (label, column key, True when higher is better) of the --compare table.
COMPARED = (
    ("e2e p50", "e2e_p50_ms", False),
    ("TTFT p50", "ttft_p50_ms", False),
    ("decode/token", "decode_ms_per_token", False),
    ("video/frame", "video_ms_per_frame", False),
    ("size", "size_mb", False),
    ("Dice", "dice", True),
    ("token agreement", "token_agreement", True),
)


def compare(a: dict, b: dict) -> dict[str, Any]:
    """Cells of `b` over the same cells (model/target/recipe) of `a`: for each `COMPARED`
    figure the ratio B / A (None where either lacks it or A is 0). Also "differences": the
    header fields that differ (machine, versions, model hashes, data), which a reader must
    weigh before trusting a ratio."""
    rows_a = {(r["model"], r["target"], r["recipe"]): r for r in table_rows(a)}
    rows = []
    for r in table_rows(b):
        key = (r["model"], r["target"], r["recipe"])
        if key not in rows_a:
            continue
        ra = rows_a[key]
        ratios = {}
        for label, k, _ in COMPARED:
            x, y = ra[k], r[k]
            ratios[label] = y / x if _finite(x) and _finite(y) and x != 0 else None
        rows.append({"cell": "/".join(key), "ratios": ratios})
    differences = []
    if a["machine"].get("cpu_line") != b["machine"].get("cpu_line"):
        differences.append(f"machine: {a['machine']['cpu_line']} vs {b['machine']['cpu_line']}")
    for k in sorted(set(a["versions"]) | set(b["versions"])):
        if a["versions"].get(k) != b["versions"].get(k):
            differences.append(f"{k}: {a['versions'].get(k)} vs {b['versions'].get(k)}")
    for name in sorted(set(a["models"]) & set(b["models"])):
        if a["models"][name]["hash"] != b["models"][name]["hash"]:
            differences.append(f"model {name}: different weights")
    if a["data"]["sha256"] != b["data"]["sha256"] or a["data"]["split"] != b["data"]["split"]:
        differences.append("data: different manifests or splits (accuracy not comparable)")
    return {"rows": rows, "differences": differences}


def compare_lines(comparison: dict) -> list[str]:
    """The printed ratio table (B / A; below 1 is faster or smaller for latencies and sizes)."""
    labels = [label for label, _, _ in COMPARED]
    width = max([len(r["cell"]) for r in comparison["rows"]] + [4])
    lines = ["B / A  " + " " * (width - 5) + "  ".join(f"{label:>15}" for label in labels)]
    for r in comparison["rows"]:
        cells = [
            f"{'-' if r['ratios'][label] is None else format(r['ratios'][label], '.3f'):>15}"
            for label in labels
        ]
        lines.append(f"{r['cell']:<{width + 2}}" + "  ".join(cells))
    if not comparison["rows"]:
        lines.append("(no cell is in both sweeps)")
    lines += [f"note: {d}" for d in comparison["differences"]]
    return lines
