"""`report.html`: one self-contained page (no network, no files beside it) with the sweep's
header, its table and three matplotlib plots embedded as base64 PNG:

- end-to-end latency (p50) vs Dice, the Pareto front of the VALID cells drawn and circled;
- per-stage stacked latency bars (p50 of each stage) per measured cell;
- bundle size vs Dice.

The numbers each plot draws come from `plot_series(results)` and are also embedded in the page
(`<script type="application/json" id="plot-data">`), so a test can check that the plots show
exactly the values of results.json. matplotlib is imported inside the functions (Agg backend).
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from .sweep_results import (
    COLUMNS,
    INVALID,
    MEASURED,
    STAGES,
    cell_label,
    formatted_rows,
    header_lines,
)


def plot_series(results: dict) -> dict[str, Any]:
    """What the plots draw, per measured cell with the figure (label order = cell order):
    "latency_vs_dice": [{label, e2e_p50_ms, dice, validity, pareto}], "stages": {"labels",
    "stages", "ms": [[stage ms per label] per stage]}, "size_vs_dice": [{label, size_mb, dice,
    validity}]."""
    measured = [c for c in results["cells"] if c.get("status") == MEASURED]
    lat = [
        {
            "label": cell_label(c),
            "e2e_p50_ms": c["latency"]["e2e_p50_ms"],
            "dice": c["accuracy"]["dice"],
            "validity": c.get("validity"),
            "pareto": bool(c.get("pareto")),
        }
        for c in measured
        if c["latency"].get("e2e_p50_ms") is not None and c["accuracy"].get("dice") is not None
    ]
    seen = {s for c in measured for s in c["latency"].get("stages_p50_ms", {})}
    stages = [s for s in STAGES if s in seen] + sorted(seen - set(STAGES) - {"total"})
    bars = {
        "labels": [cell_label(c) for c in measured],
        "stages": stages,
        "ms": [
            [c["latency"].get("stages_p50_ms", {}).get(s, 0.0) for c in measured] for s in stages
        ],
    }
    size = [
        {
            "label": cell_label(c),
            "size_mb": c["bundle"]["bytes"] / 1e6,
            "dice": c["accuracy"]["dice"],
            "validity": c.get("validity"),
        }
        for c in measured
        if c["accuracy"].get("dice") is not None
    ]
    return {"latency_vs_dice": lat, "stages": bars, "size_vs_dice": size}


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _scatter(ax: Any, points: list[dict], x: str) -> None:
    for p in points:
        invalid = p["validity"] == INVALID
        ax.scatter(p[x], p["dice"], marker="x" if invalid else "o", color="C3" if invalid else "C0")
        ax.annotate(
            p["label"], (p[x], p["dice"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )


def plots(results: dict) -> dict[str, str]:
    """The three plots as base64 PNG, keyed "latency_vs_dice", "stages", "size_vs_dice"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plot_series(results)
    out = {}

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lat = series["latency_vs_dice"]
    _scatter(ax, lat, "e2e_p50_ms")
    front = sorted((p for p in lat if p["pareto"]), key=lambda p: p["e2e_p50_ms"])
    if front:
        ax.step(
            [p["e2e_p50_ms"] for p in front],
            [p["dice"] for p in front],
            where="post",
            color="C2",
            label="Pareto front (VALID cells)",
        )
        ax.scatter(
            [p["e2e_p50_ms"] for p in front],
            [p["dice"] for p in front],
            s=160,
            facecolors="none",
            edgecolors="C2",
        )
        ax.legend(fontsize=8)
    ax.set_xlabel("end-to-end latency p50 (ms)")
    ax.set_ylabel("Dice")
    ax.set_title("latency vs Dice (x: INVALID, outside the accuracy budget)")
    ax.grid(alpha=0.3)
    out["latency_vs_dice"] = _png(fig)
    plt.close(fig)

    bars = series["stages"]
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(bars["labels"]) + 2), 4.2))
    bottom = [0.0] * len(bars["labels"])
    for k, (stage, ms) in enumerate(zip(bars["stages"], bars["ms"], strict=True)):
        ax.bar(bars["labels"], ms, bottom=bottom, label=stage, color=plt.cm.tab20(k % 20))
        bottom = [b + m for b, m in zip(bottom, ms, strict=True)]
    ax.set_ylabel("ms (p50 of each stage)")
    ax.set_title("per-stage latency")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    if bars["stages"]:
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    out["stages"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _scatter(ax, series["size_vs_dice"], "size_mb")
    ax.set_xlabel("bundle size (MB)")
    ax.set_ylabel("Dice")
    ax.set_title("size vs Dice")
    ax.grid(alpha=0.3)
    out["size_vs_dice"] = _png(fig)
    plt.close(fig)
    return out


PLOT_TITLES = {
    "latency_vs_dice": "Latency vs Dice, Pareto front marked",
    "stages": "Per-stage latency per cell (stacked p50)",
    "size_vs_dice": "Size vs accuracy",
}


def results_html(results: dict) -> str:
    """The self-contained page (see the module docstring)."""
    e = html.escape
    images = plots(results)
    head = "".join(f"<li>{e(line)}</li>" for line in header_lines(results))
    header_row = "".join(f"<th>{e(c.header)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>"
        for row in formatted_rows(results)
    )
    figures = "".join(
        f'<figure><img id="plot-{name}" alt="{e(PLOT_TITLES[name])}" '
        f'src="data:image/png;base64,{data}"><figcaption>{e(PLOT_TITLES[name])}</figcaption>'
        "</figure>"
        for name, data in images.items()
    )
    series = json.dumps(plot_series(results)).replace("</", "<\\/")
    style = (
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}"
        "td:nth-child(-n+5),th{text-align:left}figure{display:inline-block;margin:0.5em}"
        "img{max-width:100%}"
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>citrus-edge sweep {e(results['created'])}</title><style>{style}</style></head>"
        f"<body><h1>citrus-edge sweep report</h1><p>{e(results['created'])}</p><ul>{head}</ul>"
        f'<table id="results"><thead><tr>{header_row}</tr></thead><tbody>{body}</tbody></table>'
        f"{figures}"
        f'<script type="application/json" id="plot-data">{series}</script>'
        "</body></html>\n"
    )
