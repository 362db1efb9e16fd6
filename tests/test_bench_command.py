"""`citrus-edge bench` (issue 20): every figure of the report is there and consistent, on the
tiny fp32 bundle fixture; typed one-line errors for cases that cannot be run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures import random_rgb
from PIL import Image
from test_cli import cli

import citrus_edge.cli.bench_command as bench_command
from citrus_edge.cli.cli_app import command
from citrus_edge.runtime import bench
from citrus_edge.tasks import REPORT_PROMPT, SEGMENT_PROMPT

PERCENTILE_KEYS = ("n", "min", "p50", "p90", "p95", "p99", "mean", "max")
FIGURES = (
    "e2e_ms",
    "ttft_ms",
    "prefill_ms",
    "decode_ms_per_token",
    "decode_tokens_per_s",
    "new_tokens",
    "vision_tokens",
    "prefill_tokens",
    "mask_decoder_ms_per_seg",
)


def _ordered(entry: dict, where: str) -> None:
    """n/min/p50/p90/p95/p99/max present and in order (an empty entry is n = 0 only)."""
    if entry["n"] == 0:
        assert entry == {"n": 0}, where
        return
    assert set(entry) == set(PERCENTILE_KEYS), where
    assert entry["min"] <= entry["p50"] <= entry["p90"] <= entry["p95"], where
    assert entry["p95"] <= entry["p99"] <= entry["max"], where
    assert entry["min"] <= entry["mean"] <= entry["max"], where


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("bench-images")
    paths = []
    for seed, (h, w) in enumerate(((200, 260), (240, 180))):
        Image.fromarray(random_rgb(h, w, seed=seed)).save(root / f"img{seed}.png")
        paths.append(root / f"img{seed}.png")
    return paths


@pytest.fixture(scope="module")
def report(tiny_fp32_bundle, images) -> dict:
    cases = [(images[0], SEGMENT_PROMPT), (images[1], REPORT_PROMPT)]
    # 3 x 1 + ... : odd run counts, so p50 is one run's figure and 1000 / median(ms per token)
    # equals median(tokens per s) exactly.
    return bench.bench_report(
        tiny_fp32_bundle,
        cases[:1] + cases[1:],
        warmup=1,
        iterations=3,
        threads=1,
        max_new_tokens=6,
        video_frames=3,
    )


def test_every_field_is_present_and_consistent(report, tiny_fp32_bundle):
    assert report["schema"] == bench.BENCH_SCHEMA
    runs = report["settings"]["runs"]
    assert runs == 3 * 2 and report["settings"]["threads"] == 1 == report["threads"]
    for key in FIGURES:
        _ordered(report[key], key)
    for stage, entry in report["stages_ms"].items():
        _ordered(entry, stage)
    assert report["e2e_ms"]["n"] == runs == report["ttft_ms"]["n"] == report["prefill_ms"]["n"]
    assert {"vision_encoder", "prefill", "decode", "total"} <= set(report["stages_ms"])
    assert report["stages_ms"]["total"] == report["e2e_ms"]
    # time to first token: a part of each run, holding its prefill
    for q in ("min", "p50", "max"):
        assert report["prefill_ms"][q] < report["ttft_ms"][q] < report["e2e_ms"][q]
    # tokens: the image's tokens are part of the prompt the prefill runs; one figure per case
    assert 0 < report["vision_tokens"]["min"] < report["prefill_tokens"]["min"]
    assert report["new_tokens"]["max"] <= 6
    d, r = report["decode_ms_per_token"], report["decode_tokens_per_s"]
    if d["n"]:
        assert d["n"] == r["n"]
        assert r["max"] == pytest.approx(1e3 / d["min"]) and r["min"] == pytest.approx(
            1e3 / d["max"]
        )
    seg = report["mask_decoder_ms_per_seg"]
    assert seg["n"] <= runs
    video = report["video"]
    assert video["key_frame_ms"]["n"] == 1 and video["ms_per_frame"]["n"] == 3
    _ordered(video["ms_per_frame"], "video")
    cold = report["cold_start"]
    assert cold["process_ms"] > cold["cold_start_ms"] > cold["first_result_ms"] > 0
    assert cold["heavy_modules"] == [] and cold["peak_rss_mb"] > 0
    assert report["peak_rss_mb"] > 0
    listed = json.loads((tiny_fp32_bundle / "manifest.json").read_text())["files"]
    on_disk = sum((tiny_fp32_bundle / name).stat().st_size for name in listed)
    assert report["bundle_bytes"] == on_disk > 0
    m = report["machine"]
    assert m["cpu"]["model"] and m["cores"] >= 1 and 1 <= m["cores_usable"] <= m["cores"]
    assert isinstance(m["gpus"], list) and m["cpu_line"].startswith(m["cpu"]["model"])
    versions = report["versions"]
    assert {"python", "citrus-edge", "numpy", "onnx"} <= set(versions["key"])
    assert versions["all"]["numpy"] == np.__version__
    assert [c["prompt"] for c in report["cases"]] == [SEGMENT_PROMPT, REPORT_PROMPT]
    json.dumps(report)  # JSON-ready as it is


def test_table_shows_the_report_figures(report):
    table = bench_command.bench_table(report)
    cells = {c.header: [str(x) for x in c._cells] for c in table.columns}
    row = cells["figure"].index("end to end")
    assert cells["p50"][row] == bench_command._num(report["e2e_ms"], "p50")
    assert cells["n"][row] == str(report["e2e_ms"]["n"])
    lines = bench_command.summary_lines(report)
    assert any(line.startswith("cold start ") for line in lines)
    assert any(line.startswith("machine: ") for line in lines)


def test_cli_writes_json_and_prints_the_table(capsys, tiny_fp32_bundle, images, tmp_path):
    command.cache_clear()  # the bench command registers on import
    out = tmp_path / "bench.json"
    code, stdout, err = cli(
        capsys, "bench", str(tiny_fp32_bundle), "--images", str(images[0]), "--task", "report",
        "--iterations", "1", "--warmup", "0", "--video-frames", "0", "--no-cold-start",
        "--max-new-tokens", "3", "--json", str(out),
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["e2e_ms"]["n"] == 1 and data["video"] is None and "cold_start" not in data
    assert data["cases"] == [{"image": str(images[0]), "prompt": REPORT_PROMPT}]
    assert "end to end" in stdout and "machine: " in stdout


def test_two_bundles_run_in_turn_and_are_compared_with_the_first(
    capsys, tiny_fp32_bundle, images, tmp_path
):
    """Two bundles (here the same one twice: two pipelines, timed as two bundles) in one run:
    one report each with the same runs, and the JSON's speed-ups are the first's medians over
    the second's, figure by figure (the printed line shows the same numbers)."""
    command.cache_clear()
    out = tmp_path / "compare.json"
    code, stdout, err = cli(
        capsys, "bench", str(tiny_fp32_bundle), str(tiny_fp32_bundle), "--images",
        str(images[0]), "--task", "segment", "--iterations", "3", "--warmup", "0",
        "--video-frames", "2", "--no-cold-start", "--max-new-tokens", "3", "--json", str(out),
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["schema"] == bench_command.COMPARE_SCHEMA and data["schedule"] == "alternating"
    first, second = data["reports"]
    assert first["schedule"] == second["schedule"] == "alternating"
    assert first["e2e_ms"]["n"] == second["e2e_ms"]["n"] == 3
    (ratio,) = data["speedups_vs_base"]
    assert ratio["end-to-end"] == pytest.approx(first["e2e_ms"]["p50"] / second["e2e_ms"]["p50"])
    assert ratio["decode"] == pytest.approx(
        first["decode_ms_per_token"]["p50"] / second["decode_ms_per_token"]["p50"]
    )
    assert ratio["bytes"] == 1.0
    assert stdout.count("end to end") == 2 and stdout.count("machine: ") == 1
    line = next(x for x in stdout.splitlines() if f"vs {tiny_fp32_bundle}" in x)
    assert f"end-to-end {ratio['end-to-end']:.2f}x" in line and "100.0% of the bytes" in line


def test_bad_cases_are_typed_errors(tmp_path, capsys):
    with pytest.raises(bench_command.BenchCasesError, match="not both"):
        bench_command.bench_cases([tmp_path / "a.png"], prompt="x", task="report")
    with pytest.raises(bench_command.BenchCasesError, match="unknown task 'grade'"):
        bench_command.bench_cases([tmp_path / "a.png"], task="grade")
    with pytest.raises(bench_command.BenchCasesError, match="neither an image"):
        bench_command.bench_cases([tmp_path / "a.txt"])
    with pytest.raises(bench.BenchInputError, match="iterations"):
        bench.bench_report("unused", [(tmp_path / "a.png", "x")], iterations=0)
    with pytest.raises(bench.BenchInputError, match="threads"):
        bench.open_pipeline("unused", threads=-1)


def test_manifest_cases_put_lesion_segmentations_first(small_phantom_set):
    from citrus_edge.calib_data.data_manifest import read_manifest

    recs = read_manifest(small_phantom_set, split="eval")
    with_lesion = [r for r in recs if r.task == "segment" and r.masks]
    cases = bench_command.bench_cases([small_phantom_set], limit=2, split="eval")
    assert with_lesion
    first = with_lesion[0]
    assert cases[0] == (first.abs_image(small_phantom_set.parent), first.prompt)
    assert len(cases) == 2 and cases[1][1] in {r.prompt for r in recs}
