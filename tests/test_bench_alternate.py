"""`make bench` runs every recipe's bundle in one process, in turn (issue 19): the run order,
the per-bundle figures of `run_bench_alternating`, and the per-component speed-ups it prints."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from fixtures import random_rgb

from citrus_edge.runtime import bench
from citrus_edge.runtime.pipeline import Pipeline
from citrus_edge.tasks import REPORT_PROMPT, SEGMENT_PROMPT

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_script"] = module
    spec.loader.exec_module(module)
    return module


script = _load_script()
CASES = [
    (random_rgb(200, 260, seed=0), SEGMENT_PROMPT),
    (random_rgb(240, 180, seed=1), REPORT_PROMPT),
]
FRAMES = [random_rgb(200, 260, seed=0)] * 3


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, int, str]]:
    """Every `ground` / `track` call as (kind, id of the pipeline, prompt), in call order."""
    seen: list[tuple[str, int, str]] = []
    ground, track = Pipeline.ground, Pipeline.track

    def recording_ground(self, image, prompt, *args, **kwargs):
        seen.append(("ground", id(self), prompt))
        return ground(self, image, prompt, *args, **kwargs)

    def recording_track(self, image, key, *args, **kwargs):
        seen.append(("track", id(self), key.result.prompt))
        return track(self, image, key, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "ground", recording_ground)
    monkeypatch.setattr(Pipeline, "track", recording_track)
    return seen


def _by_bundle(seen: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """Pipeline ids replaced by the bundle index (pipelines warm up in the order given)."""
    index: dict[int, int] = {}
    for _, pid, _ in seen:
        index.setdefault(pid, len(index))
    return [(kind, index[pid], prompt) for kind, pid, prompt in seen]


def _numbers(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_bundles_run_in_turn_per_case_repeat_and_video_frame(tiny_fp32_bundle, calls):
    outs = bench.run_bench_alternating(
        [tiny_fp32_bundle, tiny_fp32_bundle],  # one bundle as two "recipes"
        CASES,
        max_new_tokens=4,
        repeats=2,
        warmup=1,
        video=iter(FRAMES),  # a one-shot iterator: both bundles must still see every frame
        video_prompt=SEGMENT_PROMPT,
        cold_start=False,
    )
    seg, rep = SEGMENT_PROMPT, REPORT_PROMPT
    warm = [("ground", 0, seg), ("ground", 1, seg)]
    timed = [("ground", b, p) for _ in range(2) for p in (seg, rep) for b in (0, 1)]
    video = [("ground", 0, seg), ("ground", 1, seg)]
    video += [("track", b, seg) for _ in range(2) for b in (0, 1)]
    assert _by_bundle(calls) == warm + timed + video
    assert timed[:4] == [
        ("ground", 0, seg),
        ("ground", 1, seg),
        ("ground", 0, rep),
        ("ground", 1, rep),
    ]

    single = bench.run_bench(
        tiny_fp32_bundle, CASES, max_new_tokens=4, repeats=1, video=FRAMES, cold_start=False
    )
    assert len(outs) == 2
    for out in outs:
        assert set(out) == set(single)
        assert out["e2e_ms"]["n"] == 4 and out["prefill_ms"]["n"] == 4
        assert out["video"]["key_frame_ms"]["n"] == 1 and out["video"]["ms_per_frame"]["n"] == 2
        assert out["bundle_id"] == single["bundle_id"] and out["max_new_tokens"] == 4
        numbers = dict(_numbers(out))
        assert numbers and all(math.isfinite(v) for v in numbers.values())
        for key in (".e2e_ms.p50", ".prefill_ms.p50", ".peak_rss_mb", ".video.ms_per_frame.p50"):
            assert numbers[key] > 0, key
        assert numbers[".e2e_ms.min"] <= numbers[".e2e_ms.p50"] <= numbers[".e2e_ms.p95"]
        assert all(v["p50"] > 0 for v in out["stages_ms"].values())
        assert {"vision_encoder", "prefill", "total"} <= set(out["stages_ms"])
        assert all(v > 0 for v in out["load_ms"].values())


def test_cold_start_is_measured_per_bundle_after_the_warm_runs(tiny_fp32_bundle, monkeypatch):
    asked: list[str] = []

    def fake_cold_start(bundle_path, image, prompt, **kwargs):
        asked.append(str(bundle_path))
        return {"cold_start_ms": 1.0 + len(asked)}

    monkeypatch.setattr(bench, "measure_cold_start", fake_cold_start)
    paths = [tiny_fp32_bundle, Path(str(tiny_fp32_bundle))]
    outs = bench.run_bench_alternating(paths, CASES[:1], max_new_tokens=2, repeats=1)
    assert asked == [str(tiny_fp32_bundle)] * 2
    assert [o["cold_start"]["cold_start_ms"] for o in outs] == [2.0, 3.0]
    assert all(o["video"] is None for o in outs)


def test_nothing_to_run_is_a_typed_error():
    with pytest.raises(bench.BenchInputError, match="at least one bundle"):
        bench.run_bench_alternating([], CASES)
    with pytest.raises(ValueError, match="at least one \\(image, prompt\\) case"):
        bench.run_bench_alternating(["unused"], [])


def _entry(p50: float) -> dict:
    # p95 far from p50: a ratio taken from anything but the medians would show
    return {"n": 5, "p50": p50, "p95": 10 * p50, "mean": 3 * p50, "min": p50 / 2, "max": 20 * p50}


def _recipe(e2e, vision, sam, mask, prefill, decode, video, size) -> dict:
    stages = {"vision_encoder": _entry(vision), "mask_decoder": _entry(mask), "total": _entry(e2e)}
    if sam is not None:
        stages["sam_encoder"] = _entry(sam)
    return {
        "bundle_id": "b" * 12,
        "e2e_ms": _entry(e2e),
        "prefill_ms": _entry(prefill),
        "decode_ms_per_token": _entry(decode),
        "stages_ms": stages,
        "video": {"key_frame_ms": _entry(50.0), "ms_per_frame": _entry(video), "n_seg": 1},
        "peak_rss_mb": 300.0,
        "cold_start": {"cold_start_ms": 900.0},
        "bundle_bytes": size,
    }


CPU = {
    "model": "Fake EPYC",
    "cores": 2,
    "flags": {"avx2": True, "avx512_vnni": True, "fma": False},
    "source": "given text",
}


def test_speedups_are_fp32_medians_over_the_recipes_medians(capsys):
    report = {
        "cpu": CPU,
        "torch_eager": {
            "e2e_ms": {"p50": 500.0, "p95": 600.0},
            "stages_ms": {"generate": 300.0},
            "generate_ms_per_token": 5.0,
        },
        "onnxruntime": {
            "fp32": _recipe(100.0, 40.0, 20.0, 5.0, 10.0, 2.0, 16.0, 1000),
            "int8": _recipe(80.0, 25.0, 21.0, 5.0, 8.0, 1.6, 8.0, 294),
            "int8-w4": _recipe(50.0, 20.0, None, 2.5, 4.0, 0.5, 4.0, 100),
        },
    }
    s = script.speedups(report["onnxruntime"]["fp32"], report["onnxruntime"]["int8"])
    assert s["end-to-end"] == pytest.approx(1.25) and s["vision"] == pytest.approx(1.6)
    assert s["sam_encoder"] == pytest.approx(20 / 21) and s["decode"] == pytest.approx(1.25)
    assert s["bytes"] == pytest.approx(0.294)

    script.print_report(report)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "CPU: Fake EPYC: AVX2 VNNI(AVX-512), 2 cores"
    speed = [line.strip() for line in lines if "vs fp32" in line]
    assert speed == [
        "vs fp32: end-to-end 1.25x, vision 1.60x, sam_encoder 0.95x, mask_decoder 1.00x, "
        "prefill 1.25x, decode 1.25x/token, video 2.00x/frame; 29.4% of the bytes",
        # no SAM2 encoder timing in this recipe: left out, not shown as 0 or inf
        "vs fp32: end-to-end 2.00x, vision 2.00x, mask_decoder 2.00x, "
        "prefill 2.50x, decode 4.00x/token, video 4.00x/frame; 10.0% of the bytes",
    ]
