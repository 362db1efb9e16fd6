"""`citrus-edge sweep` (issue 20): the reports show the values of results.json (re-read from the
CSV, Markdown and HTML), the Pareto front and `--compare` ratios on hand-made numbers, and a tiny
end-to-end sweep on the tiny checkpoint (fp32 + int8 builds, bench, eval, resume)."""

from __future__ import annotations

import base64
import copy
import csv
import importlib.util
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_cli import cli

import citrus_edge.cli.sweep_command as sweep_command
from citrus_edge.cli.cli_app import command
from citrus_edge.report import sweep_html, sweep_results
from citrus_edge.report.sweep_results import (
    COLUMNS,
    INVALID,
    MEASURED,
    NOT_MEASURED,
    VALID,
    compare,
    pareto_front,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_report_html.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("check_report_html", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_script = _load_script()


def _cell(recipe, e2e, dice, mb, validity=VALID, model="demo", agree=1.0) -> dict:
    return {
        "key": f"k-{model}-{recipe}",
        "model": model,
        "target": "cpu",
        "recipe": recipe,
        "status": MEASURED,
        "validity": validity,
        "bundle": {"path": f"/b/{recipe}", "bundle_id": "x" * 16, "bytes": mb * 1e6},
        "latency": {
            "e2e_p50_ms": e2e,
            "e2e_p90_ms": e2e * 1.25,
            "ttft_p50_ms": e2e / 2,
            "decode_ms_per_token": e2e / 100,
            "video_ms_per_frame": e2e / 10,
            "cold_start_ms": 900.0 + e2e,
            "peak_rss_mb": 150.0,
            "stages_p50_ms": {"vision_encoder": e2e / 4, "prefill": e2e / 4, "decode": e2e / 8},
        },
        "accuracy": {
            "dice": dice,
            "dice_drop": 0.85 - dice,
            "precision_at_1": 0.5,
            "count_accuracy": 0.9,
            "report_field_accuracy": 0.45,
            "token_agreement": agree,
            "mask_iou": 0.99,
        },
    }


def _results(cells, cpu="Fake EPYC: AVX2, 2 cores", data_sha="sha256:aa") -> dict:
    return {
        "schema": sweep_results.SCHEMA,
        "created": "2026-12-03T07:00:00Z",
        "machine": {"cpu_line": cpu, "cores_usable": 2, "memory_gb": 8.0, "gpus": [], "os": "L"},
        "versions": {"onnxruntime": "1.24.4", "citrus-edge": "0.1.0"},
        "models": {"demo": {"dir": "/m/demo", "hash": "sha256:m1"}},
        "data": {
            "manifest": "/d/manifest.jsonl",
            "sha256": data_sha,
            "split": "eval",
            "records": 48,
            "bench_images": 4,
        },
        "budget": {"fp32": "dice=1,tokens=99"},
        "settings": {"warmup": 1, "iterations": 3, "threads": 0, "video_frames": 8},
        "cells": cells,
    }


def _hand_made() -> dict:
    cells = [
        _cell("fp32", 100.0, 0.85, 13.6),
        _cell("int8", 80.0, 0.849, 4.0),  # faster, a hair worse: on the front
        _cell("int8-w4", 60.0, 0.70, 3.1, validity=INVALID, agree=0.5),  # outside the budget
        _cell("slow", 120.0, 0.84, 14.0),  # slower and worse than fp32: dominated
        _cell("tie", 80.0, 0.849, 4.0),  # equal to int8 in both: on the front too
        {
            "key": "k-orin",
            "model": "demo",
            "target": "orin-nano-8",
            "recipe": "fp16-w4",
            "status": NOT_MEASURED,
            "reason": "TensorRT target orin-nano-8: no GPU here",
            "projection": {"weight_bytes": 5.5e6, "decode_tokens_per_s_upper_bound": 12345.6},
        },
    ]
    results = _results(cells)
    sweep_results.mark_pareto(results)
    return results


def test_pareto_front_on_hand_made_points():
    pts = [(100, 0.85), (80, 0.849), (60, 0.70), (120, 0.84), (80, 0.849), (90, 0.80)]
    assert pareto_front(pts) == [2, 1, 4, 0]  # by latency; (120, .84) and (90, .80) dominated
    assert pareto_front([]) == [] and pareto_front([(1.0, 0.5)]) == [0]
    results = _hand_made()
    # INVALID cells are no choice: int8-w4 (fastest) is left off the front
    assert [c["recipe"] for c in results["cells"] if c["pareto"]] == ["fp32", "int8", "tie"]


def test_csv_holds_exactly_the_json_values(tmp_path):
    results = _hand_made()
    text = sweep_results.results_csv(results)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(results["cells"])
    for row, want in zip(rows, sweep_results.table_rows(results), strict=True):
        for c in COLUMNS:
            value = want[c.key]
            if value is None:
                assert row[c.key] == ""
            elif isinstance(value, float):
                assert float(row[c.key]) == value, c.key  # exact: repr round-trips
            else:
                assert row[c.key] == str(value)
    assert rows[0]["e2e_p50_ms"] == "100.0" and rows[1]["size_mb"] == "4.0"
    assert rows[5]["status"] == "not measured" and rows[5]["projected_decode_tps"] == "12345.6"
    assert rows[5]["e2e_p50_ms"] == ""  # a projection is never put in a measured column


def test_markdown_table_shows_the_json_values():
    results = _hand_made()
    md = sweep_results.results_markdown(results)
    table = sweep_results.read_markdown_table(md)
    assert len(table) == len(results["cells"])
    for shown, cell in zip(table, results["cells"], strict=True):
        for c, text in zip(COLUMNS, shown, strict=True):
            assert text == sweep_results.format_value(c, c.read(cell)).replace("|", "/"), c.key
    e2e = [c.key for c in COLUMNS].index("e2e_p50_ms")
    dice = [c.key for c in COLUMNS].index("dice")
    assert [r[e2e] for r in table] == ["100.0", "80.0", "60.0", "120.0", "80.0", "-"]
    assert table[1][dice] == "0.8490"
    assert "machine: Fake EPYC: AVX2, 2 cores" in md and "sha256:aa" in md and "sha256:m1" in md
    assert "projection" in md


class _Page(HTMLParser):
    """Table cells, images and the embedded plot data of report.html."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[dict] = []
        self.script: str | None = None
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self._in = "td"
            self.rows[-1].append("")
        elif tag == "img":
            self.images.append(a)
        elif tag == "script" and a.get("id") == "plot-data":
            self._in, self.script = "script", ""

    def handle_endtag(self, tag):
        if tag in ("td", "script"):
            self._in = None

    def handle_data(self, data):
        if self._in == "td":
            self.rows[-1][-1] += data
        elif self._in == "script":
            self.script += data


def test_html_table_and_plots_show_the_json_values():
    results = _hand_made()
    page = _Page()
    page.feed(sweep_html.results_html(results))
    body = [r for r in page.rows if r]  # the header row has <th> only
    assert body == sweep_results.formatted_rows(results)
    assert len(page.images) == 3
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(img["src"].split(",", 1)[1])
        assert png.startswith(PNG_MAGIC) and len(png) > 5000
    series = json.loads(page.script)
    assert series == sweep_html.plot_series(results)
    lat = {p["label"]: p for p in series["latency_vs_dice"]}
    assert lat["demo/cpu/int8"]["e2e_p50_ms"] == 80.0 and lat["demo/cpu/int8"]["dice"] == 0.849
    assert [p["label"] for p in series["latency_vs_dice"] if p["pareto"]] == [
        "demo/cpu/fp32",
        "demo/cpu/int8",
        "demo/cpu/tie",
    ]
    assert "demo/orin-nano-8/fp16-w4" not in lat  # not measured: not plotted
    bars = series["stages"]
    k = bars["labels"].index("demo/cpu/fp32")
    assert bars["stages"] == ["vision_encoder", "prefill", "decode"]
    assert [bars["ms"][s][k] for s in range(3)] == [25.0, 25.0, 12.5]
    size = {p["label"]: p["size_mb"] for p in series["size_vs_dice"]}
    assert size["demo/cpu/fp32"] == pytest.approx(13.6)


def test_compare_ratios_on_hand_made_numbers(tmp_path, capsys):
    a = _hand_made()
    b = copy.deepcopy(a)
    b["machine"]["cpu_line"] = "Other CPU"
    for cell in b["cells"]:
        if cell["status"] == MEASURED:
            cell["latency"]["e2e_p50_ms"] /= 2  # twice as fast
            cell["accuracy"]["dice"] *= 1.0  # same
    b["cells"][1]["bundle"]["bytes"] = 2e6  # int8: 4 MB -> 2 MB
    del b["cells"][3]  # "slow" only in A: not compared
    c = compare(a, b)
    rows = {r["cell"]: r["ratios"] for r in c["rows"]}
    assert set(rows) == {
        "demo/cpu/fp32",
        "demo/cpu/int8",
        "demo/cpu/int8-w4",
        "demo/cpu/tie",
        "demo/orin-nano-8/fp16-w4",
    }
    assert rows["demo/cpu/fp32"]["e2e p50"] == pytest.approx(0.5)
    assert rows["demo/cpu/int8"]["size"] == pytest.approx(0.5)
    assert rows["demo/cpu/fp32"]["size"] == pytest.approx(1.0)
    assert rows["demo/cpu/int8"]["Dice"] == pytest.approx(1.0)
    assert rows["demo/orin-nano-8/fp16-w4"]["e2e p50"] is None  # nothing measured: no ratio
    assert c["differences"] == ["machine: Fake EPYC: AVX2, 2 cores vs Other CPU"]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    command.cache_clear()
    code, out, err = cli(
        capsys, "sweep", "--compare", str(tmp_path / "a"), str(tmp_path / "b.json")
    )
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("demo/cpu/int8 "))
    assert line.split()[1:] == ["0.500", "1.000", "1.000", "1.000", "0.500", "1.000", "1.000"]
    assert "note: machine: Fake EPYC" in out


def test_results_of_another_schema_are_refused(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps({"schema": "citrus-edge.sweep/0"}))
    with pytest.raises(sweep_results.SweepResultsError, match="schema 'citrus-edge.sweep/0'"):
        sweep_results.load_results(tmp_path / "r.json")
    with pytest.raises(sweep_results.SweepResultsError, match="no such results file"):
        sweep_results.load_results(tmp_path / "missing")
    cfg = sweep_command.SweepConfig(
        models=("demo",), targets=("cpu",), recipes=("fp64",), data=tmp_path, out=tmp_path
    )
    with pytest.raises(sweep_command.SweepInputError, match="unknown recipe 'fp64'"):
        sweep_command.resolve_inputs(cfg)
    cfg = sweep_command.SweepConfig(
        models=("demo",), targets=("gpu9000",), recipes=("fp32",), data=tmp_path, out=tmp_path
    )
    with pytest.raises(sweep_command.SweepInputError, match="unknown target 'gpu9000'"):
        sweep_command.resolve_inputs(cfg)


def test_validity_follows_the_budget():
    from citrus_edge.compress.budget import Budget

    budget = Budget(max_dice_drop=0.01, min_token_agreement=0.99)
    ok = {"token_agreement": 0.995, "dice_drop": 0.004}
    assert sweep_command.validity_of(ok, budget) == (VALID, [])
    verdict, why = sweep_command.validity_of({"token_agreement": 0.98, "dice_drop": 0.02}, budget)
    assert verdict == INVALID
    assert why == ["token agreement 0.9800 < 0.9900", "Dice drop 0.0200 > 0.0100"]


def _tiny_config(tiny_checkpoint, small_phantom_set, out: Path, recipes) -> object:
    return sweep_command.SweepConfig(
        models=(str(tiny_checkpoint),),
        targets=("cpu", "orin-nano-8"),
        recipes=recipes,
        data=small_phantom_set,
        out=out,
        split="eval",
        limit=3,
        bench_images=1,
        iterations=1,
        warmup=0,
        video_frames=2,
        max_new_tokens=4,
        build_eval_limit=1,
        cold_start=False,
    )


def _no_measuring(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("a finished cell was measured again")

    monkeypatch.setattr(sweep_command, "_measure", boom)


def _cells(results: dict) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "pareto"} for c in results["cells"]]


def test_tiny_fp32_sweep_writes_every_file_and_resumes(
    tiny_checkpoint, small_phantom_set, tmp_path, monkeypatch, capsys
):
    cfg = _tiny_config(tiny_checkpoint, small_phantom_set, tmp_path / "sweep", ("fp32",))
    results = sweep_command.run_sweep(cfg)
    files = {p.name for p in cfg.out.iterdir()}
    assert {"results.json", "results.csv", "report.md", "report.html"} <= files
    assert json.loads((cfg.out / "results.json").read_text()) == json.loads(json.dumps(results))
    cpu, orin = results["cells"]
    assert cpu["status"] == MEASURED, cpu.get("reason")
    assert cpu["accuracy"]["records"] == 3 and cpu["latency"]["e2e_p50_ms"] > 0
    assert cpu["bench"]["schedule"] == "single"  # the model's only measured cell
    # the FP32 bundle answers as the FP32 PyTorch reference does: inside any budget
    assert cpu["accuracy"]["token_agreement"] == pytest.approx(1.0)
    assert cpu["validity"] == VALID and cpu["pareto"] is True
    assert orin["status"] == NOT_MEASURED and "latency" not in orin and "accuracy" not in orin
    assert orin["projection"]["weight_bytes"] > 0 and "projection" in orin["projection"]["kind"]
    rows = list(csv.DictReader(io.StringIO((cfg.out / "results.csv").read_text())))
    assert float(rows[0]["e2e_p50_ms"]) == cpu["latency"]["e2e_p50_ms"]
    assert results["data"]["sha256"].startswith("sha256:")
    assert list(results["models"].values())[0]["hash"].startswith("sha256:")

    # resume through the command line: nothing is built, timed or scored again
    _no_measuring(monkeypatch)
    command.cache_clear()
    code, out, err = cli(
        capsys, "sweep", "--models", str(tiny_checkpoint), "--targets", "cpu,orin-nano-8",
        "--recipes", "fp32", "--data", str(small_phantom_set), "--limit", "3",
        "--bench-images", "1", "--iterations", "1", "--warmup", "0", "--video-frames", "2",
        "--max-new-tokens", "4", "--build-eval-limit", "1", "--no-cold-start",
        "--out", str(cfg.out),
    )  # fmt: skip
    assert code == 0, err
    again = sweep_results.load_results(cfg.out)
    assert _cells(again) == json.loads(json.dumps(_cells(results)))
    shown = sweep_results.read_markdown_table(out)
    assert shown == sweep_results.formatted_rows(again)


def test_bundles_are_benched_together_only_where_they_fit_memory(tmp_path):
    """Three bundles of 1 GB each need about 9 GB loaded at once: together on a 24 GB machine,
    one at a time on a 16 GB one (half of it is the limit)."""
    bundles = []
    for i in range(3):
        b = tmp_path / f"b{i}"
        b.mkdir()
        (b / "manifest.json").write_text(json.dumps({"files": {"x.onnx": {"bytes": 10**9}}}))
        bundles.append(b)
    assert sweep_command.alternation_fits(bundles, memory_bytes=24 * 10**9)
    assert not sweep_command.alternation_fits(bundles, memory_bytes=16 * 10**9)
    assert sweep_command.alternation_fits(bundles[:1], memory_bytes=1)  # one bundle: always


def test_a_cell_whose_build_fails_costs_no_other_cell(
    tiny_checkpoint, small_phantom_set, tmp_path, monkeypatch
):
    real_build = sweep_command._build

    def build(cfg, model, target, recipe_name, cache):
        if recipe_name == "int8":
            raise RuntimeError("calibration ran out of\nmemory")
        return real_build(cfg, model, target, recipe_name, cache)

    monkeypatch.setattr(sweep_command, "_build", build)
    cfg = _tiny_config(tiny_checkpoint, small_phantom_set, tmp_path / "s", ("int8", "fp32"))
    cfg = sweep_command.SweepConfig(**{**cfg.__dict__, "targets": ("cpu",)})
    results = sweep_command.run_sweep(cfg)
    int8, fp32 = results["cells"]  # plan order, whatever order they finished in
    assert int8["status"] == sweep_results.FAILED
    assert int8["reason"] == "RuntimeError: calibration ran out of memory"  # one line
    assert fp32["status"] == MEASURED and fp32["accuracy"]["token_agreement"] == pytest.approx(1)
    assert sweep_results.load_results(cfg.out)["cells"][0]["status"] == sweep_results.FAILED


def test_resolution_axis_sweeps_each_model_at_each_side(
    tiny_checkpoint, small_phantom_set, tmp_path
):
    """--resolutions 112,168: the model at 112^2 and 168^2 pixels (16 and 36 visual tokens after
    the 2x2 merge), each its own checkpoint (linked weights, the pixel budget changed), never the
    user's checkpoint folder touched."""
    before = {p.name: p.stat().st_mtime_ns for p in tiny_checkpoint.iterdir()}
    cfg = _tiny_config(tiny_checkpoint, small_phantom_set, tmp_path / "r", ("fp32",))
    cfg = sweep_command.SweepConfig(
        **{**cfg.__dict__, "targets": ("cpu",), "resolutions": (112, 168)}
    )
    results = sweep_command.run_sweep(cfg)
    small, large = results["cells"]
    assert (small["model"], large["model"]) == ("tiny@112px", "tiny@168px")
    assert (
        small["bench"]["vision_tokens"]["p50"] == 16
        and large["bench"]["vision_tokens"]["p50"] == 36
    )
    assert small["accuracy"]["token_agreement"] == pytest.approx(1.0)  # vs its own reference
    variant = Path(results["models"]["tiny@168px"]["dir"])
    pre = json.loads((variant / "config.json").read_text())["preprocess"]
    assert pre["min_pixels"] == pre["max_pixels"] == 168 * 168
    digest = results["models"]["tiny@168px"]["hash"].removeprefix("sha256:")[:16]
    assert variant.name == f"tiny@168px-{digest}"  # new base weights: a new folder, never stale
    assert {p.name: p.stat().st_mtime_ns for p in tiny_checkpoint.iterdir()} == before
    with pytest.raises(sweep_command.SweepInputError, match="multiples of 28"):
        sweep_command.resolve_inputs(
            sweep_command.SweepConfig(**{**cfg.__dict__, "resolutions": (100,)})
        )
    with pytest.raises(sweep_command.SweepInputError, match="not a side"):
        sweep_command._sides("224,big")


@pytest.mark.skipif(
    check_script.find_browser() is None, reason="no Chromium (apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(sweep_html.results_html(_hand_made()))
    result = check_script.check(page, tmp_path / "shot.png")
    assert sum(i["decoded"] for i in result["images"]) == 3
    assert result["std"] > 10 and result["non_white"] > 0.02


@pytest.mark.slow
def test_tiny_int8_sweep_reuses_the_cached_build(tiny_checkpoint, small_phantom_set, tmp_path):
    cfg = _tiny_config(tiny_checkpoint, small_phantom_set, tmp_path / "a", ("fp32", "int8"))
    results = sweep_command.run_sweep(cfg)
    cells = {(c["target"], c["recipe"]): c for c in results["cells"]}
    fp32, int8 = cells["cpu", "fp32"], cells["cpu", "int8"]
    assert int8["status"] == MEASURED, int8.get("reason")
    assert int8["bundle"]["bytes"] < fp32["bundle"]["bytes"]
    # one model's cells are timed in one run, in turn (their latency ratios hold on a busy machine)
    assert fp32["bench"]["schedule"] == int8["bench"]["schedule"] == "alternating"
    assert fp32["bench"]["e2e_ms"]["n"] == int8["bench"]["e2e_ms"]["n"]
    assert [c["recipe"] for c in results["cells"]] == ["fp32", "int8", "fp32", "int8"]  # plan order
    assert 0.0 <= int8["accuracy"]["token_agreement"] <= 1.0
    assert cells["orin-nano-8", "int8"]["status"] in (NOT_MEASURED, "not applicable")
    # a second sweep elsewhere, same cache: the same bundles, not built again
    other = _tiny_config(tiny_checkpoint, small_phantom_set, tmp_path / "b", ("int8",))
    other = sweep_command.SweepConfig(**{**other.__dict__, "cache": cfg.out / "builds"})
    second = sweep_command.run_sweep(other)
    assert second["cells"][0]["bundle"]["path"] == int8["bundle"]["path"]
    assert second["cells"][0]["seconds"]["build"] < 5


def test_sweep_out_that_is_not_a_sweep_folder_is_refused_before_any_work(tmp_path):
    """A user's folder (or one whose results.json is someone else's) is never written to."""
    import json

    from citrus_edge.cli.sweep_command import SweepOutError, check_sweep_out
    from citrus_edge.report.sweep_results import SCHEMA

    check_sweep_out(tmp_path / "new")  # absent: fine
    (tmp_path / "empty").mkdir()
    check_sweep_out(tmp_path / "empty")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SweepOutError, match=r"holds files a sweep did not write \(notes.txt\)"):
        check_sweep_out(mine)
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"schema": "someone/else"}))
    with pytest.raises(SweepOutError, match="is not a sweep's folder"):
        check_sweep_out(other)
    ours = tmp_path / "ours"
    (ours / "builds").mkdir(parents=True)
    (ours / "results.json").write_text(json.dumps({"schema": SCHEMA, "cells": []}))
    check_sweep_out(ours)  # a sweep's own folder resumes
    (tmp_path / "file").write_text("x")
    with pytest.raises(SweepOutError, match="is a file"):
        check_sweep_out(tmp_path / "file")
    assert (mine / "notes.txt").read_text() == "keep"
