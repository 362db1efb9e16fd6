"""The CPU build's per-component choice by measured latency (issues 19, 20).

The rule on hand-made numbers (a component keeps its low-bit graph only when at least `MARGIN`
faster than FP32), and a default-recipe TINY build with the measurement forced both ways: every
component set back to FP32 gives a bundle whose graphs are the FP32 bundle's, byte for byte, and
whose answers equal the FP32 bundle's exactly; nothing set back gives the int8 bundle as named.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from citrus_edge.recipes import COMPONENTS, INT8, INT8_W4

pytest.importorskip("modelopt.onnx.quantization")

NO_GATE = "dice=100,tokens=0"  # a random TINY model's near-tie logits flip under int8


def test_a_component_keeps_int8_only_when_it_pays_by_the_margin():
    from citrus_edge.compress.latency_choice import MARGIN, choose, decide

    assert MARGIN == 0.05
    assert decide("vision", "int8", 10.0, 9.5).kept == "int8"  # exactly 5 % faster: pays
    assert decide("vision", "int8", 10.0, 9.51).kept == "fp32"
    assert decide("llm", "int4", 10.0, 2.5).speedup == pytest.approx(4.0)
    # The paired runs' median ratio decides, and the medians must agree on the direction.
    assert decide("vision", "int8", 10.0, 9.0, speedup=1.02).kept == "fp32"
    assert decide("vision", "int8", 10.0, 10.5, speedup=1.2).kept == "fp32"
    assert decide("vision", "int8", 10.0, 9.0, speedup=1.1).kept == "int8"
    slower = decide("sam_encoder", "int8", 10.0, 11.0)
    assert slower.kept == "fp32" and "0.91x" in slower.why()
    timings = [
        decide("vision", "int8", 12.0, 6.0),
        decide("llm", "int4", 40.0, 10.0),
        decide("sam_encoder", "int8", 10.0, 10.3),
        decide("mask_decoder", "int8", 1.0, 1.2),
    ]
    c = choose(INT8_W4, timings, cpu="x", images=1, rounds=1, noise=0.0)
    assert c.reverted == ("sam_encoder", "mask_decoder")
    assert dict(c.recipe.items()) == {
        "vision": "int8",
        "llm": "int4",
        "sam_encoder": "fp32",
        "mask_decoder": "fp32",
    }
    assert c.recipe.name == "int8-w4+sam_encoder=fp32+mask_decoder=fp32"
    d = c.to_dict()
    assert (
        d["components"]["llm"]["speedup"] == pytest.approx(4.0)
        and d["requested_recipe"]["name"] == "int8-w4"
    )
    assert choose(INT8, [], cpu="x", images=1, rounds=1, noise=0.0).recipe is INT8


def test_paired_speedup_is_the_median_of_back_to_back_ratios():
    from citrus_edge.compress.latency_choice import paired_speedup

    # A slow spell (third pair) slows both runs: the ratio of the medians would say 1.0x.
    fp32, int8 = [10.0, 10.0, 40.0, 10.0, 10.0], [8.0, 8.0, 32.0, 10.0, 12.5]
    assert paired_speedup(fp32, int8) == pytest.approx(1.25)
    with pytest.raises(ValueError):
        paired_speedup([1.0], [1.0, 2.0])


def test_component_ms_scales_decode_to_the_fp32_answer_length():
    from citrus_edge.compress.latency_choice import component_ms

    ground = {"vision_encoder": 3.0, "prefill": 4.0, "decode": 20.0}
    track = {"sam_encoder": 5.0, "mask_decoder": 1.0}
    ms = component_ms(ground, track, steps=10, ref_steps=15)
    assert ms == {"vision": 3.0, "llm": 4.0 + 2.0 * 15, "sam_encoder": 5.0, "mask_decoder": 1.0}
    assert component_ms(ground, track, steps=0, ref_steps=15)["llm"] == 4.0


def _build_forced(tmp_path, tiny_checkpoint, small_phantom_set, monkeypatch, revert: bool):
    from citrus_edge.cli.bundle_build import BuildConfig, build
    from citrus_edge.compress import latency_choice

    real = latency_choice.decide
    seen = []

    def forced(component, precision, fp32_ms, quantized_ms, speedup=None):
        seen.append((component, fp32_ms, quantized_ms))
        slow = fp32_ms * 2 if revert else fp32_ms / 2
        return real(component, precision, fp32_ms, slow)

    monkeypatch.setattr(latency_choice, "decide", forced)
    cfg = BuildConfig(
        target="cpu",
        model_dir=tiny_checkpoint,
        calib=small_phantom_set,
        eval_data=small_phantom_set,
        eval_limit=3,
        budget=NO_GATE,
    )
    out = tmp_path / ("reverted" if revert else "kept")
    manifest = build(cfg, out)
    assert sorted(c for c, _, _ in seen) == sorted(COMPONENTS)
    assert all(f > 0 and q > 0 for _, f, q in seen)  # really timed before being forced
    return out, manifest


def _answers(bundle, small_phantom_set):
    from citrus_edge.calib_data.data_manifest import read_manifest
    from citrus_edge.calib_data.load import load_image
    from citrus_edge.runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, max_new_tokens=12)
    records = read_manifest(small_phantom_set, split="eval")[:3]
    out = []
    for r in records:
        res = pipe(load_image(r.abs_image(small_phantom_set.parent)), r.prompt)
        out.append((res.token_ids, [m.copy() for m in res.masks]))
    return out


def test_every_component_set_back_gives_the_fp32_bundle(
    tmp_path, tiny_checkpoint, small_phantom_set, tiny_fp32_bundle, monkeypatch
):
    from citrus_edge.bundle import load_bundle, sha256_file

    out, manifest = _build_forced(
        tmp_path, tiny_checkpoint, small_phantom_set, monkeypatch, revert=True
    )
    load_bundle(out)  # every file's sha256 verifies
    choice = manifest["latency_choice"]
    assert manifest["optimize"] == "latency"
    assert set(choice["components"]) == set(COMPONENTS)
    assert all(t["kept"] == "fp32" for t in choice["components"].values())
    assert manifest["recipe"]["components"] == dict.fromkeys(COMPONENTS, "fp32")
    for c in (*COMPONENTS, "embeddings"):
        f = manifest["components"][c]["file"]
        assert sha256_file(out / f) == sha256_file(tiny_fp32_bundle / f), c
    export = json.loads((out / "export_manifest.json").read_text())
    assert set(export["float_components"]) == set(COMPONENTS)
    got, want = _answers(out, small_phantom_set), _answers(tiny_fp32_bundle, small_phantom_set)
    for (ta, ma), (tb, mb) in zip(got, want, strict=True):
        assert ta == tb
        assert len(ma) == len(mb)
        assert all(np.array_equal(a, b) for a, b in zip(ma, mb, strict=True))


def test_nothing_set_back_ships_the_recipe_as_named(
    tmp_path, tiny_checkpoint, small_phantom_set, monkeypatch
):
    from citrus_edge.bundle import load_bundle

    out, manifest = _build_forced(
        tmp_path, tiny_checkpoint, small_phantom_set, monkeypatch, revert=False
    )
    load_bundle(out)
    assert manifest["recipe"] == INT8.to_dict()
    assert all(t["kept"] == "int8" for t in manifest["latency_choice"]["components"].values())
    assert "float_components" not in json.loads((out / "export_manifest.json").read_text())


def test_latency_is_refused_for_a_tensorrt_target_and_named_recipes_build_as_named(tmp_path):
    from citrus_edge.cli.bundle_build import BuildConfig
    from citrus_edge.targets import get_target

    cpu, orin = get_target("cpu"), get_target("orin-agx-64")
    assert BuildConfig("cpu", tmp_path).optimization(cpu) == "latency"
    assert BuildConfig("cpu", tmp_path, recipe="int8").optimization(cpu) == "size"
    assert BuildConfig("cpu", tmp_path, recipe="int8", optimize="latency").optimization(cpu) == (
        "latency"
    )
    assert BuildConfig("orin-agx-64", tmp_path).optimization(orin) == "size"
    with pytest.raises(ValueError, match="only its own GPU can time"):
        BuildConfig("orin-agx-64", tmp_path, optimize="latency").optimization(orin)
    with pytest.raises(ValueError, match="optimize 'speed' is not one of latency, size"):
        BuildConfig("cpu", tmp_path, optimize="speed")
